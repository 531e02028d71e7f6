"""Odd image files and odd folders: per-call pixel limits (Pillow's process-wide one is never touched), float and
32-bit images, extreme aspect ratios in bounded memory, links, FIFOs, unreadable folders, outputs inside inputs,
inputs never overwritten, concurrent runs, partial files of killed runs. Each problem is one line; the run goes
on."""
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glean_io
import images
import infer
from conftest import ROOT
from test_robustness import picture, png_header_only, run


# -- pixel limits ------------------------------------------------------------------------------------------------


def test_pixel_limits_are_per_call_and_pillows_own_is_never_changed(tmp_path):
    """read_image checks its own limit from the header; Pillow's process-wide Image.MAX_IMAGE_PIXELS stays as it was
    while other threads read with other limits, so a bomb opened anywhere else is still refused by Pillow."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.fromarray(picture(40, 40)).save(tmp_path / "small.png")
    png_header_only(tmp_path / "bomb.png", 30000, 30000)                    # 900 million pixels, Pillow's refusal
    png_header_only(tmp_path / "between.png", 10000, 9500)                  # 95 million: Pillow would warn
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(tmp_path / "between.png").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # no warning from Pillow: our check rules
        with pytest.raises(images.InputError, match="between.png: 10000x9500 is 95 million pixels, above the limit "
                                                    "of 90 million"):
            images.read_image(tmp_path / "between.png", max_pixels=90_000_000)
        with pytest.raises(images.InputError, match="between.png: not a readable image"):   # decoded: truncated
            images.read_image(tmp_path / "between.png", max_pixels=100_000_000)
    outcomes, stop = [], threading.Event()

    def reader(max_pixels):
        while not stop.is_set():
            try:
                images.read_image(tmp_path / "small.png", max_pixels=max_pixels)
                outcomes.append((max_pixels, "read"))
            except images.InputError:
                outcomes.append((max_pixels, "refused"))
    threads = [threading.Thread(target=reader, args=(m,)) for m in (0, 1000, None, 10 ** 9)]
    for t in threads:
        t.start()
    deadline = time.time() + 2
    while time.time() < deadline:
        assert Image.MAX_IMAGE_PIXELS == limit
        with pytest.raises(Image.DecompressionBombError):                  # Pillow's own check, at every moment
            Image.open(tmp_path / "bomb.png")
    stop.set()
    for t in threads:
        t.join()
    assert {o for o in outcomes} == {(0, "read"), (1000, "refused"), (None, "read"), (10 ** 9, "read")}
    assert Image.MAX_IMAGE_PIXELS == limit


# -- sample formats ----------------------------------------------------------------------------------------------


def test_float_and_32bit_images_are_read_or_refused_in_one_line(tmp_path, model):
    rng = np.random.default_rng(0)
    unit = rng.random((6, 8)).astype(np.float32)
    deep = (rng.random((6, 8)) * 65535).astype(np.int32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    Image.fromarray(deep, "I").save(tmp_path / "deep.tif")
    Image.fromarray(deep.astype(np.uint16)).save(tmp_path / "deep16.png")
    for name, expected in (("unit.tif", unit), ("deep.tif", deep / 65535), ("deep16.png", deep / 65535)):
        a, bits = images.read_image(tmp_path / name)
        assert bits == 16 and a.shape == (6, 8, 1) and np.abs(a[..., 0] - expected).max() < 1e-6, name
    Image.fromarray(unit * 255, "F").save(tmp_path / "f255.tif")
    Image.fromarray(deep * 1000, "I").save(tmp_path / "i32.tif")
    Image.fromarray(np.full((6, 8), np.inf, np.float32), "F").save(tmp_path / "inf.tif")
    for name, match in (("f255.tif", "floating-point samples from .* to .*, outside 0-1"),
                        ("i32.tif", "32-bit integer samples from .* outside 0-65535"),
                        ("inf.tif", "floating-point samples with NaN or infinite values")):
        with pytest.raises(images.InputError, match=f"{name}: {match}") as e:
            images.read_image(tmp_path / name)
        assert "\n" not in str(e.value)
    assert np.asarray(infer.upscale(model, Image.fromarray(unit, "F"))).dtype == np.uint16   # kept at 16 bits
    with pytest.raises(infer.InputError, match="outside 0-1"):
        infer.upscale(model, Image.fromarray(unit * 255, "F"))


@pytest.mark.parametrize("image,match", [(Image.new("RGB", (0, 0)), r"empty image \(0x0"),
                                         (torch.zeros(3, 8, 8).to_sparse(), "sparse tensor"),
                                         (torch.zeros(3, 8, 8, device="meta"), "meta tensor")])
def test_empty_images_and_tensors_without_values_are_refused(model, image, match):
    with pytest.raises(infer.InputError, match=match):
        infer.upscale(model, image)


# -- resizing extreme sides --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,size", [((3, 1, 500), (8, 4000)), ((2, 37, 53), (300, 11)), ((3, 300, 2), (50, 1)),
                                        ((1, 40, 9), (13, 700)), ((3, 1, 1), (5, 7))])
def test_resizing_by_taps_equals_the_dense_matrices(monkeypatch, shape, size):
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = images.imresize(x, size=size)
    monkeypatch.setattr(images, "DENSE", 16)                           # every axis by taps, a few rows at a time
    monkeypatch.setattr(images, "BAND", 64)
    torch.testing.assert_close(images.imresize(x, size=size), dense, atol=1e-12, rtol=0)


PEAK = """
import resource, sys, numpy as np
from PIL import Image
sys.path.insert(0, {root!r})
import infer
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
d = {tmp!r}
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (1, 20000, 3), dtype=np.uint8)).save(d + "/wide.png")
Image.fromarray(rng.integers(0, 255, (20000, 1), dtype=np.uint8)).save(d + "/tall.png")
Image.fromarray(rng.integers(0, 255, (2, 9000, 4), dtype=np.uint8)).save(d + "/wide_alpha.png")
Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(d + "/warm.png")
for mode in ([], ["--faces"]):                        # warm up: model, detector, first forward pass
    infer.main(["-i", d + "/warm.png", "-o", d + "/warm", "-m", "glean_face_small_8x"] + mode)
