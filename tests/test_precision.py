"""bf16 and fp16 inference (glean_fast.to_precision_, --precision): the shipped models stay within the fidelity floor
of fp32, float32 goes in and comes out, the parts that matter stay float32, every ablation and strips work, the auto
rule and its one-line messages; the reference (glean.GLEAN) and the golden case stay float32."""
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import glean
import glean_fast
import infer
import zoo
from conftest import DATA, ROOT, tiny_cfg
from test_fast import ABLATIONS, position_dependent_noise_
from test_golden import golden_model

OFFLINE = [n for n, w in zoo.WEIGHTS.items() if w.kind.startswith("glean") and zoo.local_file(n) is not None]
FLOOR_DB = 45        # the least 8-bit PSNR of a bf16 output against fp32's on a shipped model (any image)
AUTO_DB = 50         # what --precision auto asks of bf16 on every shipped model (mean over the LFW faces)


@pytest.fixture
def cpu_without(monkeypatch):
    """Simulate a CPU without the given instruction-set features (glean_fast.cpu_features)."""
    def remove(*features):
        have = glean_fast.cpu_features() - set(features)
        monkeypatch.setattr(glean_fast, "cpu_features", lambda: have)
    return remove


@pytest.mark.parametrize("precision,floor", [("bf16", FLOOR_DB), ("fp16", FLOOR_DB)])
@pytest.mark.parametrize("name", OFFLINE)
def test_shipped_models_in_half_precision_match_fp32(name, precision, floor):
    """Public-domain face crops (scikit-image's astronaut): every output >= the floor from fp32's, as 8-bit images;
    the outputs differ from fp32's (the model did run in bf16/fp16) and come out float32."""
    pytest.importorskip("skimage")
    x, _ = bench.report_faces(zoo.WEIGHTS[name].config["in_size"], 9, folder=Path("/nonexistent"))
    model = glean_fast.to_precision_(zoo.load_pretrained(name), glean_fast.PRECISIONS[precision])
    assert model.dtype == glean_fast.PRECISIONS[precision]
    y, ref = bench.outputs(model, x), bench.outputs(zoo.load_pretrained(name), x)
    r = bench.fidelity(y, ref)
    assert y.dtype == torch.float32 and r["finite"]
    assert floor <= r["psnr_min"] < float("inf"), r


@pytest.mark.skipif(not bench.LFW_FACES.is_dir(), reason="needs the LFW validation faces (../shared/data)")
@pytest.mark.parametrize("name", OFFLINE)
def test_auto_rule_holds_on_lfw(name):
    """--precision auto picks bf16 on CPUs with bf16 instructions because every shipped model stays >= 50 dB from
    fp32 on real faces (bench.py --precision-report): checked on 16 LFW validation faces."""
    x, _ = bench.report_faces(zoo.WEIGHTS[name].config["in_size"], 16)
    r = bench.precision_fidelity(partial(zoo.load_pretrained, name), x, ["bf16"])["bf16"]
    assert r["psnr_mean"] >= AUTO_DB and r["psnr_min"] >= FLOOR_DB, r


def test_a_batch_equals_single_images_up_to_bf16_rounding():
    """One image scales the weight, a batch the activations (glean_fast.modulated_conv), each rounded to bf16: the
    8-bit outputs of a batch of 8 differ from those of the same faces one at a time by at most 2/255 (in float32
    they are equal, tests/test_robustness.py)."""
    pytest.importorskip("skimage")
    x, _ = bench.report_faces(8, 8, folder=Path("/nonexistent"))
    model = glean_fast.to_precision_(zoo.load_pretrained(zoo.DEFAULT_MODEL), torch.bfloat16)
    with torch.no_grad():
        batch, single = model(x), torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    r = bench.fidelity(batch, single)
    assert 0 < r["max_diff"] <= 2 and r["psnr_min"] >= 50, r


