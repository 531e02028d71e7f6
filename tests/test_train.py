"""train.py: both stages end to end on tiny models, exact resume, broken checkpoints and data, torchrun, banks."""
import collections
import contextlib
import json
import math
import multiprocessing
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
import images as images_module
import train
import train_cli
import train_data
import train_run
import weight_formats
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
    assert [p.name for p in train_run.checkpoints(run)] == ["step_00000003.pt", "step_00000006.pt"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and "loss/r1" in rows[2]
    assert any((run / "tb").iterdir())
    G = weight_formats.load_generator(run / "bank.safetensors")          # the EMA generator, in our bank format
    assert G.cfg.out_size == 16 and G.sample(2, seed=0).shape == (2, 3, 16, 16)
    ckpt = torch.load(train_run.checkpoints(run)[-1], weights_only=True)  # plain data only
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
    model = zoo.load_pretrained(train_run.checkpoints(run)[-1])     # a training checkpoint is a usable model
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
    ds = train_data.SRDataset(data, 32, 8)
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
    bank = weight_formats.load_generator(bank32).state_dict()
    trained = torch.load(train_run.checkpoints(run)[-1], weights_only=True)["model"]
    for k, v in bank.items():
        assert torch.equal(trained[f"bank.{k}"], v), k


def run_cli(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, **kw)


def rows(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for_rows(run: Path, n: int, proc, timeout=120):
    """Wait until the run has logged n metric rows (or its process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (
            (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= n):
        time.sleep(0.05)


def same_run(a: Path, b: Path, steps: int, keys=("loss/mse", "loss/gen", "loss/d", "lr")):
    """Two runs logged the same losses at every step and ended with the same weights."""
    ma, mb = metrics(a), metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, steps + 1))
    for s in ma:
        for key in keys:
            assert ma[s][key] == pytest.approx(mb[s][key], rel=1e-5, abs=1e-7), (s, key)
    wa = torch.load(train_run.checkpoints(a)[-1], weights_only=True)["model"]
    wb = torch.load(train_run.checkpoints(b)[-1], weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_resume_after_sigterm_equals_uninterrupted(images, bank32, tmp_path):
    """SIGTERM to the whole process group (as batch schedulers send it), DataLoader workers included: the run saves
    and exits 0; resumed without --data, it logs as one run and ends as the uninterrupted one."""
    steps = ["--iters", "12", "--ckpt-every", "100"]
    full = tmp_path / "full"
    assert train.main(glean_args(images, bank32, full, *steps)) == 0
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *glean_args(images, bank32, part, *steps),
                             "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_rows(part, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped at step" in out and "killed by signal" not in err
    assert "step 2/12" in err and "images/s" in err and "ETA" in err      # progress lines without a terminal
    stopped = train_run.checkpoints(part)[-1]
    k = torch.load(stopped, weights_only=True)["step"]
    assert 3 <= k < 12, "interrupt came too late to test a resume"
    with open(part / "metrics.jsonl", "a") as f:                # rows logged after the checkpoint, and a cut line
        f.write(json.dumps({"step": k + 1, "loss/g": 9.0, "time": 0.1}) + '\n{"step": ')
    assert train.main(["--out", str(part), "--resume", "--workers", "0"]) == 0
    same_run(full, part, 12)
    logged = rows(part)
    assert [r["step"] for r in logged] == list(range(1, 13))                  # one run: no duplicate steps,
    times = [r["time"] for r in logged]
    assert times == sorted(times) and times[k] >= times[k - 1]               # and the wall time goes on


def test_logger_continues_after_a_resume(tmp_path):
    """TensorBoard and metrics.jsonl of a resumed run read as one run: what was logged after the checkpoint is
    dropped, the time goes on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg, env = train.TrainConfig(iters=10), train_run.Env(0, 1, torch.device("cpu"))
    log = train_run.Logger(tmp_path, cfg, env, start=0)
    for step in range(1, 6):
        log.scalars(step, {"loss/g": float(step)})
    log.close()
    log = train_run.Logger(tmp_path, cfg, env, start=3, elapsed=100.0)            # resumed from step 3's checkpoint
    for step in range(4, 7):
        log.scalars(step, {"loss/g": 10.0 + step})
    log.close()
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6] and logged[3]["time"] >= 100
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/g")] == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]


def test_damaged_checkpoints_and_stale_partial_files(images, bank32, tmp_path, capsys):
    run = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert train.main(glean_args(images, bank32, run, "--iters", "6", "--ckpt-every", "2")) == 0
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in [*train_run.checkpoints(run), run / "glean.safetensors"])
    ckpts = train_run.checkpoints(run)
    ckpts[-1].write_bytes(b"")                                                   # zero bytes: a killed copy
    ckpts[-2].write_bytes(ckpts[-2].read_bytes()[: ckpts[-2].stat().st_size // 3])   # truncated
    partial = run / "checkpoints" / ".step_00000008.pt.x7f3k2.tmp"               # a write killed by SIGKILL
    partial.write_bytes(b"\0" * 1000)
    state, path = train_run.latest_checkpoint(run)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    err = capsys.readouterr().err
    assert "step_00000006.pt: empty file" in err and "step_00000004.pt: corrupt or truncated" in err
    assert train.main(["--out", str(run), "--resume", "--workers", "0", "--iters", "7"]) == 0
    out, err = capsys.readouterr()
    assert "resuming from" in out and "step 2" in out and ".step_00000008.pt.x7f3k2.tmp" in err
    assert not partial.exists()
    assert torch.load(train_run.checkpoints(run)[-1], weights_only=True)["step"] == 7
    text = tmp_path / "notes.pt"                                                 # a text file passed as a bank
    text.write_text("these are my notes, not a checkpoint\n" * 10)
    assert train.main(glean_args(images, text, tmp_path / "r2", "--iters", "1")) == 2
    err = capsys.readouterr().err
    assert "notes.pt is not a weights file (it holds text ('these are my notes" in err
    assert len(err.strip().splitlines()) == 1 and "pop from empty list" not in err


def test_resume_takes_new_schedule_and_refuses_other_changes(images, bank32, tmp_path, capsys):
    """--resume needs no --data; --lr / --iters / a moved --data take effect with a notice; others are refused."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "3", "--lr-period", "10")) == 0
    capsys.readouterr()
    for extra, flags in ((["--batch", "4"], "--batch"), (["--seed", "1", "--gan-weight", "0"], "--seed, --gan-weight"),
                         (["--iters", "3"], "already at step 3")):
        assert train.main(["--out", str(run), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert flags in err and len(err.strip().splitlines()) == 1, err
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in images.iterdir():
        (moved / p.name).write_bytes(p.read_bytes())
    assert train.main(["--out", str(run), "--resume", "--lr", "5e-5", "--iters", "5", "--data", str(moved),
                       "--batch", "2", "--workers", "0"]) == 0                  # --batch unchanged: accepted
    out, err = capsys.readouterr()
    assert "--lr 5e-05 (was 0.0001)" in out and f"--data {moved}" in out and "--iters 5 (was 3)" in out
    assert "not those the run started with" not in err                          # the same images, moved
    lr = {s: r["lr"] for s, r in metrics(run).items()}
    cfg = train.TrainConfig()
    for t in (4, 5):                                                            # the new cosine from step 3 on
        assert lr[t] == pytest.approx(cfg.min_lr + (5e-5 - cfg.min_lr) * (1 + math.cos(math.pi * t / 10)) / 2)
    assert lr[3] == pytest.approx(cfg.min_lr + (1e-4 - cfg.min_lr) * (1 + math.cos(math.pi * 3 / 10)) / 2)


@pytest.mark.parametrize("ckpt_every,advice", [("1000", "no checkpoint was saved before it, so start again"),
                                                 ("1", "resume from the last checkpoint (step_00000001.pt)")])
def test_nonfinite_loss_stops_with_debug_state(images, bank32, tmp_path, capsys, ckpt_every, advice):
    """The message says what can be done: resume from a checkpoint when there is one, start again when not."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "30", "--lr", "1e30", "--min-lr", "1e30",
                                 "--ckpt-every", ckpt_every)) == 1
    stderr = capsys.readouterr().err                                            # progress lines, then one error
    err = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: non-finite loss at step 2") and advice in err[0], err
    assert ("--resume --lr" in err[0]) == (ckpt_every == "1")
    assert "Traceback" not in stderr
    debug = list(run.glob("nonfinite_step_*.pt"))
    assert debug and {"lr", "hr", "model", "losses"} <= set(torch.load(debug[0], weights_only=True))


