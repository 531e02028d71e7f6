"""course/: every chapter runs as a script (exit 0), writes the figures it announces and prints numbers inside the
ranges that encode what its prose claims; every chapter is a valid jupytext 'percent' file (checked without
jupytext). The claims hold for both face sources a chapter can use: LFW (shared/data, when present) and the shipped
bank's samples (GLEAN_FACES=none, or a clone without the research data); where they differ the ranges say so.

A chapter runs with whatever source it finds; when that is LFW, the face chapters run a second time on the bank's
samples (GLEAN_FACES=none), except chapter 6 unless COURSE_ALL_SOURCES=1 (its claims do not depend on the source,
its bank run takes a minute, and a clone without the research data runs it on the bank anyway)."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

COURSE = ROOT / "course"
CHAPTERS = {p.name[:2]: p for p in sorted(COURSE.glob("[0-9][0-9]_*.py"))}
FACE_CHAPTERS = ("01", "04", "05", "06", "07")   # chapters that use lesson.faces (LFW or the bank's samples)

FIGURES = {
    "01": {"01_kernels.png", "01_zone_plate.png", "01_glean_on_each_lr.png"},
    "02": {"02_samples_truncation.png", "02_noise.png", "02_style_mixing.png"},
    "03": {"03_features.png", "03_parameters.png"},
    "04": {"04_g_and_d.png", "04_knockouts.png"},
    "05": {"05_switches.png", "05_switches_psnr.png"},
    "06": {"06_loss_curve.png", "06_tiny_run_output.png"},
    "07": {"07_gain_histogram.png", "07_framings.png", "07_gain_vs_framing.png"},
}


def run_chapter(number: str, out: Path, faces: str | None) -> dict:
    env = {**os.environ, "COURSE_OUT": str(out), "PYTHONUNBUFFERED": "1"}
    env.pop("GLEAN_FACES", None)
    if faces:
        env["GLEAN_FACES"] = faces
    proc = subprocess.run([sys.executable, str(CHAPTERS[number])], cwd=out, env=env, capture_output=True,
                          text=True, timeout=900)   # run from elsewhere: the chapter finds the repository itself
    assert proc.returncode == 0, f"chapter {number} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = {m[1]: float(m[2]) for m in re.finditer(r"^RESULT (\S+) = (\S+)$", proc.stdout, re.M)}
    figures = re.findall(r"^FIGURE (.+)$", proc.stdout, re.M)
    source = re.search(r"^SOURCE (\w+):", proc.stdout, re.M)
    return {"r": results, "figures": figures, "source": source[1] if source else None, "stdout": proc.stdout}


# ----------------------------------------------------------------------------------------------------------
# What each chapter claims (r: its RESULT numbers, source: 'lfw', 'folder' or 'bank')


def check_01(r, source):
    assert r["taps_antialiased"] == 32 and r["taps_plain"] == 4            # 8x: kernel 8x wider
    assert r["rows_sum_to_one_maxerr"] < 1e-12
    assert r["alias_std_torch_plain"] > 100 * r["alias_std_matlab"]         # the zone plate: aliasing
    assert r["alias_std_matlab"] < 0.01 and r["alias_std_pil"] < 0.01
    assert r["lr_psnr_pil_vs_matlab"] > 35 and r["lr_psnr_torch_aa_vs_matlab"] > 35   # Pillow ~ MATLAB
    assert r["lr_psnr_torch_plain_vs_matlab"] < 25                          # plain bicubic: another image
    assert r["pil_float_interior_maxdiff"] < 1e-3                           # same operator inside ...
    assert r["pil_float_border_meandiff"] > 0.5                             # ... different at the borders
    assert r["glean_gain_matlab"] > 1.0                                     # right LR: GLEAN beats bicubic
    assert abs(r["glean_psnr_matlab"] - r["glean_psnr_pil"]) < 0.5
    assert r["glean_psnr_matlab"] - r["glean_psnr_torch_plain"] > 2.0       # aliased LR: several dB lost ...
    assert r["glean_gain_torch_plain"] < 0                                  # ... below bicubic of the same input
    if "glean_psnr_cv2" in r:
        assert abs(r["glean_psnr_cv2"] - r["glean_psnr_torch_plain"]) < 0.2


def check_02(r, source):
    assert r["num_latents"] == 10 and r["num_noise_inputs"] == 9 and 7e5 < r["bank_params"] < 9e5
    assert r["modulated_weight_maxdiff"] < 1e-10                            # written out == stylegan2.py
    assert r["modulated_conv_maxdiff"] < 1e-10 and r["upsampling_conv_maxdiff"] < 1e-10
    assert 0.85 < r["output_std_demodulated"] < 1.15                        # demodulation: unit variance
    assert r["output_std_modulated_only"] > 1.5
    assert r["noise_effect"] < 0.5 * r["style_effect"]
    for k in (4, 6, 8):                                                     # B's first 4+ vectors fix the 8x8 image
        assert r[f"mix{k}_lr_mse_to_B"] < 0.5 * r[f"mix{k}_lr_mse_to_A"]
    assert r["mix8_lr_mse_to_B"] < r["mix4_lr_mse_to_B"] < r["mix2_lr_mse_to_B"]


def check_03(r, source):
    assert (r["shipped_N"], r["shipped_f0_channels"], r["shipped_f0_size"], r["shipped_fN_size"]) == (1, 96, 8, 4)
    assert (r["shipped_C_rows"], r["shipped_C_cols"]) == (10, 96)
    assert (r["ffhq16_N"], r["ffhq16_f0_channels"], r["ffhq16_C_rows"], r["ffhq16_C_cols"]) == (4, 512, 18, 512)
    assert r["ffhq16_output_size"] == 1024 and (r["cat8_N"], r["cat8_C_rows"]) == (3, 14)
    assert 170 < r["ffhq16_params_millions"] < 180 and 29 < r["ffhq16_bank_params_millions"] < 32


def check_04(r, source):
    assert r["astronaut_psnr_glean"] > r["astronaut_psnr_bicubic"] + 1.0
    assert (r["num_g_maps"], r["num_d_maps"]) == (5, 4)
    assert r["faces_psnr_glean"] > r["faces_psnr_bicubic"] + 1.0
    assert r["drop_d0"] > 5                                                 # the encoder-decoder skip: essential
    assert r["drop_f8"] > 0.5 and abs(r["drop_f4"]) < 0.3                   # the finest f_i matters, f[4] barely
    assert min(r["drop_g16"], r["drop_g32"], r["drop_g64"]) > 0.1           # every g_i into the decoder helps
    assert abs(r["drop_C_mean"]) < 0.5                                      # C carries little image-specific
    assert r["fast_vs_reference_maxdiff"] < 1e-4


def check_05(r, source):
    assert r["params_decoder_bank_up_to_0"] < 0.6 * r["params_full"]       # no bank: no E_1..E_N+1 either
    assert r["params_fuse_encoder_up_to_0"] < r["params_fuse_encoder_up_to_4"] < r["params_full"]
    assert r["psnr_full"] > r["psnr_bicubic"] + 1.0
    assert r["psnr_full"] > r["psnr_fuse_encoder_up_to_4"] > r["psnr_fuse_encoder_up_to_0"]   # Fig. 7 trend
    assert r["psnr_full"] - r["psnr_fuse_encoder_up_to_0"] > 1.0
    assert (r["psnr_full"] > r["psnr_decoder_bank_up_to_32"] > r["psnr_decoder_bank_up_to_16"]
            > r["psnr_decoder_bank_up_to_0"])                               # Fig. 8 trend
    assert r["psnr_use_decoder_False"] < r["psnr_bicubic"] - 5              # Fig. 9 needs training
    assert r["fig8_switch_vs_zeroed_maxdiff"] < 1e-5                        # switch == chapter 4's knock-out


def check_06(r, source):
    assert r["bank_in_training_mode"] == 0
    assert r["eq5_check"] < 1e-6 and r["eq8_check"] < 1e-6 and r["eq7_check"] < 1e-5
    assert r["percep_of_identical_images"] == 0 and r["l_percep_random_vgg"] > 0
    assert 0 < r["l_mse"] < 0.1                                             # a trained model on its own task
    assert 0.3 < r["l_gen"] < 1.5 and 1.0 < r["l_d"] < 1.8                  # random D: near log 2, 2 log 2
    assert r["frozen_params"] >= r["bank_params"] and r["trainable_params"] > 5e6
    assert r["bank_params_with_grad"] == 0 and r["trainable_params_with_grad"] == r["trainable_tensors"]
    assert r["bank_max_change_after_step"] == 0                             # the bank is frozen
    assert r["encoder_max_change_after_step"] > 1e-5                        # the rest moved
    assert r["tiny_run_steps"] == 80 and r["tiny_run_mse_ratio"] < 0.5     # the tiny run learns
    assert r["tiny_run_bank_max_change"] == 0


def check_07(r, source):
    assert r["glean_psnr"] > r["bicubic_psnr"] + 1.0 and r["glean_ssim"] > r["bicubic_ssim"]
    assert r["glean_psnr_y"] > r["bicubic_psnr_y"] + 1.0
    assert r["fraction_of_faces_improved"] > 0.8
    g = {f: r[f"framing{f}_psnr_gain"] for f in (100, 85, 70, 50)}
    assert g[100] > g[70] > g[50] and g[100] - g[50] > 0.5                 # tighter framing: smaller gain
    if source == "bank":
        assert g[100] > r["framing123_psnr_gain"] + 0.2                     # looser framing: smaller gain too
    else:
        assert g[100] > g[85] and g[100] > 1.5 and g[50] < 0.5 * g[100]
        if "glean_identity" in r:                                           # dlib installed
            assert r["glean_identity"] > r["bicubic_identity"]              # (on LFW; not on the bank's samples)
            assert r["framing100_identity_gain"] > r["framing50_identity_gain"] + 0.01


CHECKS = {"01": check_01, "02": check_02, "03": check_03, "04": check_04, "05": check_05, "06": check_06,
          "07": check_07}


def lfw_present() -> bool:
    sys.path.insert(0, str(COURSE))
    try:
        import lesson
        return lesson.face_folder() is not None
    finally:
        sys.path.remove(str(COURSE))


LFW_PRESENT = lfw_present()
SLOW_BANK_RUNS = ("06",)     # its claims do not depend on the source, and a clone without CelebA runs it on the bank
RUNS = [pytest.param(n, None, id=n) for n in CHAPTERS] + [
    pytest.param(n, "none", id=f"{n}-bank", marks=pytest.mark.skipif(
        not LFW_PRESENT or (n in SLOW_BANK_RUNS and not os.environ.get("COURSE_ALL_SOURCES")),
        reason="without LFW the default run uses the bank's samples" if not LFW_PRESENT else
               "set COURSE_ALL_SOURCES=1 to run it (about a minute)"))
    for n in FACE_CHAPTERS]


@pytest.mark.parametrize("number,faces", RUNS)
def test_chapter_runs_and_its_claims_hold(number, faces, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("skimage")
    run = run_chapter(number, tmp_path, faces)
    announced = {Path(f).name for f in run["figures"]}
    assert announced == FIGURES[number]
    for f in run["figures"]:
        path = Path(f)
        assert path.parent == tmp_path, f"{f} is not under $COURSE_OUT"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{f} is not a non-empty PNG"
    if number in FACE_CHAPTERS:
        assert run["source"] in ("lfw", "folder", "bank")
        if faces == "none":
            assert run["source"] == "bank"
    CHECKS[number](run["r"], run["source"])


# ----------------------------------------------------------------------------------------------------------
# The files themselves


def cells(text: str) -> list:
    """jupytext percent cells: [(kind, lines)] with kind 'markdown' or 'code'."""
    out = []
    for line in text.splitlines():
        if line.startswith("# %%"):
            assert line in ("# %%", "# %% [markdown]"), f"unexpected cell marker {line!r}"
            out.append(("markdown" if line.endswith("[markdown]") else "code", []))
        else:
            assert out, "text before the first cell marker"
            out[-1][1].append(line)
    return out


def test_chapters_exist():
    assert list(CHAPTERS) == ["01", "02", "03", "04", "05", "06", "07"]
    assert set(CHECKS) == set(CHAPTERS) == set(FIGURES)


@pytest.mark.parametrize("number", list(CHAPTERS))
def test_chapter_is_a_jupytext_percent_file(number):
    text = CHAPTERS[number].read_text()
    ast.parse(text)                                                         # a plain Python script
    cs = cells(text)
    assert cs[0][0] == "markdown" and cs[0][1][0].startswith(f"# # Chapter {int(number)}.")
    assert sum(kind == "code" for kind, _ in cs) >= 3
    for kind, lines in cs:
        if kind == "markdown":                                              # markdown cells are all comments
            assert all(line.startswith("#") or not line.strip() for line in lines)
    last_md = [lines for kind, lines in cs if kind == "markdown"][-1]
    assert "# ## Exercises" in last_md
    exercises = [line for line in last_md if re.match(r"# \d\. ", line)]
    assert 2 <= len(exercises) <= 3
    assert "sys.path" in text and 'ROOT / "course"' in text                 # runs from anywhere


@pytest.mark.parametrize("path", ["course/out/figure.png", "course/01_lr_protocol.ipynb"])
def test_course_output_is_ignored_by_git(path):
    """Figures (of research faces, possibly) and generated notebooks (which embed them) are never committed."""
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if proc.returncode == 128:
        pytest.skip(f"not a git checkout ({proc.stderr.decode().strip()})")
    assert proc.returncode == 0, f"{path} is not ignored by git"
