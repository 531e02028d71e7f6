"""batch.py on a real Ray instance: infer.py's outputs byte for byte, a manifest that resumes, a killed worker, and
a two-node cluster (ray.cluster_utils.Cluster on localhost)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, save_tiny_model

pytest.importorskip("ray.data")

import batch  # noqa: E402
import glean_fast  # noqa: E402
import infer  # noqa: E402

LFW = ROOT.parent / "shared" / "data" / "lfw_val_250" / "images"


def run_batch(*args, timeout=240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    return subprocess.run([sys.executable, str(ROOT / "batch.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def manifest(out: Path) -> list:
    return [json.loads(line) for line in (out / "batch_manifest.jsonl").read_text().splitlines()]


def outputs(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != "batch_manifest.jsonl"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A few LFW photos (or, without the data, random pictures) in a folder with a subfolder, a same-named file in
    both, a greyscale PNG with alpha, and a file that is not an image."""
    src = tmp_path_factory.mktemp("photos")
    (src / "sub").mkdir()
    found = sorted(LFW.glob("*.jpg"))[:3]
    rng = np.random.default_rng(0)
    for i in range(3):
        if found:
            shutil.copyfile(found[i], src / found[i].name)
        else:
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(src / f"p{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (8, 8, 2), dtype=np.uint8), "LA").save(src / "sub" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (20, 12, 3), dtype=np.uint8)).save(src / "sub" / "grey.jpg")
    (src / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    return src


def test_same_outputs_as_infer_then_resume_and_a_list(photos, tmp_path):
    # fp32: a batch's outputs are those of its images one at a time, however the images are grouped
    fp32 = ["--batch", "2", "--precision", "fp32"]
    assert infer.main(["-i", str(photos), "-o", str(tmp_path / "infer"), *fp32]) == 1   # broken.jpg
    r = run_batch("-i", photos, "-o", tmp_path / "batch", *fp32)
    assert r.returncode == 1, r.stderr
    assert "broken.jpg" in r.stderr and "6/6 files" in r.stderr
    expected = outputs(tmp_path / "infer")
    assert len(expected) == 5 and outputs(tmp_path / "batch") == expected
    rows = manifest(tmp_path / "batch")
    assert sorted(r["status"] for r in rows) == ["done"] * 5 + ["failed"]
    assert all(r["model_sha256"] and r["size"] == os.path.getsize(r["input"]) for r in rows)
    assert {r["precision"] for r in rows} == {"fp32"} and "precision: fp32" in r.stderr
    assert [r["error"] for r in rows if r["status"] == "failed"][0].startswith(str(photos / "sub" / "broken.jpg"))
    # a second run recomputes nothing that is done (only the broken file is tried again)...
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "batch").rglob("*_glean.*")}
    r = run_batch("-i", photos, "-o", tmp_path / "batch", *fp32)
    assert r.returncode == 1 and "5 of 6 image(s) done by an earlier run" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes and len(manifest(tmp_path / "batch")) == 7
    # ... but an input changed since is redone
    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(photos / "sub" / "grey.jpg")
    r = run_batch("-i", photos, "-o", tmp_path / "batch", *fp32)
    assert "4 of 6 image(s) done by an earlier run" in r.stderr
    # a text file listing paths: outputs flat, as infer.py gives files by name (same names get distinct outputs)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted(photos.rglob("grey.*"))) + "\n")
    # (the default precision, auto, as infer.py resolves it: in bf16 the pixels agree up to bf16 rounding, since
    # the workers' batches group an image's tiles differently from infer.py's --batch 1)
    assert run_batch("-i", listing, "-o", tmp_path / "listed").returncode == 0
    assert infer.main(["-i", *map(str, sorted(photos.rglob("grey.*"))), "-o", str(tmp_path / "infer2")]) == 0
    listed, expected = outputs(tmp_path / "listed"), outputs(tmp_path / "infer2")
    assert sorted(listed) == sorted(expected) and len(listed) == 2
    auto = glean_fast.choose_precision("auto", torch.device("cpu"))[0]
    assert {r["precision"] for r in manifest(tmp_path / "listed")} == {auto}
    for name in listed:
        a, b = (np.asarray(Image.open(d / name), dtype=np.int16) for d in (tmp_path / "listed", tmp_path / "infer2"))
        d = np.abs(a - b)                                    # (JPEG re-encoding spreads a 1-2/255 change)
        assert a.shape == b.shape and d.max() <= (0 if auto == "fp32" else 3 if name.suffix == ".png" else 8)
        assert d.mean() <= (0 if auto == "fp32" else 1)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A model slow enough (32 -> 256) that a run of a few dozen images can be interrupted."""
    return save_tiny_model(tmp_path_factory, 32, 256, "m32.safetensors")


def test_a_killed_worker_is_replaced_and_every_output_is_written_once(slow_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(src / f"{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "batch.py"), "-i", str(src), "-o", str(out), "-m", str(slow_model),
           "--batch", "1", "--workers", "1"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline, killed = time.time() + 180, None
    while killed is None and time.time() < deadline and job.poll() is None:
        log = out / "batch_manifest.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if rows:
            killed = int(rows[0]["worker"].rsplit(":", 1)[1])
            os.kill(killed, signal.SIGKILL)                  # the model worker, mid-run
        time.sleep(0.05)
    stdout, stderr = job.communicate(timeout=240)
    assert killed is not None, "the run ended before a worker could be killed"
    assert job.returncode == 0, stderr
    rows = manifest(out)
    assert len(rows) < 30 or len({r["worker"] for r in rows}) == 2, "the run was over before the kill"
    assert sorted(r["input"] for r in rows) == sorted(str(p) for p in src.glob("*.png"))   # each once
    assert all(r["status"] == "done" for r in rows)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i:02d}_glean.png" for i in range(30)] +
                                                           ["batch_manifest.jsonl"])   # no partial file left


def test_two_node_cluster(photos, tmp_path):
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        r = run_batch("-i", photos, "-o", tmp_path / "batch", "--address", cluster.address, "--batch", "1")
        assert r.returncode == 1 and "on 2 worker(s)" in r.stderr, r.stderr    # default: a worker per machine
        assert infer.main(["-i", str(photos), "-o", str(tmp_path / "infer")]) == 1
        assert outputs(tmp_path / "batch") == outputs(tmp_path / "infer")
        rows = manifest(tmp_path / "batch")
        assert len(rows) == 6
        assert len({r["node"] for r in rows}) == 2, rows                     # both machines did work
    finally:
        cluster.shutdown()


def test_workers_that_cannot_start_are_one_line(photos, tmp_path):
    r = run_batch("-i", photos, "-o", tmp_path / "out", "--workers", "8", "--start-timeout", "5")
    assert r.returncode == 2, r.stderr                                   # 8 x 0.5 CPU do not fit this machine
    assert r.stderr.strip().splitlines()[-1].startswith("error: the cluster did not start 8 worker(s)"), r.stderr
    assert "Traceback" not in r.stderr and not list((tmp_path / "out").glob("*_glean.*"))


def test_bad_arguments_are_one_line(tmp_path):
    r = run_batch("-i", tmp_path / "nothing", "-o", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip() == f"error: -i {tmp_path / 'nothing'}: no such file or folder"
    (tmp_path / "x.png").write_bytes(b"")
    r = run_batch("-i", tmp_path, "-o", tmp_path / "out", "-m", "no_such_model")
    assert r.returncode == 2 and "unknown model 'no_such_model'" in r.stderr


def test_a_file_done_in_another_precision_is_done_again(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    (tmp_path / "a_glean.png").write_bytes(b"x")
    st = os.stat(src)
    row = {"input": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "output": str(tmp_path / "a_glean.png"),
           "model_sha256": "abc", "precision": "bf16", "status": "done"}
    assert batch.is_done(row, str(src), "abc", "bf16")
    assert not batch.is_done(row, str(src), "abc", "fp32") and not batch.is_done(row, str(src), "abd", "bf16")
    del row["precision"]                                     # a manifest from before --precision: fp32
    assert batch.is_done(row, str(src), "abc", "fp32") and not batch.is_done(row, str(src), "abc", "bf16")