def test_check_finite_copies_nothing_for_finite_losses(tmp_path):
    env, calls = train_run.Env(0, 1, torch.device("cpu")), []
    debug = lambda: calls.append(1) or {"x": torch.zeros(1)}                      # noqa: E731
    train_run.check_finite({"loss/g": 0.5, "loss/d": 1.0}, env, tmp_path, 1, debug)
    assert calls == [] and not list(tmp_path.iterdir())
    with pytest.raises(train_run.NonFiniteLoss, match="no checkpoint was saved before it"):
        train_run.check_finite({"loss/g": float("nan")}, env, tmp_path, 2, debug)
    assert calls == [1] and (tmp_path / "nonfinite_step_00000002_rank0.pt").exists()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000001.pt").write_bytes(b"x")
    with pytest.raises(train_run.NonFiniteLoss, match=r"last checkpoint \(step_00000001.pt\).*--resume --lr"):
        train_run.check_finite({"loss/g": float("inf")}, env, tmp_path, 3, debug)


# The multi-process runs below all train the same model as this one: 1 process, global batch 4 in 2 micro-batches
# of 2 (each process of a 2-process run takes one micro-batch of 2: the same images, the same discriminator groups).
REFERENCE = ["--iters", "10", "--lr-period", "1000", "--batch", "4", "--ckpt-every", "100"]


