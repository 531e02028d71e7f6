"""train.py: both stages end to end on tiny models, exact resume, broken checkpoints and data, torchrun, banks."""
import collections
import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glean
from images import imresize
import zoo
import stylegan2
import train
from conftest import ROOT

TINY_BANK = {"style_channels": 16, "num_mlps": 2, "channel_multiplier": 1, "channel_base": 16}
TINY_GLEAN = {**TINY_BANK, "rrdb_channels": 8, "num_rrdbs": 1, "rrdb_growth_channels": 4, "decoder_channels": 8}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Synthetic photos-like images of assorted sizes and formats (no research data)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(10):
        h, w = 40 + 4 * (i % 3), 36 + 6 * (i % 2)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([np.sin(8 * xx * (i + 1)), np.cos(6 * yy), xx * yy], -1) * 100 + 128
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / (f"im{i:02d}" + (".png" if i % 2 else ".jpg")))
    return d


@pytest.fixture(scope="module")
def bank32(images, tmp_path_factory) -> Path:
    """A tiny 32 px latent bank trained for a few steps by the bank stage."""
    run = tmp_path_factory.mktemp("bank") / "run"
    assert train.main(["--stage", "bank", "--data", str(images), "--out-size", "32", "--model", json.dumps(TINY_BANK),
                       "--iters", "4", "--batch", "4", "--workers", "0", "--out", str(run), "--no-tensorboard"]) == 0
    return run / "bank.safetensors"


def glean_args(images, bank, out, *extra):
    return ["--data", str(images), "--out-size", "32", "--scale", "4", "--model", json.dumps(TINY_GLEAN),
            "--bank", str(bank), "--percep-weight", "0", "--batch", "2", "--workers", "0", "--log-every", "1",
            "--out", str(out), "--no-tensorboard", *extra]


def metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/g" in r}