def test_what_stays_float32():
    """Convolution weights (encoder, fusion, the bank's style convs, decoder) and E_{N+1}'s linear in bf16; the style
    affines A, the toRGB branch, fusion_skip, biases of style layers, noise and the final RGB conv in float32."""
    model = glean_fast.to_precision_(glean_fast.GLEANFast(tiny_cfg(8, 32)).eval(), torch.bfloat16)
    kept = ("style_modulation", "to_rgb", "fusion_skip", "bank.style_mapping", "noise_injector", "activate.bias",
            "constant_input", f"decoder.{len(model.decoder) - 1}.2.")
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if any(k in n for k in kept) else torch.bfloat16), n
    assert all(b.dtype == torch.float32 for b in model.buffers())
    conv = model.bank.convs[0].conv.weight[0]                           # still NHWC, as the fast path wants it
    assert conv.transpose(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert model.encoder[0][0].conv_first.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_every_ablation_and_strips_in_bf16(ablation):
    """bf16 on every ablation of test_fast (8 -> 64, batch 2), whole images and strips of rows: float32 out, within
    the floor of the float32 reference, and the strips equal to the whole image up to bf16 rounding."""
    torch.manual_seed(0)
    kw = ABLATIONS[ablation]
    ref = position_dependent_noise_(glean.GLEAN(tiny_cfg(8, 64, **(kw(64) if callable(kw) else kw))).eval())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        expected = ref(x)
        model = glean_fast.to_precision_(glean_fast.fast(ref), torch.bfloat16)
        whole = model(x)
        model.strip_elems = 3000
        strips = model(x)
    assert whole.dtype == strips.dtype == torch.float32
    assert bench.fidelity(whole, expected)["psnr_min"] >= FLOOR_DB
    torch.testing.assert_close(strips, whole, atol=1e-2, rtol=0)


def test_float32_in_and_out_whatever_the_precision(model_file):
    """infer.load_model in each precision: float32 (or any float) input, float32 output, the convolutions in the
    precision asked; fp16 runs on a CPU too (emulated: slower, for measurements)."""
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    for precision, dtype in glean_fast.PRECISIONS.items():
        model = infer.load_model(str(model_file), "cpu", precision, notes=[])
        assert model.dtype == dtype
        with torch.no_grad():
            assert model(x).dtype == model(x.double()).dtype == model(x.bfloat16()).dtype == torch.float32


def test_reference_and_golden_case_stay_float32():
    """glean.GLEAN has no precision machinery (to_precision_ refuses it); the golden case loads in float32 and,
    through infer.load_model(precision="fp32"), matches the official output as before."""
    ref = golden_model()[0]
    with pytest.raises(TypeError, match="reference GLEAN stays float32"):
        glean_fast.to_precision_(ref, torch.bfloat16)
    source = (ROOT / "glean.py").read_text()
    assert "float16" not in source and "to_precision" not in source
    assert golden_model(fast=True)[0].dtype == torch.float32
    model = infer.load_model(str(DATA / "golden_in16_out64_ckpt.pth"), "cpu", "fp32")
    io = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)
    with torch.no_grad():
        assert model.dtype == torch.float32 and (model(io["input"]) - io["output"]).abs().max() <= 1e-4


def test_auto_rule(cpu_without):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert glean_fast.choose_precision("auto", cuda) == ("fp16", "")
    assert glean_fast.choose_precision("fp32", cpu) == ("fp32", "")
    cpu_without(*glean_fast.CPU_FEATURES["bf16"])
    assert glean_fast.choose_precision("auto", cpu) == ("fp32", "")
    precision, note = glean_fast.choose_precision("bf16", cpu)
    assert precision == "bf16" and "this CPU has no bf16 instructions" in note and "\n" not in note
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        glean_fast.choose_precision("half", cpu)