@pytest.fixture(scope="module")
def reference(images, bank32, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(glean_args(images, bank32, run, *REFERENCE, "--accum", "2")) == 0
    return run


def torchrun(launcher: list, *args) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "train.py"), *args]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_process_torchrun_gives_identical_weights(images, bank32, reference, tmp_path):
    """Started on 1 process, resumed on 2 (a notice, no IndexError): the reference run, with losses logged over the
    whole global batch."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, *REFERENCE, "--accum", "2", "--iters", "4")) == 0
    p = subprocess.run(torchrun(["--nproc-per-node=2", "--master-port=29533"], "--out", str(run), "--resume",
                                "--iters", "10", "--accum", "1"),
                       capture_output=True, text=True, cwd=ROOT, env=TORCHRUN_ENV, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es) instead of 1" in p.stdout and "weights identical on all 2 processes" in p.stdout
    same_run(reference, run, 10)


def test_sigterm_under_torchrun_with_workers_then_resume_on_one_process(images, bank32, reference, tmp_path):
    """torchrun signals each process's group, DataLoader workers included: every process saves and exits 0 (no
    "DataLoader worker is killed"); the run resumes on 1 process (notice) and ends as the reference."""
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun(["--nproc-per-node=2", "--master-port=29534"],
                                     *glean_args(images, bank32, run, *REFERENCE, "--iters", "1000", "--workers", "1")),
                            cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_rows(run, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)                                     # as a batch scheduler does
    out, err = proc.communicate(timeout=120)
    assert "stopped at step" in out and "weights identical on all 2 processes" in out, err[-3000:]
    assert err.count("received SIGTERM") == 2 and "killed by signal" not in err
    k = torch.load(train_run.checkpoints(run)[-1], weights_only=True)["step"]
    assert 2 <= k < 10, "interrupt came too late to compare with the reference"
    assert train.main(["--out", str(run), "--resume", "--iters", "10", "--accum", "2", "--workers", "0"]) == 0
    same_run(reference, run, 10)


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
    ds = train_data.SRDataset(images, 32, 8, seed=3)
    a, b = ds[(4, 7)], ds[(4, 7)]
    assert torch.equal(a["lr"], b["lr"]) and a["hr"].shape == (3, 32, 32) and a["hr"].abs().max() <= 1
    lr = imresize((a["hr"] + 1) / 2, size=8)                              # LR = MATLAB bicubic of the HR ...
    expected = (lr.clamp(0, 1) * 255).round() / 255 * 2 - 1               # ... clipped, rounded to 8 bits
    torch.testing.assert_close(a["lr"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(lr * 2 - 1, expected, atol=1e-6)            # the rounding happened
    floats = train_data.SRDataset(images, 32, 8, seed=3, lr_float=True)[(4, 7)]["lr"]   # --lr-float: the old path
    torch.testing.assert_close(floats, lr * 2 - 1, atol=1e-6, rtol=0)
    whole = train_data.BatchStream(len(ds), 3, 0, 1, seed=1)
    it = iter(whole)
    seq = [next(it) for _ in range(7)]
    resumed = iter(train_data.BatchStream(len(ds), 3, 0, 1, seed=1, start_micro=4))
    assert [next(resumed) for _ in range(3)] == seq[4:]
    ranks = [iter(train_data.BatchStream(len(ds), 3, r, 2, seed=1)) for r in range(2)]
    first = [next(r) for r in ranks]
    assert not set(first[0]) & set(first[1])                                    # ranks see different images
    deg = train_data.SRDataset(images, 32, 8, degrade=True)[(0, 0)]["lr"]
    assert deg.shape == (3, 8, 8) and not torch.equal(deg, ds[(0, 0)]["lr"])
    levels = (deg + 1) * 127.5                                                  # degraded LR is 8-bit too
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    mild = train_data.SRDataset(images, 32, 8, degrade="mild", flip=False)
    clean = train_data.SRDataset(images, 32, 8, flip=False)
    same = [torch.equal(mild[(i, e)]["lr"], clean[(i, e)]["lr"]) for i in range(len(ds)) for e in range(8)]
    assert 0 < sum(same) < len(same)          # "mild": some inputs untouched (p = 1/8 each), most degraded
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for p in images.iterdir():
        Image.new("RGB", (8, 8), (10, 200, 30)).save(lr_dir / (p.stem + ".png"))
    paired = train_data.SRDataset(images, 32, 8, lr_dir=str(lr_dir), flip=False)[(0, 0)]["lr"]
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
    same_images(weight_formats.load_generator(path), G)
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
    loaded = weight_formats.load_generator(path)
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
    train_run.follow_schedule(sched, opt, cfg)
    expected = [cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / 40)) / 2 for t in range(10, 41)]
    got = [opt.param_groups[0]["lr"]]
    for _ in range(30):
        opt.step(), sched.step()
        got.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_crop_box_and_its_jitter(images):
    """--crop takes the given square of each image; --crop-jitter moves and scales it per (image, epoch), inside."""
    hr = train_data.SRDataset(images, 32, flip=False, crop=(2, 3, 30))[(1, 0)]["hr"]
    whole = images_module.read_rgb(sorted(images.iterdir())[1])
    torch.testing.assert_close(hr, imresize(whole[:, 3:33, 2:32], size=32).clamp(0, 1) * 2 - 1)
    assert not torch.allclose(hr, train_data.SRDataset(images, 32, flip=False)[(1, 0)]["hr"])   # not the centre square
    g = torch.Generator().manual_seed(0)
    boxes = {train_data.jitter_box((2, 3, 30), 40, 36, 0.2, g) for _ in range(200)}
    assert len(boxes) > 50
    for left, top, s in boxes:
        assert 24 <= s <= 36 and left >= 0 and top >= 0 and left + s <= 36 and top + s <= 40
    jit = train_data.SRDataset(images, 32, flip=False, crop=(2, 3, 30), crop_jitter=0.1)
    assert torch.equal(jit[(1, 5)]["hr"], jit[(1, 5)]["hr"])                     # reproducible per (index, epoch)
    assert not torch.equal(jit[(1, 5)]["hr"], jit[(1, 6)]["hr"])
    with pytest.raises(train_run.UserError, match="does not fit in im00"):    # at construction, not in a worker
        train_data.SRDataset(images, 32, crop=(10, 0, 40))


def test_init_fine_tunes_from_a_trained_glean(images, bank32, tmp_path, capsys):
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
        capsys.readouterr()                                   # in-process: the same main() and one-line errors
        assert train.main([*base[:-1], str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------------------
# The recipe (Appendix A and the official configs), and what the command line accepts


def preset_config(argv):
    """The config a command line gives after its preset is filled in (train.resolve_data)."""
    given = train_cli.parse_flags(argv, train.TrainConfig())
    cfg = train.config_from_flags(given)
    train.resolve_data(cfg, given)
    return cfg


def test_presets_follow_appendix_a_and_the_official_configs(tmp_path):
    for d in ("ffhq/images", "cat_train/GT", "CelebA-HQ/GT"):
        (tmp_path / d).mkdir(parents=True)
    expect = {("ffhq", 16): (8, False), ("ffhq", 8): (8, True), ("cat", 8): (16, False), ("cat", 16): (16, False)}
    for (name, scale), (batch, norm_img) in expect.items():
        cfg = preset_config(["--data", name, "--scale", str(scale), "--data-root", str(tmp_path)])
        assert (cfg.batch, cfg.percep_norm_img, cfg.lr_period, cfg.lr, cfg.min_lr, cfg.iters, cfg.betas) == \
            (batch, norm_img, 0, 1e-4, 1e-7, 300_000, (0.9, 0.99)), (name, scale)
    in128 = preset_config(["--data", "ffhq", "--scale", "8", "--data-root", str(tmp_path)])
    assert (in128.data, in128.more_data) == (str(tmp_path / "ffhq/images"), (str(tmp_path / "CelebA-HQ/GT"),))
    assert in128.degrade == "strong" and in128.val_data == str(tmp_path / "CelebA-HQ/GT")
    cfg = preset_config(["--data", "ffhq", "--scale", "16", "--data-root", str(tmp_path), "--batch", "16",
                         "--lr-period", "600000", "--percep-norm-img"])
    assert (cfg.batch, cfg.lr_period, cfg.percep_norm_img) == (16, 600_000, True)   # flags win over the preset
    assert cfg.more_data == ()
    # the schedules (here 1000x shorter): the released models' configs anneal over the whole run down to 1e-7,
    # mmagic 1.x's base config (T_max 600k over 300k steps) ends half way down, at ~5e-5
    for period, end in ((0, 1e-7), (600, (1e-4 + 1e-7) / 2)):
        cfg = train.TrainConfig(iters=300, lr_period=period)
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=cfg.lr)
        sched = train.cosine(opt, cfg)
        for _ in range(cfg.iters):
            opt.step(), sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(end), period


@pytest.mark.parametrize("norm_img", [False, True])
def test_perceptual_loss_is_conv4_3_and_normalises_as_the_official_option(tmp_path, norm_img):
    """VGG16 conv4_3 (features[21], the official layer '21', before its ReLU) of ImageNet-normalised images, written
    out by hand: 13 layers of conv 3x3 + ReLU with max-pools after blocks 1-3."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    sd = {f"features.{k}": v for k, v in torchvision_vgg_features().items()}
    torch.save(sd, tmp_path / "vgg.pt")
    loss = train.PerceptualLoss(str(tmp_path / "vgg.pt"), norm_img=norm_img)

    def f(t):
        t = (t + 1) / 2 if norm_img else t
        t = (t - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
            1, 3, 1, 1)
        for block in ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21)):          # conv1_1 .. conv4_3
            for i in block:
                t = F.conv2d(t, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
                if i != 21:
                    t = F.relu(t)
            if i != 21:
                t = F.max_pool2d(t, 2)
        return t

    y_hat, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    expected = ((f(y_hat) - f(y)) ** 2).mean()
    torch.testing.assert_close(loss(y_hat, y), expected, rtol=1e-4, atol=1e-6)
    assert loss.f[21].out_channels == 512 and sum(isinstance(m, torch.nn.Conv2d) for m in loss.f) == 10


def test_global_batch_is_the_same_images_for_any_split(images):
    """--batch B: each optimizer step sees the same B images however they are split over processes and --accum."""
    def step_images(world, accum, steps=5, B=4):
        b = B // (world * accum)
        streams = [iter(train_data.BatchStream(7, b, r, world, seed=2, start_micro=0)) for r in range(world)]
        return [sorted(i for _ in range(accum) for s in streams for i in next(s)) for _ in range(steps)]
    assert step_images(1, 1) == step_images(2, 1) == step_images(1, 2) == step_images(2, 2) == step_images(4, 1)
    cfg = train.TrainConfig(batch=8, accum=2)
    assert train_run.micro_batch(cfg, train_run.Env(0, 2, torch.device("cpu"))) == 2
    assert [train_run.mbstd_group(n) for n in (1, 2, 3, 4, 5, 6, 8, 12)] == [1, 2, 3, 4, 1, 3, 4, 4]


def test_odd_batch_trains_and_the_model_init_is_glean_py_s(images, bank32, tmp_path):
    """--batch 6 (minibatch-stddev groups of 3) trains; train.py builds GLEAN exactly as glean.py initialises it."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "1", "--batch", "6")) == 0
    cfg = train.TrainConfig(out_size=32, scale=4, model=TINY_GLEAN, seed=5)
    torch.manual_seed(cfg.seed)
    built = train.build_glean(cfg)
    torch.manual_seed(cfg.seed)
    plain = glean.GLEAN(glean.GLEANConfig(in_size=8, out_size=32, **TINY_GLEAN))
    for (k, a), b in zip(built.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


BAD_VALUES = [(["--batch", "0"], "--batch must be at least 1, got 0"),
              (["--batch", "-1"], "--batch must be at least 1"),
              (["--batch", "3", "--accum", "2"], "--batch is the global batch"),
              (["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
              (["--log-every", "0"], "--log-every must be at least 1"),
              (["--accum", "0"], "--accum must be at least 1"),
              (["--workers", "-1"], "--workers must be at least 0"),
              (["--lr", "-1"], "--lr must be a number >= 0"),
              (["--lr", "nan"], "--lr must be a number >= 0"),
              (["--iters", "0"], "--iters must be at least 1"),
              (["--iters", "-5"], "--iters must be at least 1"),
              (["--scale", "3"], "--scale must be 4, 8, 16, 32 or 64"),
              (["--scale", "8"], "--scale leaves inputs of 4 px"),
              (["--out-size", "48"], "--out-size must be a power of two"),
              (["--lr-period", "5"], "--lr-period must be 0 (= --iters) or at least --iters"),
              (["--betas", "0.9", "1.5"], "--betas must lie in [0, 1)"),
              (["--mixing", "2"], "--mixing is a probability"),
              (["--model", '{"nope": 1}'], "--model: unknown GLEANConfig fields"),
              (["--fig7", "16"], "--model: fuse_encoder_up_to must be 0 or a power of two")]


@pytest.mark.parametrize("extra,message", BAD_VALUES)
def test_bad_values_fail_before_anything_is_built(images, tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    args = glean_args(images, tmp_path / "no-bank-needed-yet.pt", run, "--iters", "10", *extra)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()                                                    # nothing written


def test_bad_flag_types_are_one_line(images, tmp_path, capsys):
    for extra in (["--batch", "abc"], ["--model", "{not json"], ["--stage", "gan"]):
        with pytest.raises(SystemExit) as e:
            train.main(glean_args(images, tmp_path / "bank.pt", tmp_path / "run", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and extra[0] in err and len(err.strip().splitlines()) == 1, err


def test_every_option_has_help_with_its_default():
    for action in train_cli.build_parser(train.TrainConfig())._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.option_strings


def test_discriminator_comes_from_the_bank_or_init_file(images, bank32, tmp_path, capsys):
    """A bank file of --stage bank carries its discriminator; GLEAN training starts D from it (lr 0 keeps it), and
    --init from a training checkpoint takes that run's D. Each run says where D came from."""
    bank_file = glean_io_load(bank32)
    d_bank = {k[len("discriminator."):]: v for k, v in bank_file["state_dict"].items()
              if k.startswith("discriminator.")}
    assert d_bank and json.loads(bank_file["metadata"]["discriminator_config"])["in_size"] == 32
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "1", "--lr", "0", "--min-lr", "0")) == 0
    assert f"discriminator: from {bank32}" in capsys.readouterr().out
    d_run = torch.load(train_run.checkpoints(run)[-1], weights_only=True)["discriminator"]
    assert d_run.keys() == d_bank.keys() and all(torch.equal(d_run[k], d_bank[k]) for k in d_bank)
    base = ["--data", str(images), "--batch", "2", "--workers", "0", "--percep-weight", "0", "--iters", "1",
            "--no-tensorboard"]
    ckpt = train_run.checkpoints(run)[-1]
    assert train.main([*base, "--init", str(ckpt), "--out", str(tmp_path / "a")]) == 0
    assert f"discriminator: from {ckpt}" in capsys.readouterr().out
    assert train.main([*base, "--init", str(run / "glean.safetensors"), "--out", str(tmp_path / "b")]) == 0
    assert "discriminator: random init (" in capsys.readouterr().out
    assert train.main([*base, "--init", str(run / "glean.safetensors"), "--disc", str(bank32), "--out",
                       str(tmp_path / "c")]) == 0
    assert f"discriminator: from {bank32}" in capsys.readouterr().out