base = rss()
for mode in ([], ["--pad"], ["--simulate"], ["--faces"], ["--faces", "--outscale", "2.5"]):
    code = infer.main(["-i", d + "/wide.png", d + "/tall.png", d + "/wide_alpha.png", "-o", d + "/out" + "".join(mode),
                       "-m", "glean_face_small_8x"] + mode)
    print("RESULT", mode, code, round(rss() - base))
"""


def test_extreme_aspect_ratios_in_every_mode_in_bounded_memory(tmp_path):
    """20000x1 and 1x20000 images (and 9000x2 with alpha) in the default mode, --pad, --simulate and --faces (at 8x
    and 2.5x): each gives its result or one line, in tens of MB (dense resize matrices took 25.6 GB with --faces, a
    padded square 5.3 GB with --pad). Peak memory measured in a fresh process (ru_maxrss) after a warm-up."""
    r = subprocess.run([sys.executable, "-c", PEAK.format(root=str(ROOT), tmp=str(tmp_path))], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    results = {line.split("]")[0] + "]": line.split("]")[1].split() for line in r.stdout.splitlines()
               if line.startswith("RESULT")}
    print(results)
    for mode, (code, grown) in results.items():
        assert int(grown) < 300, (mode, grown)                          # MB above the warmed-up process
        assert code == ("1" if "simulate" in mode else "0"), (mode, r.stderr)
    for name in ("wide", "tall", "wide_alpha"):
        assert r.stderr.count(f"error: {tmp_path}/{name}.png: ") == 1     # --simulate: no face in a 1 px strip
        for out in ("out/{}_glean", "out--pad/{}_glean", "out--faces/{}_faces"):
            with Image.open(tmp_path / f"{out.format(name)}.png") as im:
                assert min(im.size) >= 1
    with Image.open(tmp_path / "out--faces" / "wide_faces.png") as im:
        assert im.size == (160000, 8)                                       # the whole photo, 8x
    with Image.open(tmp_path / "out--faces--outscale2.5" / "tall_faces.png") as im:
        assert im.size == (3, 50000)
    with Image.open(tmp_path / "out--pad" / "wide_glean.png") as im:
        assert im.size == (64, 1)                                           # the frame's aspect, at least 1 px
    assert "20000x1 is too small to search for a face (a side under 12 px)" in r.stderr        # default, --simulate
    assert "20000x1 is smaller than the face detector's" in r.stderr                            # --faces (photos.py)


# -- folders: links, FIFOs, unreadable folders, outputs inside inputs --------------------------------------------


def test_links_fifos_and_unreadable_folders_are_named_one_line_each(model_file, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    (src / "locked").mkdir(parents=True)
    (src / "real").mkdir()
    Image.fromarray(picture(8, 8)).save(src / "ok.png")
    Image.fromarray(picture(8, 8, 1)).save(src / "real" / "x.png")
    Image.fromarray(picture(8, 8, 2)).save(src / "locked" / "hidden.png")
    (src / "broken.png").symlink_to(tmp_path / "gone.png")
    (src / "link.png").symlink_to(src / "ok.png")                       # a link to a file: followed
    (src / "folder_link").symlink_to(src / "real", target_is_directory=True)   # to a folder: not followed
    os.mkfifo(src / "pipe.png")
    os.mkfifo(tmp_path / "direct.png")
    (src / "to_pipe.png").symlink_to(src / "pipe.png")                  # a link to a FIFO: named as one
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":                                  # (as root, chmod 000 would not stop us)
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(infer.os, "scandir", scandir)
    t = time.perf_counter()
    code, summary, err = run(["-i", src, tmp_path / "direct.png", tmp_path / "missing.png", "-o", tmp_path / "out",
                              "-m", model_file], capsys)
    assert time.perf_counter() - t < 60                                  # a FIFO is never opened (it would block)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    for what in (f"{src}/broken.png: a broken link (to {tmp_path}/gone.png), not an image file",
                 f"{src}/pipe.png: a FIFO (named pipe), not an image file",
                 f"{src}/to_pipe.png: a FIFO (named pipe), not an image file",
                 f"{src}/locked: cannot read this folder (Permission denied); its images were not processed",
                 f"{tmp_path}/direct.png: a FIFO (named pipe)", f"{tmp_path}/missing.png: no such file or folder"):
        assert sum(what in line for line in lines) == 1, (what, err)
    assert len(lines) == 6 and "3 image(s) written" in summary and "6 problem(s)" in summary
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == \
        ["link_glean.png", "ok_glean.png", "real/x_glean.png"]
    with pytest.raises(images.InputError, match="direct.png: not a readable image .not a regular file"):
        images.read_image(tmp_path / "direct.png")                       # e.g. --mask: refused, not opened


def test_training_and_evaluation_name_links_and_fifos_and_go_on(tmp_path, capsys):
    import evaluate
    import train_data
    src = tmp_path / "data"
    src.mkdir()
    for i in range(2):
        Image.fromarray(picture(16, 16, i)).save(src / f"{i}.png")
    (src / "broken.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(src / "pipe.jpg")
    t = time.perf_counter()
    found = train_data.scan(src)
    assert time.perf_counter() - t < 30                                  # the FIFO is never opened
    assert [p.name for p in found.files] == ["0.png", "1.png"] and not found.bad
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: skipping {src}/broken.png: a broken link (to {tmp_path}/gone.png), not an image file",
                   f"warning: skipping {src}/pipe.jpg: a FIFO (named pipe), not an image file"], err
    assert evaluate.main(["--gt", str(src), "--gt-size", "16", "--scale", "2", "--bicubic", "--identity",
                          "none"]) == 0                                  # evaluate.py scores the two pictures
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")] == err
    train_data.scan(src, report=False)
    assert capsys.readouterr().err == ""


def test_an_output_folder_inside_the_input_folder_is_not_read_again(model_file, tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    Image.fromarray(picture(8, 8)).save(src / "a.png")
    for _ in range(2):
        code, summary, err = run(["-i", src, "-o", src / "results", "-m", model_file], capsys)
        assert code == 0 and "1 image(s) written" in summary
    assert f"{src}/results: the output folder, inside the input folder {src}: not read as input" in err
    assert sorted(p.name for p in (src / "results").iterdir()) == ["a_glean.png"]      # no a_glean_glean.png


def test_inputs_are_never_overwritten(model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(picture(8, 8, len(name))).save(src / name)
    os.link(src / "b.png", tmp_path / "b_glean.png")                    # a hard link to an input, as an output name
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, summary, err = run(["-i", src, "-o", src, "--suffix", "", "-m", model_file], capsys)
    assert code == 1 and err.count("is an input of this run, not overwritten; choose another -o or --suffix") == 2
    assert "0 image(s) written" in summary
    code, summary, err = run(["-i", src / "b.png", "-o", tmp_path, "-m", model_file], capsys)
    assert code == 1 and f"{tmp_path}/b_glean.png: is an input of this run" in err        # the same file as b.png
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


# -- several runs, killed runs -------------------------------------------------------------------------------------


def test_runs_into_one_folder_do_not_race_on_the_write_test(tmp_path):
    """Each run probes the output folder with its own file (the shared `.write-test` name failed 1 run in 18)."""
    failures, barrier = [], threading.Barrier(12)

    def probe():
        barrier.wait()
        for _ in range(30):
            try:
                infer.prepare_output(tmp_path / "out", time.time())
            except OSError as e:
                failures.append(e)
    threads = [threading.Thread(target=probe) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and list((tmp_path / "out").iterdir()) == []


def test_partial_files_of_killed_runs_are_removed_and_no_others(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()                       # a process that has exited
    old = time.time() - 3600
    stale = [out / f".x_glean.png.{gone}-abcd_123.tmp", out / "sub" / f".y_glean.jpg.{gone}-zzzzzzzz.tmp"]
    kept = [out / f".x_glean.png.{os.getpid()}-abcdefgh.tmp",           # its writer still runs (this process)
            out / ".notes.tmp", out / f".x_glean.png.{gone}-abc.tmp",   # not our pattern
            out / f".data.csv.{gone}-abcdefgh.tmp"]                     # not an image's
    for p in stale + kept:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"partial")
        os.utime(p, (old, old))
    young = out / f".z_glean.png.{gone}-abcdefgh.tmp"                   # written after the run began: not ours
    Image.fromarray(picture(8, 8)).save(tmp_path / "a.png")
    real = glean_io.remove_killed_temp

    def remove_after_young(folder, started, targets=()):
        young.write_bytes(b"new")
        os.utime(young, (started + 1, started + 1))                        # (clear of the clock's granularity)
        return real(folder, started, targets)
    infer.remove_killed_temp, saved = remove_after_young, infer.remove_killed_temp
    try:
        code, _, err = run(["-i", tmp_path / "a.png", "-o", out, "-m", model_file], capsys)
    finally:
        infer.remove_killed_temp = saved
    assert code == 0 and "removed 2 partial file(s) that killed runs left" in err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept + [young])


KILLED = """
import sys, time
sys.path.insert(0, {root!r})
import glean_io, infer
def slow_write(a, dst, bits=8):
    with glean_io.atomic_write(dst) as f:
        f.write(b"partial")
        open({marker!r}, "w").close()
        time.sleep(120)
infer.write_image = slow_write
sys.exit(infer.main(["-i", {image!r}, "-o", {out!r}, "-m", {model!r}]))
"""


def test_sigterm_leaves_no_partial_file(model_file, tmp_path):
    Image.fromarray(picture(8, 8)).save(tmp_path / "a.png")
    marker, out = tmp_path / "writing", tmp_path / "out"
    code = KILLED.format(root=str(ROOT), marker=str(marker), image=str(tmp_path / "a.png"), out=str(out),
                         model=str(model_file))
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), p.stderr.read() if p.poll() is not None else "no write began"
    assert [q.name for q in out.iterdir()][0].endswith(".tmp")            # the partial file, while it is written
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopped (SIGTERM)" in p.stderr.read() and list(out.iterdir()) == []


def test_a_name_with_a_line_break_is_one_line(model_file, tmp_path, capsys):
    (tmp_path / "bad\nname.png").write_text("not an image")
    code, _, err = run(["-i", tmp_path / "bad\nname.png", "-o", tmp_path / "o", "-m", model_file], capsys)
    assert code == 1 and err.count("\n") == 1 and "bad\\nname.png: not a readable image" in err
