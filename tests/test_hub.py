"""torch.hub entry points, loaded the way users load them (source='local'), pretrained through a file:// URL."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import glean
import images
import zoo
import glean_io
from evaluate import psnr
import stylegan2
from conftest import DATA, ROOT

ENTRIES = ["glean_cat_16x", "glean_cat_8x", "glean_face_16x", "glean_face_in128_8x", "glean_face_in16_8x",
           "glean_face_in32_4x", "glean_face_small_8x", "stylegan2_cat_256", "stylegan2_celeba_64",
           "stylegan2_ffhq_1024", "stylegan2_lfw_128"]


def test_entries_listed_and_documented():
    """What torch.hub.list reports: hubconf's public callables (hub.list itself only takes GitHub repos)."""
    hubconf = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))
    names = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert names == ENTRIES
    assert set(hubconf.dependencies) >= {"torch", "safetensors"}
    for name in names:
        doc, w = getattr(hubconf, name).__doc__, zoo.WEIGHTS[name]
        assert w.url in doc and w.license in doc and f"{w.config['out_size']}x{w.config['out_size']}" in doc


@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_loads_with_random_weights(name):
    model = torch.hub.load(str(ROOT), name, source="local", pretrained=False)
    cfg = zoo.WEIGHTS[name].config
    if name.startswith("stylegan2"):
        assert isinstance(model, stylegan2.Generator) and model.cfg.out_size == cfg["out_size"]
    else:
        assert isinstance(model, glean.GLEAN) and (model.cfg.in_size, model.cfg.out_size) == \
            (cfg["in_size"], cfg["out_size"])
    assert not model.training


def test_pretrained_through_file_url(tmp_path, monkeypatch):
    """The real download path (hub cache, sha256 check, weights_only loading) with a local copy of a small
    checkpoint in the release layout, registered in place of a released model."""
    ckpt = tmp_path / "glean_small_20260101-00000000.pth"
    ckpt.write_bytes((DATA / "golden_in16_out64_ckpt.pth").read_bytes())
    meta = json.loads((DATA / "golden_in16_out64.json").read_text())
    sha = glean_io.sha256_of(ckpt)
    config = dict(meta["constructor_kwargs"], channel_base=64)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setitem(zoo.WEIGHTS, "glean_cat_16x", dataclasses.replace(
        zoo.WEIGHTS["glean_cat_16x"], url=ckpt.as_uri(), sha256=sha[:8], config=config))
    model = torch.hub.load(str(ROOT), "glean_cat_16x", source="local", progress=False)
    io = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)
    with torch.no_grad():
        assert (model(io["input"]) - io["output"]).abs().max() <= 1e-4
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / ckpt.name
    assert cached.is_file()
    monkeypatch.setitem(zoo.WEIGHTS, "glean_cat_16x", dataclasses.replace(
        zoo.WEIGHTS["glean_cat_16x"], url=ckpt.as_uri(), sha256="0badf00d", config=config))
    with pytest.raises(glean_io.CheckpointError, match="does not start with 0badf00d"):
        torch.hub.load(str(ROOT), "glean_cat_16x", source="local", progress=False)