def glean_io_load(path):
    import glean_io
    return glean_io.load_file(path)


def test_fig7_ablation_has_no_decoder(images, bank32, tmp_path):
    """--fig7 RES: Section 5's Fig. 7 variant as the paper ran it, the bank producing the output directly."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "1", "--fig7", "0")) == 0
    model = glean.GLEAN.load(run / "glean.safetensors")
    assert model.cfg.use_decoder is False and model.cfg.fuse_encoder_up_to == 0 and not hasattr(model, "decoder")
    with pytest.raises(train_run.UserError, match="--fig7 sets use_decoder"):
        train_cli.parse_flags(["--data", "x", "--fig7", "4", "--model", '{"use_decoder": true}'], train.TrainConfig())


def test_small_and_unreadable_images_are_reported_once(images, bank32, tmp_path, capfd):
    """Images smaller than out_size: one notice with the count. A file that fails only when decoded (its header is
    fine): named once, however many workers meet it. A folder with nothing readable: one line."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("im00.jpg", "im01.png", "im03.png"):
        (data / name).write_bytes((images / name).read_bytes())
    Image.new("RGB", (20, 24), (90, 20, 50)).save(data / "small.png")
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    noise.save(data / "cut.jpg", quality=95)
    good = (data / "cut.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(good[: len(good) * 2 // 3])                 # header fine, pixels cut short
    assert images_module.image_size(data / "cut.jpg") is not None
    run = tmp_path / "run"
    assert train.main(glean_args(data, bank32, run, "--iters", "8", "--workers", "2")) == 0
    err = capfd.readouterr().err
    assert "notice: 1 of 5 images" in err and "small.png" in err and "upscaled" in err
    assert err.count("skipping unreadable image") == 1, err
    assert "cut.jpg: not a readable image (image file is truncated" in err, err
    empty = tmp_path / "unreadable"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.png").write_bytes(b"not a png")
    assert train.main(glean_args(empty, bank32, tmp_path / "r2", "--iters", "1")) == 2
    err = capfd.readouterr().err
    assert "none of the 3 image files" in err and len(err.strip().splitlines()) == 1, err
    for i in range(2):                                       # headers fine, nothing decodes: found in a worker
        (empty / f"{i}.png").unlink()
        (empty / f"{i}.jpg").write_bytes((data / "cut.jpg").read_bytes())
    (empty / "2.png").unlink()
    assert train.main(glean_args(empty, bank32, tmp_path / "r3", "--iters", "1", "--workers", "1")) == 2
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: no readable image among the 2 files"), err
    assert "Traceback" not in err
    # its workers are gone: they ignore SIGTERM, so multiprocessing's terminate() at exit could not end them
    assert not multiprocessing.active_children()


def test_two_nodes_with_c10d_rendezvous_equal_one_node(images, bank32, reference, tmp_path):
    """Two torchrun launchers on localhost as two nodes of one process each (c10d rendezvous, gloo): the same
    weights as one node with the same global batch."""
    run = tmp_path / "run"
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29535",
                "--rdzv-id=glean-test"]
    cmd = torchrun(launcher, *glean_args(images, bank32, run, *REFERENCE))
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    assert sum("weights identical on all 2 processes" in o[0] for o in outs) == 1
    same_run(reference, run, 10)


