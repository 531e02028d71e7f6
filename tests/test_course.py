"""course/: every chapter runs as a script (exit 0), writes the figures it announces and prints numbers inside the
ranges that encode what its prose claims; every chapter is a valid jupytext 'percent' file (checked without
jupytext). The claims hold for both face sources a chapter can use: LFW (shared/data, when present) and the shipped
bank's samples (GLEAN_FACES=none, or a clone without the research data); where they differ the ranges say so.

A chapter runs with whatever source it finds; when that is LFW, the face chapters run a second time on the bank's
samples (GLEAN_FACES=none, which also hides the CelebA photos chapter 6 trains on): the data of a fresh clone.
Numbers a chapter quotes from the model card, rather than computes, are checked against weights/MODEL_CARD.md.
course/train_minimal.py, the training loop in one screen, runs and learns."""
import ast
import math
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
    assert r["taps_antialiased"] == 32 and r["taps_plain"] == 4            # "4 x 8 = 32 HR pixels"
    assert r["rows_sum_to_one_maxerr"] < 1e-12
    assert r["alias_std_torch_plain"] > 100 * r["alias_std_matlab"]         # the zone plate: aliasing
    assert r["alias_std_matlab"] < 0.01 and r["alias_std_pil"] < 0.01       # "about 0"
    assert 0.15 < r["alias_std_torch_plain"] < 0.5                          # "of the order of the contrast" (0.35)
    assert r["lr_psnr_pil_vs_matlab"] > 35 and r["lr_psnr_torch_aa_vs_matlab"] > 35   # Pillow ~ MATLAB
    assert r["lr_psnr_torch_plain_vs_matlab"] < 25                          # plain bicubic: another image
    assert r["pil_float_interior_maxdiff"] < 1e-3                           # "1e-5 of a grey level"
    assert r["pil_float_border_meandiff"] > 0.5                             # ... different at the borders
    assert r["glean_gain_matlab"] > 1.0                                     # right LR: GLEAN beats bicubic
    assert 0.05 < r["glean_psnr_matlab"] - r["glean_psnr_pil"] < 0.25       # "about a tenth of a dB"
    assert r["glean_psnr_matlab"] - r["glean_psnr_torch_plain"] > 3.0       # aliased LR: "several dB" lost ...
    assert r["glean_gain_torch_plain"] < 0                                  # ... below bicubic of the same input
    if "glean_psnr_cv2" in r:
        assert abs(r["glean_psnr_cv2"] - r["glean_psnr_torch_plain"]) < 0.2


def check_02(r, source):
    assert (r["num_style_layers"], r["num_latents"], r["num_noise_inputs"]) == (9, 10, 9)   # 9 layers + last toRGB
    assert 7e5 < r["bank_params"] < 9e5
    assert r["modulated_weight_maxdiff"] < 1e-10                            # written out == stylegan2.py
    assert r["modulated_conv_maxdiff"] < 1e-10
    assert r["upsampling_conv_maxdiff"] < 1e-10                             # from the stored weights alone
    assert 0.85 < r["output_std_demodulated"] < 1.15                        # demodulation: "about 1"
    assert 2.0 < r["output_std_modulated_only"] < 3.0                       # "about 2.5x too large"
    assert r["noise_effect"] < 0.5 * r["style_effect"]
    assert 2.5 < r["mix4_lr_mse_to_A"] / r["mix4_lr_mse_to_B"] < 4.5        # "about three times closer"
    assert r["mix6_lr_mse_to_A"] / r["mix6_lr_mse_to_B"] > 6                # "ten times closer"
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
    assert r["drop_d0"] > 5                                                 # "collapses (over 5 dB)"
    assert 0.7 < r["drop_f8"] < 1.6 and abs(r["drop_f4"]) < 0.3           # "about a dB"; "under 0.3 dB"
    for g in ("g16", "g32", "g64"):                                         # "a tenth of a dB to a little over one"
        assert 0.1 < r[f"drop_{g}"] < 1.3, g
    assert abs(r["drop_C_mean"]) < 0.5                                      # "under half a dB"
    assert r["fast_vs_reference_maxdiff"] < 1e-4


def check_05(r, source):
    assert r["params_decoder_bank_up_to_0"] < 0.6 * r["params_full"]       # no bank: no E_1..E_N+1 either
    assert r["params_fuse_encoder_up_to_0"] < r["params_fuse_encoder_up_to_4"] < r["params_full"]
    assert r["psnr_full"] > r["psnr_bicubic"] + 1.0
    fig7 = r["psnr_full"] - r["psnr_fuse_encoder_up_to_0"]
    assert 1.5 < fig7 < 3.5                                                 # "between one and a half and 3.5 dB"
    assert (2.5 < fig7) == (source != "bank")                               # "about 3 on LFW, under 2 on the bank's"
    assert 0 < r["psnr_fuse_encoder_up_to_4"] - r["psnr_fuse_encoder_up_to_0"] < 0.5   # "a few tenths at most"
    assert (r["psnr_full"] > r["psnr_decoder_bank_up_to_32"] > r["psnr_decoder_bank_up_to_16"]
            > r["psnr_decoder_bank_up_to_0"])                               # Fig. 8 trend
    assert r["psnr_use_decoder_False"] < r["psnr_bicubic"] - 5              # Fig. 9: "more than 5 dB" below
    assert r["fig8_switch_vs_zeroed_maxdiff"] < 1e-5                        # switch == chapter 4's knock-out