# -- the model that ships with the code ----------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to download fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args}")
    monkeypatch.setattr(glean_io, "download", refuse)
    monkeypatch.setattr(zoo, "download", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_shipped_weights_are_small_and_the_default(offline):
    shipped = {n: w for n, w in zoo.WEIGHTS.items() if "://" not in w.url}
    assert zoo.DEFAULT_MODEL in shipped and {"stylegan2_celeba_64", "stylegan2_lfw_128", "glean_face_in16_8x",
                                             "glean_face_in32_4x"} <= set(shipped)
    files = [zoo.weights_file(n) for n in shipped]                   # hash-checked
    assert sum(f.stat().st_size for f in files) <= 64 * 10 ** 6     # the wheel stays far below PyPI's 100 MB
    assert all(f.suffix == ".safetensors" for f in files)


def test_default_model_loads_offline_and_beats_bicubic_on_bank_faces(offline):
    """torch.hub.load('.', default, source='local') with no network; on faces drawn from its own (shipped) latent
    bank, shrunk to 8x8 with MATLAB bicubic, the 8x output is closer to the original than bicubic upscaling."""
    model = torch.hub.load(str(ROOT), zoo.DEFAULT_MODEL, source="local")
    bank = torch.hub.load(str(ROOT), "stylegan2_celeba_64", source="local")
    assert (model.cfg.in_size, model.cfg.out_size) == (8, 64)
    for k, v in bank.state_dict().items():                            # the same bank inside the GLEAN model
        torch.testing.assert_close(model.bank.state_dict()[k], v, rtol=0, atol=0)
    with torch.no_grad():
        y = bank.sample(16, seed=0, truncation=0.7).clamp(-1, 1)
        x = images.imresize(y, size=8)
        y_hat = model(x).clamp(-1, 1)
    bicubic = images.imresize(x, size=64).clamp(-1, 1)
    ours, theirs = float(psnr(y_hat, y).mean()), float(psnr(bicubic, y).mean())
    assert ours > theirs + 1.0, (ours, theirs)


def test_damaged_shipped_file_is_named(tmp_path, monkeypatch, offline):
    w = zoo.WEIGHTS[zoo.DEFAULT_MODEL]
    monkeypatch.setitem(zoo.WEIGHTS, zoo.DEFAULT_MODEL, dataclasses.replace(w, sha256="0badf00d"))
    with pytest.raises(glean_io.CheckpointError, match=f"damaged.*git checkout -- {w.url}"):
        zoo.load_pretrained(zoo.DEFAULT_MODEL)
    monkeypatch.setitem(zoo.WEIGHTS, zoo.DEFAULT_MODEL, dataclasses.replace(w, url="weights/missing.safetensors"))
    with pytest.raises(glean_io.CheckpointError, match="weights/missing.safetensors is missing"):
        zoo.load_pretrained(zoo.DEFAULT_MODEL)


def test_loading_builds_on_meta_without_torch_lazy_imports():
    """Loading the default model draws no random numbers and does no meta-tensor arithmetic: those would import
    torch._dynamo on first use (about a second of a cold start, for weights that are then overwritten)."""
    code = ("import sys, zoo; m = zoo.load_pretrained(zoo.DEFAULT_MODEL); "
            "assert not any(p.is_meta for p in m.state_dict().values()); "
            "print('torch._dynamo' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr


LFW_VAL = ROOT.parent / "shared" / "data" / "lfw_val_250" / "images"


@pytest.mark.parametrize("name", ["glean_face_in16_8x", "glean_face_in32_4x"])
def test_128px_face_models_load_offline_and_beat_bicubic(name, offline):
    """The shipped 128 px face models: torch.hub with no network; their bank is the shipped stylegan2_lfw_128; on
    faces of the validation people (whole LFW photos aligned to the models' template, never trained on; skipped
    without the research data) the output is closer to the photo than bicubic, in PSNR and in SSIM."""
    import faces
    from evaluate import ssim
    model = torch.hub.load(str(ROOT), name, source="local")
    bank = torch.hub.load(str(ROOT), "stylegan2_lfw_128", source="local")
    assert model.cfg.out_size == 128 and model.face_template == zoo.TIGHT and model.face_window
    for k, v in bank.state_dict().items():
        torch.testing.assert_close(model.bank.state_dict()[k], v, rtol=0, atol=0)
    if not LFW_VAL.is_dir():
        pytest.skip("LFW validation photos not here (research data, not in the repository)")
    detector, crops = faces.load_detector(), []
    for f in images.list_images(LFW_VAL)[:8]:
        a = images.read_rgb(f).permute(1, 2, 0).contiguous().numpy()
        face = max(detector.detect(a), key=lambda d: d.box[2] - d.box[0])
        crops.append(torch.from_numpy(faces.align(a, face.landmarks, zoo.TIGHT, 128)[0]).permute(2, 0, 1))
    y = torch.stack(crops) * 2 - 1
    x = (images.imresize(y, size=model.cfg.in_size).clamp(-1, 1) * 127.5).round() / 127.5   # 8-bit, as files are
    with torch.no_grad():
        y_hat = model(x).clamp(-1, 1)
    bicubic = images.imresize(x, size=128).clamp(-1, 1)
    assert float(psnr(y_hat, y).mean()) > float(psnr(bicubic, y).mean()) + 0.3
    assert float(ssim(y_hat, y).mean()) > float(ssim(bicubic, y).mean())