def test_bank_file_sets_the_bank_fields_and_init_takes_official_files(images, bank32, tmp_path, capsys):
    """--bank FILE: the bank's widths come from the file (no shape mismatch when --model leaves them out); a
    contradicting --model value or --out-size is one line. --init takes an official release file by path."""
    rrdb_only = {k: v for k, v in TINY_GLEAN.items() if k not in TINY_BANK}
    args = ["--data", str(images), "--scale", "4", "--model", json.dumps(rrdb_only), "--bank", str(bank32),
            "--percep-weight", "0", "--batch", "2", "--workers", "0", "--iters", "1", "--no-tensorboard"]
    assert train.main(args + ["--out", str(tmp_path / "a")]) == 0                   # out_size 32 from the bank too
    cfg = glean.GLEAN.load(tmp_path / "a" / "glean.safetensors").cfg
    assert (cfg.out_size, cfg.style_channels, cfg.channel_base) == (32, 16, 16)
    wrong = ["--model", json.dumps({**rrdb_only, "style_channels": 32})]
    assert train.main(args + wrong + ["--out", str(tmp_path / "b")]) == 2
    assert "--model style_channels=32 contradicts --bank" in capsys.readouterr().err
    assert train.main(args + ["--out-size", "64", "--out", str(tmp_path / "c")]) == 2
    assert "is a 32 px StyleGAN2, but --out-size is 64" in capsys.readouterr().err
    data = tmp_path / "data64"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    official = ROOT / "tests/data/golden_in16_out64_ckpt.pth"                        # an official release file
    assert train.main(["--data", str(data), "--init", str(official), "--percep-weight", "0", "--gan-weight", "0",
                       "--batch", "2", "--workers", "0", "--iters", "1", "--no-tensorboard",
                       "--out", str(tmp_path / "d")]) == 0
    assert glean.GLEAN.load(tmp_path / "d" / "glean.safetensors").cfg.in_size == 16