def check_06(r, source):
    assert r["alpha_percep"] == r["alpha_gen"] == 0.01                      # Appendix A
    assert 0.5 < r["l_mse_share_of_l_g"] < 1                                # "most of L_g"
    assert r["psnr_from_l_mse_maxgap"] < 0.05                               # eq. (5) is the PSNR's MSE
    assert (r["percep_feature_channels"], r["percep_feature_size"]) == (512, 8)   # conv4_3 at 1/8
    assert r["l_d_right_discriminator"] < 0.2 and abs(r["l_d_at_chance"] - 2 * math.log(2)) < 1e-3
    assert r["grad_nonsaturating_at_confident_D"] < 50 * r["grad_paper_at_confident_D"] < 0   # steep vs flat
    assert r["grad_paper_at_fooled_D"] < 50 * r["grad_nonsaturating_at_fooled_D"] < 0         # the other way
    assert 0 < r["l_mse"] < 0.1                                             # a trained model on its own task
    assert 0.3 < r["l_gen"] < 1.5 and 1.0 < r["l_d"] < 1.8                  # random D: near log 2, 2 log 2
    assert r["frozen_params"] >= r["bank_params"] and r["trainable_params"] > 5e6
    assert r["bank_params_with_grad"] == 0 and r["trainable_params_with_grad"] == r["trainable_tensors"]
    assert r["bank_max_change_after_step"] == 0                             # the bank is frozen
    assert 5e-5 < r["encoder_max_change_after_step"] < 2e-4                 # "about the learning rate"
    assert abs(r["l_mse_after_step"] / r["l_mse"] - 1) < 0.25               # "up to a fifth, up or down"
    assert r["tiny_run_steps"] == 30 and r["tiny_run_mse_ratio"] < 0.5     # the tiny run learns
    assert 0.5 < r["tiny_run_gen_mean"] < 0.9 and 1.1 < r["tiny_run_d_mean"] < 1.6   # near log 2, 2 log 2
    assert r["tiny_run_bank_max_change"] == 0


def check_07(r, source):
    assert r["glean_psnr"] > r["bicubic_psnr"] + 1.0 and r["glean_ssim"] > r["bicubic_ssim"]
    assert r["glean_psnr_y"] > r["bicubic_psnr_y"] + 1.0
    assert r["fraction_of_faces_improved"] == 1                             # "PSNR on every face"
    g = {f: r[f"framing{f}_psnr_gain"] for f in (100, 85, 70, 50)}
    assert g[100] > g[85] > g[70] > g[50] and g[100] - g[50] > 0.5         # shrinks steadily as it tightens
    assert g[50] < 1                                                        # "a fraction of a dB"
    if source == "bank":
        assert g[100] > r["framing123_psnr_gain"] + 0.2                     # looser framing: smaller gain too
        if "glean_identity" in r:
            assert r["glean_identity"] < r["bicubic_identity"]              # "identity does not" improve
    else:
        assert g[100] > 1.5 and g[50] < 0.5 * g[100]
        if "glean_identity" in r:                                           # dlib installed
            assert 0.01 < r["glean_identity"] - r["bicubic_identity"] < 0.03   # "by about 0.02"
            assert r["framing50_identity_gain"] < 0                         # "its identity advantage is gone"


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
RUNS = [pytest.param(n, None, id=n) for n in CHAPTERS] + [
    pytest.param(n, "none", id=f"{n}-bank", marks=pytest.mark.skipif(
        not LFW_PRESENT, reason="without LFW the default run uses the bank's samples"))
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


# ----------------------------------------------------------------------------------------------------------
# Quoted numbers, and the minimal training loop


QUOTED = {  # chapter: (as the model card writes it, as the chapter's prose quotes it), results of runs the course
    "02": [("41 min", "41 CPU-minutes")],                             # does not redo
    "05": [(n, n) for n in ("19.77", "0.4613", "0.8721", "20.41", "0.5169", "0.8666", "20.32", "0.5115", "0.8651",
                            "20.34", "0.5090", "0.8737")] + [("--iters 1500", "(1500")],
    "06": [("--iters 1500", "1,500 +"), ("--iters 7000", "7,000 +"), ("--iters 4000", "4,000 steps"),
           ("batch 16", "16 images")],
    "07": [("0.889 vs. 0.872", "0.889 vs 0.872"), ("+2.0 dB", "+2.0 dB"), ("+0.7 dB", "+0.7 dB")],
}


@pytest.mark.parametrize("number", sorted(QUOTED))
def test_quoted_numbers_are_the_model_card_s(number):
    card = (ROOT / "weights" / "MODEL_CARD.md").read_text()
    prose = " ".join(line.lstrip("# ") for kind, lines in cells(CHAPTERS[number].read_text()) if kind == "markdown"
                     for line in lines)
    for in_card, in_prose in QUOTED[number]:
        assert in_card in card, f"{in_card!r} is not in weights/MODEL_CARD.md"
        assert in_prose in prose, f"chapter {number} no longer quotes {in_prose!r}"


def test_minimal_training_loop_learns_with_the_bank_frozen(tmp_path):
    """course/train_minimal.py: eq. (5)-(9) in one screen; offline, the MSE falls and the bank does not move."""
    text = (COURSE / "train_minimal.py").read_text()
    assert len(text.splitlines()) <= 150 and all(f"eq. ({n})" in text for n in range(5, 10))
    proc = subprocess.run([sys.executable, str(COURSE / "train_minimal.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "GLEAN_FACES": "none"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = {m[1]: float(m[2]) for m in re.finditer(r"^RESULT (\S+) = (\S+)$", proc.stdout, re.M)}
    assert r["steps"] == 40 and r["mse_last5"] < 0.5 * r["mse_first5"] and r["bank_max_change"] == 0