@pytest.mark.parametrize("features", [{"avx512_bf16"}, {"amx_bf16", "amx_tile"}, {"bf16", "neon"}])
def test_auto_picks_bf16_on_cpus_with_bf16_instructions(monkeypatch, features):
    """AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake), AMX (Intel Sapphire Rapids+), ARM's BF16 extension."""
    monkeypatch.setattr(glean_fast, "cpu_features", lambda: features)
    assert glean_fast.choose_precision("auto", torch.device("cpu")) == ("bf16", "")


def run_cli(model_file, tmp_path, *flags) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert infer.main(["-i", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "-m", str(model_file),
                       "--device", "cpu", *flags]) == 0
    assert (tmp_path / "out" / "a_glean.png").is_file()


@pytest.mark.parametrize("features,flags,line", [
    ({"avx512_bf16"}, [], "precision: bf16 on cpu (auto: this CPU has bf16 instructions); --precision fp32 for "
                          "float32 throughout"),
    (set(), [], "precision: fp32 on cpu (auto: this CPU has no bf16 instructions)"),
    ({"avx512_bf16"}, ["--fp32"], "precision: fp32 on cpu"),
    ({"avx512_bf16"}, ["--precision", "fp32"], "precision: fp32 on cpu")])
def test_cli_says_the_precision_in_one_line(model_file, tmp_path, capsys, monkeypatch, features, flags, line):
    monkeypatch.setattr(glean_fast, "cpu_features", lambda: features)
    run_cli(model_file, tmp_path, *flags)
    out, err = capsys.readouterr()
    assert [x for x in out.splitlines() if x.startswith("precision") or "bf16" in x] == [line]
    assert "precision:" not in err and "bf16" not in err


def test_bf16_on_a_cpu_without_bf16_is_one_line(model_file, tmp_path, capsys, cpu_without):
    """Asked for explicitly, bf16 runs as asked (emulated) and one line says that this CPU has no bf16 instructions;
    from Python it is one photos.Note warning."""
    cpu_without(*glean_fast.CPU_FEATURES["bf16"])
    run_cli(model_file, tmp_path, "--precision", "bf16")
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("precision")] == [
        "precision: bf16 on cpu; --precision fp32 for float32 throughout"]
    assert [line for line in err.splitlines() if "bf16" in line] == [
        "note: this CPU has no bf16 instructions (avx512_bf16, amx_bf16, bf16): bf16 runs emulated, slower than "
        "fp32 (--precision auto picks fp32 here)"]
    import photos
    with pytest.warns(photos.Note, match="no bf16 instructions") as caught:
        model = infer.load_model(str(model_file), "cpu", "bf16")
    assert len(caught) == 1 and model.dtype == torch.bfloat16


def test_faces_mode_loads_its_models_in_the_precision(cpu_without):
    """--faces without -m (photos.py loads the face models itself): the precision reaches them; auto is resolved
    before the cache, so it follows the CPU."""
    import photos
    assert photos.load_face_model(zoo.DEFAULT_MODEL, "cpu", "fp32").dtype == torch.float32
    assert photos.load_face_model(zoo.DEFAULT_MODEL, "cpu", "bf16").dtype == torch.bfloat16
    cpu_without(*glean_fast.CPU_FEATURES["bf16"])
    assert photos.load_face_model(zoo.DEFAULT_MODEL, "cpu").dtype == torch.float32


def test_demo_precision_flag(monkeypatch, model_file, capsys):
    """demo.py --precision: one line at start, and the models it loads run in that precision."""
    demo = pytest.importorskip("demo")
    monkeypatch.setattr(demo.demo, "launch", lambda **kw: None)
    monkeypatch.setattr(demo, "_models", {})
    monkeypatch.setattr(demo, "_precision", ["auto"])
    assert demo.main(["--precision", "fp32"]) == 0
    assert capsys.readouterr() == (f"precision: fp32 on {demo.device()}\n", "")
    assert demo.get_model(str(model_file)).dtype == torch.float32
    demo._models.clear()
    demo._precision[0] = "bf16"
    assert demo.get_model(str(model_file)).dtype == torch.bfloat16