def test_bank_stage_grows_from_a_smaller_bank(images, bank32, tmp_path, capsys):
    """--stage bank --init: a 64 px bank starts from a trained 32 px one (every layer copied, the 64 px ones new)."""
    run = tmp_path / "grown"
    assert train.main(["--stage", "bank", "--data", str(images), "--out-size", "64", "--init", str(bank32),
                       "--iters", "1", "--batch", "4", "--lr", "0", "--workers", "0", "--out", str(run),
                       "--no-tensorboard"]) == 0
    assert "tensors from" in capsys.readouterr().out
    small = weight_formats.load_generator(bank32).state_dict()
    grown = weight_formats.load_generator(run / "bank.safetensors")
    assert grown.cfg.out_size == 64 and grown.cfg.channel_base == weight_formats.load_generator(bank32).cfg.channel_base
    big = grown.state_dict()
    assert all(torch.equal(big[k], v) for k, v in small.items())              # lr 0: exactly the copied layers
    assert len(big) > len(small)
    p = run_cli(["--stage", "bank", "--data", str(images), "--out-size", "16", "--init", str(bank32), "--iters", "1",
                 "--out", str(tmp_path / "r3")])
    assert p.returncode == 2 and "is smaller" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli(["--stage", "bank", "--data", str(images), "--out-size", "64", "--init", str(bank32), "--model",
                 '{"channel_base": 7}', "--iters", "1", "--out", str(tmp_path / "r4")])
    assert p.returncode == 2 and "channel_base" in p.stderr