def test_bank_stage(images, tmp_path):
    run = tmp_path / "run"
    assert train.main(["--stage", "bank", "--data", str(images), "--out-size", "16", "--model", json.dumps(TINY_BANK),
                       "--iters", "6", "--batch", "4", "--reg-every", "3", "--workers", "1", "--log-every", "2",
                       "--val-every", "3", "--ckpt-every", "3", "--out", str(run)]) == 0
    assert [p.name for p in train.checkpoints(run)] == ["step_00000003.pt", "step_00000006.pt"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and "loss/r1" in rows[2]
    assert any((run / "tb").iterdir())
    G = stylegan2.load_generator(run / "bank.safetensors")          # the EMA generator, in this project's bank format
    assert G.cfg.out_size == 16 and G.sample(2, seed=0).shape == (2, 3, 16, 16)
    ckpt = torch.load(train.checkpoints(run)[-1], weights_only=True)  # plain data only
    assert ckpt["step"] == 6 and set(ckpt) >= {"g", "d", "g_ema", "opt_g", "opt_d", "rng", "config"}


def test_glean_stage_with_validation_perceptual_loss_and_a_corrupt_file(images, bank32, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for p in images.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    vgg = tmp_path / "vgg16_features.pt"  # only the layers up to conv4_3 (random here: ImageNet ones are a download)
    torch.save({f"features.{k}": v for k, v in torchvision_vgg_features().items()}, vgg)
    run = tmp_path / "run"
    assert train.main(glean_args(data, bank32, run, "--iters", "4", "--percep-weight", "0.01", "--vgg-weights",
                                 str(vgg), "--val-data", str(images), "--val-count", "2", "--val-every", "2")) == 0
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "broken.png" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/psnr"] for r in rows if "val/psnr" in r]
    assert all(r["loss/percep"] > 0 for r in rows if "loss/percep" in r)
    model = zoo.load_pretrained(train.checkpoints(run)[-1])     # a training checkpoint is a usable model
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    final = zoo.load_pretrained(run / "glean.safetensors")      # and so is the finished run's model file
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=0)


def torchvision_vgg_features():
    import torchvision
    return torchvision.models.vgg16().features[:22].state_dict()


def test_corrupt_file_is_named(images, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.png").write_bytes((images / "im01.png").read_bytes())
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    ds = train.SRDataset(data, 32, 8)
    for i in range(len(ds)):
        assert ds[(i, 0)]["lr"].shape == (3, 8, 8)
    assert "broken.jpg" in capsys.readouterr().err


def test_overfitting_a_tiny_batch(images, bank32, tmp_path):
    """Two images, no adversarial term, larger lr: the fidelity loss must fall clearly."""
    data = tmp_path / "two"
    data.mkdir()
    for name in ("im01.png", "im03.png"):
        (data / name).write_bytes((images / name).read_bytes())
    run = tmp_path / "run"
    assert train.main(glean_args(data, bank32, run, "--iters", "60", "--gan-weight", "0", "--lr", "2e-3",
                                 "--min-lr", "2e-3")) == 0
    m = metrics(run)
    first, last = np.mean([m[s]["loss/mse"] for s in (1, 2, 3)]), np.mean([m[s]["loss/mse"] for s in (58, 59, 60)])
    assert last < 0.3 * first, (first, last)
    # the latent bank is bit-identical to the file it came from
    bank = stylegan2.load_generator(bank32).state_dict()
    trained = torch.load(train.checkpoints(run)[-1], weights_only=True)["model"]
    for k, v in bank.items():
        assert torch.equal(trained[f"bank.{k}"], v), k


def run_cli(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def test_resume_after_sigterm_equals_uninterrupted(images, bank32, tmp_path):
    steps = ["--iters", "12", "--ckpt-every", "100"]
    full = tmp_path / "full"
    assert train.main(glean_args(images, bank32, full, *steps)) == 0
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *glean_args(images, bank32, part, *steps)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((part / "metrics.jsonl").exists() and
                                          len((part / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped at step" in out
    stopped = train.checkpoints(part)[-1]
    k = torch.load(stopped, weights_only=True)["step"]
    assert 3 <= k < 12, "interrupt came too late to test a resume"
    assert train.main(["--out", str(part), "--resume", "--data", "ignored", "--workers", "0"]) == 0
    a, b = metrics(full), metrics(part)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        for key in ("loss/mse", "loss/gen", "loss/d", "lr"):
            assert a[s][key] == pytest.approx(b[s][key], rel=1e-5, abs=1e-7), (s, key)
    wa = torch.load(train.checkpoints(full)[-1], weights_only=True)["model"]
    wb = torch.load(train.checkpoints(part)[-1], weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_truncated_checkpoint_is_skipped(images, bank32, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "4", "--ckpt-every", "2")) == 0
    newest = train.checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])      # as if killed while copying
    state, path = train.latest_checkpoint(run)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert "step_00000004.pt" in capsys.readouterr().err
    assert train.main(["--out", str(run), "--resume", "--data", "x", "--workers", "0", "--iters", "6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(train.checkpoints(run)[-1], weights_only=True)["step"] == 6


def test_nonfinite_loss_stops_with_debug_state(images, bank32, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="non-finite loss at step"):
        train.main(glean_args(images, bank32, run, "--iters", "30", "--lr", "1e30", "--min-lr", "1e30"))
    debug = list(run.glob("nonfinite_step_*.pt"))
    assert debug and {"lr", "hr", "model", "losses"} <= set(torch.load(debug[0], weights_only=True))


def test_two_process_torchrun_gives_identical_weights(images, bank32, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port", "29533",
           str(ROOT / "train.py"), *glean_args(images, bank32, run, "--iters", "3")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "weights identical on all 2 processes" in p.stdout
    assert torch.load(train.checkpoints(run)[-1], weights_only=True)["step"] == 3


@pytest.mark.parametrize("args,message", [
    (["--data", "ffhq", "--scale", "16"], "dataset 'ffhq' not found"),
    (["--data", "ffhq", "--scale", "4"], "preset 'ffhq' has scales"),
    (["--data", "no/such/folder", "--out-size", "32", "--scale", "4"], "must be a preset"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    p = run_cli([*args, "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_bank_and_existing_run(images, bank32, tmp_path):
    p = run_cli(glean_args(images, tmp_path / "nope.pt", tmp_path / "r1", "--iters", "1"))
    assert p.returncode == 2 and "neither a registered model" in p.stderr
    run = tmp_path / "r2"
    assert train.main(glean_args(images, bank32, run, "--iters", "1")) == 0
    p = run_cli(glean_args(images, bank32, run, "--iters", "1"))
    assert p.returncode == 2 and "--resume" in p.stderr


def test_dataset_and_sampler_are_deterministic(images, tmp_path):
    ds = train.SRDataset(images, 32, 8, seed=3)
    a, b = ds[(4, 7)], ds[(4, 7)]
    assert torch.equal(a["lr"], b["lr"]) and a["hr"].shape == (3, 32, 32) and a["hr"].abs().max() <= 1
    expected = imresize((a["hr"] + 1) / 2, size=8) * 2 - 1                # LR = MATLAB bicubic of the HR
    torch.testing.assert_close(a["lr"], expected, atol=1e-6, rtol=0)
    whole = train.BatchStream(len(ds), 3, 0, 1, seed=1)
    it = iter(whole)
    seq = [next(it) for _ in range(7)]
    resumed = iter(train.BatchStream(len(ds), 3, 0, 1, seed=1, start_micro=4))
    assert [next(resumed) for _ in range(3)] == seq[4:]
    ranks = [iter(train.BatchStream(len(ds), 3, r, 2, seed=1)) for r in range(2)]
    first = [next(r) for r in ranks]
    assert not set(first[0]) & set(first[1])                                    # ranks see different images
    deg = train.SRDataset(images, 32, 8, degrade=True)[(0, 0)]["lr"]
    assert deg.shape == (3, 8, 8) and not torch.equal(deg, ds[(0, 0)]["lr"])
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for p in images.iterdir():
        Image.new("RGB", (8, 8), (10, 200, 30)).save(lr_dir / (p.stem + ".png"))
    paired = train.SRDataset(images, 32, 8, lr_dir=str(lr_dir), flip=False)[(0, 0)]["lr"]
    torch.testing.assert_close(paired[:, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1)


def test_losses_follow_their_equations():
    logits = torch.tensor([[-2.0], [0.5], [3.0]])
    D = torch.sigmoid(logits)
    torch.testing.assert_close(train.generator_adv_loss(logits), -torch.log(D).mean())
    real, fake = torch.tensor([[1.5], [-0.2]]), torch.tensor([[0.3], [-1.0]])
    expected = -(torch.log(1 - torch.sigmoid(fake)) + torch.log(torch.sigmoid(real))).mean()
    torch.testing.assert_close(train.discriminator_loss(real, fake), expected)
    y = torch.rand(2, 3, 4, 4)
    assert train.pixel_loss(y + 0.5, y) == pytest.approx(0.25)
    cfg = train.TrainConfig()
    assert float(train.glean_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), cfg)) == \
        pytest.approx(1 + 0.01 * 2 + 0.01 * 3)


# ----------------------------------------------------------------------------------------------------------
# Latent banks from other code bases


def rosinality_state(G) -> dict:
    """Our generator's weights under rosinality/stylegan2-pytorch's names."""
    out = {}
    for k, v in G.state_dict().items():
        k = k.replace("style_mapping.", "style.").replace("constant_input.input", "input.input")
        k = k.replace(".style_modulation.", ".modulation.").replace(".noise_injector.", ".noise.")
        k = k.replace("injected_noise_", "noises.noise_")
        out[k] = v
    return out


def tiny_generator(res=32, seed=0):
    torch.manual_seed(seed)
    G = stylegan2.Generator(stylegan2.GeneratorConfig(out_size=res, **TINY_BANK)).eval()
    for m in G.modules():
        if isinstance(m, stylegan2.NoiseInjection):
            m.weight.data.normal_()
    return G


def same_images(G1, G2):
    z = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(G1(z, noise="const"), G2(z, noise="const"), atol=1e-5, rtol=1e-5)


def test_rosinality_checkpoint(tmp_path):
    import argparse
    G = tiny_generator()
    path = tmp_path / "550000.pt"  # like rosinality's: with an argparse Namespace that weights_only refuses
    torch.save({"g": rosinality_state(G), "g_ema": rosinality_state(G), "d": {}, "args": argparse.Namespace(size=32)},
               path)
    same_images(stylegan2.load_generator(path), G)
    model = glean.GLEAN(glean.GLEANConfig(in_size=8, out_size=32, **TINY_GLEAN))
    model.load_bank(path)
    same_images(model.bank, G)


@contextlib.contextmanager
def fake_persistence():
    """A stand-in for NVIDIA's torch_utils.persistence: its loader execs the source code stored in the pickle."""
    import types
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"])

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = types.ModuleType("torch_utils"), fake
    try:
        yield _reconstruct_persistent_obj
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]


def ada_pickle(G, path: Path, marker: Path):
    """A file shaped like NVIDIA stylegan2-ada's network pickle: persistent classes that carry their source code
    (here: code that would create `marker`) and rebuild themselves from it when unpickled normally."""
    with fake_persistence() as reconstruct:
        _write_ada_pickle(G, path, marker, reconstruct)


def _write_ada_pickle(G, path, marker, _reconstruct_persistent_obj):
    class Persistent:
        def __init__(self, name, params=None, buffers=None, modules=None):
            self.meta = {"type": "class", "version": 4, "class_name": name,
                         "module_src": f"open({str(marker)!r}, 'w').write('pwned')",
                         "state": {"training": False, "_parameters": collections.OrderedDict(params or {}),
                                   "_buffers": collections.OrderedDict(buffers or {}),
                                   "_modules": collections.OrderedDict(modules or {})}}

        def __reduce__(self):
            return _reconstruct_persistent_obj, (self.meta,)

    sd = G.state_dict()
    P = lambda t: torch.nn.Parameter(t.clone())  # noqa: E731
    f = stylegan2.make_kernel([1, 3, 3, 1])

    def layer(name, noise):
        return Persistent("SynthesisLayer", {"weight": P(sd[f"{name}.conv.weight"][0]),
                                             "bias": P(sd[f"{name}.activate.bias"]),
                                             "noise_strength": P(sd[f"{name}.noise_injector.weight"][0])},
                          {"resample_filter": f, "noise_const": sd[f"injected_noise_{noise}"][0, 0]},
                          {"affine": Persistent("FC", {"weight": P(sd[f"{name}.conv.style_modulation.weight"]),
                                                       "bias": P(sd[f"{name}.conv.style_modulation.bias"])})})

    def torgb(name):
        return Persistent("ToRGBLayer", {"weight": P(sd[f"{name}.conv.weight"][0]),
                                         "bias": P(sd[f"{name}.bias"].flatten())},
                          {}, {"affine": Persistent("FC", {"weight": P(sd[f"{name}.conv.style_modulation.weight"]),
                                                           "bias": P(sd[f"{name}.conv.style_modulation.bias"])})})

    blocks = {"b4": Persistent("SynthesisBlock", {"const": P(sd["constant_input.input"][0])}, {"resample_filter": f},
                               {"conv1": layer("conv1", 0), "torgb": torgb("to_rgb1")})}
    for k, res in enumerate(G.resolutions):
        blocks[f"b{res}"] = Persistent("SynthesisBlock", {}, {"resample_filter": f},
                                       {"conv0": layer(f"convs.{2 * k}", 2 * k + 1),
                                        "conv1": layer(f"convs.{2 * k + 1}", 2 * k + 2),
                                        "torgb": torgb(f"to_rgbs.{k}")})
    fcs = {f"fc{i}": Persistent("FC", {"weight": P(sd[f"style_mapping.{i + 1}.weight"]),
                                       "bias": P(sd[f"style_mapping.{i + 1}.bias"])}) for i in range(2)}
    mapping = Persistent("MappingNetwork", {}, {"w_avg": torch.zeros(16)}, fcs)
    G_ema = Persistent("Generator", {}, {}, {"mapping": mapping, "synthesis": Persistent("SynthesisNetwork", {}, {},
                                                                                         blocks)})
    with open(path, "wb") as fh:
        pickle.dump({"G": G_ema, "D": None, "G_ema": G_ema, "training_set_kwargs": {"resolution": 32}}, fh)


def test_stylegan2_ada_pickle_never_runs_its_code(tmp_path):
    G = tiny_generator(seed=3)
    path, marker = tmp_path / "network-snapshot.pkl", tmp_path / "pwned"
    ada_pickle(G, path, marker)
    loaded = stylegan2.load_generator(path)
    assert not marker.exists(), "code embedded in the pickle was run"
    same_images(loaded, G)
    with fake_persistence():            # plain pickle with NVIDIA's code importable would run the payload
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_lpips_from_local_files(tmp_path):
    """LPIPS runs from local weight files only; here random AlexNet and heads (the real ones are a download)."""
    import torchvision
    from evaluate import LPIPS
    alex = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), alex)
    heads = tmp_path / "alex.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])},
               heads)
    metric, why = LPIPS.load(str(alex), str(heads))
    assert metric is not None, why
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    d = metric(x, y)
    assert d.shape == (2,) and (d > 0).all() and torch.equal(metric(x, x), torch.zeros(2))
    assert LPIPS.load(str(tmp_path / "missing.pth"), str(heads))[0] is None


def test_resume_with_more_iters_stretches_the_cosine():
    """--resume --iters N: the learning rate follows the cosine over N steps from where the run stopped."""
    cfg = train.TrainConfig(iters=10, lr=1e-3, min_lr=1e-6)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.lr)
    sched = train.cosine(opt, cfg)
    for _ in range(10):
        opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.min_lr)
    cfg.iters = 40
    train.stretch_schedule(sched, opt, cfg)
    expected = [cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / 40)) / 2 for t in range(10, 41)]
    got = [opt.param_groups[0]["lr"]]
    for _ in range(30):
        opt.step(), sched.step()
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_crop_box_and_its_jitter(images):
    """--crop takes the given square of each image; --crop-jitter moves and scales it per (image, epoch), inside."""
    hr = train.SRDataset(images, 32, flip=False, crop=(2, 3, 30))[(1, 0)]["hr"]
    whole = train.read_rgb(sorted(images.iterdir())[1])
    torch.testing.assert_close(hr, imresize(whole[:, 3:33, 2:32], size=32).clamp(0, 1) * 2 - 1)
    assert not torch.allclose(hr, train.SRDataset(images, 32, flip=False)[(1, 0)]["hr"])   # not the centre square
    g = torch.Generator().manual_seed(0)
    boxes = {train.jitter_box((2, 3, 30), 40, 36, 0.2, g) for _ in range(200)}
    assert len(boxes) > 50
    for left, top, s in boxes:
        assert 24 <= s <= 36 and left >= 0 and top >= 0 and left + s <= 36 and top + s <= 40
    jit = train.SRDataset(images, 32, flip=False, crop=(2, 3, 30), crop_jitter=0.1)
    assert torch.equal(jit[(1, 5)]["hr"], jit[(1, 5)]["hr"])                     # reproducible per (index, epoch)
    assert not torch.equal(jit[(1, 5)]["hr"], jit[(1, 6)]["hr"])
    with pytest.raises(train.UserError, match="does not fit in im00"):    # at construction, not in a worker
        train.SRDataset(images, 32, crop=(10, 0, 40))


def test_init_fine_tunes_from_a_trained_glean(images, bank32, tmp_path):
    """--init starts from a trained GLEAN's weights, config and bank (lr 0 keeps them exactly); errors are clear."""
    first = tmp_path / "first"
    assert train.main(glean_args(images, bank32, first, "--iters", "1")) == 0
    trained = glean.GLEAN.load(first / "glean.safetensors")
    tuned = tmp_path / "tuned"
    base = ["--data", str(images), "--init", str(first / "glean.safetensors"), "--percep-weight", "0",
            "--gan-weight", "0", "--batch", "2", "--workers", "0", "--no-tensorboard", "--out", str(tuned)]
    assert train.main([*base, "--iters", "1", "--lr", "0", "--min-lr", "0", "--crop", "0", "0", "36"]) == 0
    after = glean.GLEAN.load(tuned / "glean.safetensors")
    assert after.cfg == trained.cfg
    for (k, a), b in zip(trained.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), k
    assert train.main(["--out", str(tuned), "--resume", "--data", str(images), "--iters", "2"]) == 0
    for extra, message in ((["--model", json.dumps(TINY_GLEAN)], "drop --model"),
                           (["--scale", "8"], "is a 4x model to 32 px"),
                           (["--crop", "0", "0", "99", "--workers", "1"], "does not fit in im00"),
                           (["--crop", "0", "-1", "20"], "LEFT, TOP >= 0"),
                           (["--crop-jitter", "-0.1"], "0 <= it < 0.5")):
        p = run_cli([*base[:-1], str(tmp_path / "bad"), *extra])
        assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