# ----------------------------------------------------------------------------------------------------------
# Faults a real run meets: each one line, nothing lost that was saved


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_out_that_cannot_hold_a_run_is_one_line_before_anything_else(images, tmp_path, kind, monkeypatch, capsys):
    """--out a file, or on a read-only file system (/sys): refused before the data or any weights are read."""
    out = tmp_path / "a_file" if kind == "file" else Path("/sys/glean_run")
    if kind == "file":
        out.write_text("not a folder")
    touched = []
    monkeypatch.setattr(train_data, "scan", lambda *a, **k: touched.append("data"))
    monkeypatch.setattr(zoo, "weights_file", lambda *a, **k: touched.append("weights"))
    assert train.main(glean_args(images, "stylegan2_ffhq_1024", out, "--iters", "1")) == 2
    err = capsys.readouterr().err
    assert ("is a file, not a folder" if kind == "file" else "cannot write in /sys") in err, err
    assert len(err.strip().splitlines()) == 1 and touched == []


def test_data_is_checked_before_any_weights_are_read(tmp_path, monkeypatch, capsys):
    """A folder without images fails before the bank (here a registered one, a 1 GB download) is fetched or read."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    touched = []
    monkeypatch.setattr(zoo, "weights_file", lambda *a, **k: touched.append(a) or tmp_path / "x")
    monkeypatch.setattr(zoo, "load_pretrained", lambda *a, **k: touched.append(a))
    for extra in (["--bank", "stylegan2_ffhq_1024", "--scale", "16"], ["--init", "glean_face_16x"]):
        assert train.main(["--data", str(empty), *extra, "--out", str(tmp_path / "run"), "--no-tensorboard"]) == 2
        err = capsys.readouterr().err
        assert "no images" in err and str(empty) in err and len(err.strip().splitlines()) == 1, err
    assert touched == []


def test_validation_images_are_held_out_of_training(images, tmp_path):
    """--val-data pointing into the training data: the images validated on are never trained on."""
    scanned = train.scan_data(train.TrainConfig(data=str(images), val_data=str(images), val_count=3), report=False)
    val = train_data.list_images(images)[:3]
    assert len(scanned.files) == len(train_data.list_images(images)) - 3 and not set(val) & set(scanned.files)
    both = train_data.scan([images, images / "missing"] if False else [images], report=False)
    assert both.fingerprint == train_data.fingerprint(images, train_data.list_images(images))


def test_several_data_folders_train_together(images, tmp_path):
    """--data A B (the in128 preset's FFHQ + CelebA-HQ): one dataset over both folders, same names allowed."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for p in sorted(images.iterdir())[:3]:
        (a / p.name).write_bytes(p.read_bytes())
        (b / p.name).write_bytes(p.read_bytes())                                 # the same names in both
    ds = train_data.SRDataset([a, b], 32, 8)
    assert len(ds) == 6 and {p.parent for p in ds.files} == {a, b}
    assert ds.fingerprint != train_data.SRDataset(a, 32, 8).fingerprint
    with pytest.raises(train_run.UserError, match="--lr-dir pairs LR images with one folder"):
        train_data.SRDataset([a, b], 32, 8, lr_dir=str(a))


def test_a_checkpoint_altered_after_writing_is_refused_and_the_previous_one_used(images, bank32, tmp_path, capsys):
    """Bytes overwritten inside a tensor of a checkpoint that still loads (here an Adam moment set to 3.4e38): its
    checksum no longer matches, so it is named and the run resumes from the checkpoint before it."""
    import zipfile
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "4", "--ckpt-every", "2")) == 0
    newest = train_run.checkpoints(run)[-1]
    state = torch.load(newest, weights_only=True)
    k = next(k for k, v in state["opt_g"]["state"].items() if v["exp_avg"].ndim == 1)    # a bias's moment
    moment = state["opt_g"]["state"][k]["exp_avg"]
    with zipfile.ZipFile(newest) as z:                       # where that tensor's bytes are in the file
        entry = next(i for i in z.infolist() if i.filename.split("/")[-2] == "data" and
                     z.read(i) == moment.numpy().tobytes())
    with open(newest, "r+b") as f:
        f.seek(entry.header_offset + 26)                     # the local header: name and extra field lengths
        n, extra = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(entry.header_offset + 30 + n + extra)
        f.write(b"\x7f\x7f\x7f\x7f")                        # 3.4e38
    damaged = torch.load(newest, weights_only=True)["opt_g"]["state"][k]["exp_avg"]
    assert damaged.max() > 3e38                              # torch itself loads it without a word
    capsys.readouterr()
    state, path = train_run.latest_checkpoint(run)
    err = capsys.readouterr().err
    assert path.name == "step_00000002.pt" and state["step"] == 2
    assert f"{newest}: its content does not match its checksum" in err and "using step_00000002.pt" in err
    assert train.main(["--out", str(run), "--resume", "--workers", "0", "--iters", "5"]) == 0
    assert "resuming from" in capsys.readouterr().out and all(math.isfinite(r["loss/g"]) for r in rows(run))


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_earlier_checkpoint(images, bank32, tmp_path):
    """A write that fails half way (here: the file-size limit, as a full disk would) ends the run in one line,
    leaves no partial file, and the earlier checkpoint loads."""
    import resource
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "2", "--ckpt-every", "2")) == 0
    size = train_run.checkpoints(run)[-1].stat().st_size

    def limit():                                             # larger than the logs, smaller than a checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(run), "--resume", "--iters", "4",
                        "--workers", "0"], capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)
    errors = [line for line in p.stderr.splitlines() if not line.startswith("step ")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr
    assert "could not write the checkpoint of step 4" in errors[0] and "step_00000002.pt, is kept" in errors[0]
    assert "Traceback" not in p.stderr and [c.name for c in train_run.checkpoints(run)] == ["step_00000002.pt"]
    assert not [f for f in (run / "checkpoints").iterdir() if f.name.startswith(".")]      # no partial file
    assert train_run.latest_checkpoint(run)[0]["step"] == 2


def test_a_process_whose_partner_died_saves_its_replica_or_says_why_not(images, bank32, tmp_path):
    """Two processes (gloo); one is killed (SIGKILL) mid-run. The other says so in one line and exits 1: if it was
    between steps, or inside one before any update, it saves the step it had finished as a checkpoint (no
    collective needed) and the run resumes from it on one process; between the G and the D update of a step, its
    networks belong to two steps, and it says that it saves nothing."""
    run = tmp_path / "run"
    args = glean_args(images, bank32, run, "--iters", "1000", "--ckpt-every", "1000", "--workers", "0")
    env = {**TORCHRUN_ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    wait_for_rows(run, 3, procs[0])
    procs[1].kill()
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate()
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert procs[0].returncode == 1 and len(errors) == 1, err[-3000:]
    assert "process 0 lost its partner(s) (" in errors[0] and "Traceback" not in err
    saved = train_run.checkpoints(run)
    if not saved:                                            # killed between the G and the D update
        assert "so its replica is not one step's state and is not saved; the last checkpoint is none" in errors[0]
        return
    assert f"saved its replica of step {int(saved[-1].stem[5:])} as {saved[-1]}" in errors[0]
    state, _ = train_run.latest_checkpoint(run)
    assert state["step"] >= 3 and state["world"] == 2 and state["rng"][1] is None
    assert train.main(["--out", str(run), "--resume", "--iters", str(state["step"] + 1), "--workers", "0"]) == 0


def test_checkpoints_of_older_runs_resume(images, bank32, tmp_path, capsys):
    """A checkpoint as the code before checksums and --data folders wrote it (no 'checksum', no 'more_data' in its
    config) is taken as it loads, and the run continues."""
    run = tmp_path / "run"
    assert train.main(glean_args(images, bank32, run, "--iters", "2", "--ckpt-every", "2")) == 0
    path = train_run.checkpoints(run)[-1]
    state = torch.load(path, weights_only=True)
    del state["checksum"], state["config"]["more_data"]
    torch.save(state, path)
    assert train.main(["--out", str(run), "--resume", "--iters", "3", "--workers", "0"]) == 0
    assert "resuming from" in capsys.readouterr().out and "checksum" in torch.load(
        train_run.checkpoints(run)[-1], weights_only=True)
