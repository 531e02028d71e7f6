"""What users actually feed the front ends: odd files, clashing names, wrong tensors, bad devices, huge images,
unanswering servers, crafted or damaged checkpoints. Each gives one clear line, and a run goes on with the rest."""
import errno
import json
import socket
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glean
import glean_io
import images
import infer
import zoo
from conftest import DATA, tiny_cfg
from glean_io import CheckpointError


def picture(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (h, w, 3), dtype=np.uint8)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (grey, 8 bits) with almost no pixel data: decoding would fail, so only
    a check of the header's size can give the right message."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def run(args, capsys):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Warning" not in err, err
    return code, out, err


def test_folder_of_odd_files(model_file, tmp_path, capsys):
    """Issue 13's folder: every readable input gets its own output, every bad file is named, exit 1."""
    src = tmp_path / "in"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        Image.fromarray(picture(8, 8, seed=ord(d))).save(src / d / "x.jpg")          # same name, two folders
    Image.fromarray(picture(8, 8, 1)).save(src / "same.png")
    Image.fromarray(picture(8, 8, 2)).save(src / "same.jpg")                          # same stem, other format
    frames = [Image.fromarray(picture(8, 8, s)).convert("P") for s in (3, 4)]
    frames[0].save(src / "anim.gif", save_all=True, append_images=frames[1:])        # animated GIF
    Image.fromarray(picture(8, 8, 5)).save(src / "photo.jfif", format="JPEG")
    (src / "tiny.png").write_bytes(b"\x89PNG\r\n\x1a\n")                              # 8 bytes: a PNG signature
    png_header_only(src / "huge.png", 20000, 20000)
    (src / "text.png").write_text("not an image at all")
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("a file that is no image by its suffix")
    out = tmp_path / "out"
    code, summary, err = run(["-i", src, "-o", out, "-m", model_file, "--batch", "2"], capsys)
    assert code == 1
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(written) == len(set(written)) == 6
    assert {"a/x_glean.jpg", "b/x_glean.jpg", "anim_glean.png", "photo_glean.jfif"} <= set(written)
    assert {"same_glean.png", "same_glean.jpg"} <= set(written)
    for bad in ("tiny.png", "huge.png", "text.png", "empty.jpg"):
        lines = [line for line in err.splitlines() if bad in line and line.startswith("error:")]
        assert len(lines) == 1, (bad, err)
    assert "20000x20000" in err and "--max-megapixels" in err                     # refused before decoding
    assert "empty file" in err
    assert "2 frames; the first one is used" in err and "GIF keeps only 256 colours" in err
    assert "1 file(s) skipped, not images by their suffix (e.g. notes.txt)" in err
    assert "6 image(s) written" in summary and "4 problem(s)" in summary
    assert not [p for p in out.rglob(".*") if p.is_file()]                          # no temporary files left
    code, _, err = run(["-i", src / "same.png", src / "same.jpg", src / "a" / "x.jpg", src / "b" / "x.jpg",
                        "-o", tmp_path / "png", "-m", model_file, "--ext", "png"], capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "png").iterdir()) == \
        ["same_glean.png", "same_jpg_glean.png", "x_glean.png", "x_jpg_glean.png"]
    assert "written as same_jpg_glean.png, since another input of this run has the same name" in err


def test_disk_full_is_reported_per_file_and_the_run_goes_on(model_file, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(picture(8, 8, len(name) + ord(name[0]))).save(src / name)
    real = images.atomic_write

    def full_for_b(path, mode="wb"):
        if Path(path).name.startswith("b_"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode)
    monkeypatch.setattr(images, "atomic_write", full_for_b)
    code, summary, err = run(["-i", src, "-o", tmp_path / "out", "-m", model_file], capsys)
    assert code == 1 and "No space left on device" in err and "b.png was not saved" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_glean.png", "c_glean.png"]


def test_strict_size_with_batches_fails_only_the_wrong_image(model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(picture(8, 8, i)).save(src / f"ok{i}.png")
    Image.fromarray(picture(9, 8)).save(src / "wrong.png")
    code, summary, err = run(["-i", src, "-o", tmp_path / "out", "-m", model_file, "--strict-size", "--batch", "4"],
                             capsys)
    assert code == 1 and "wrong.png is 8x9" in err and err.count("error:") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"ok{i}_glean.png" for i in range(3)]


def test_upscale_accepts_what_users_pass(model):
    a = picture(8, 8)
    ref = np.asarray(infer.upscale(model, Image.fromarray(a)))
    u8 = torch.from_numpy(a).permute(2, 0, 1)                              # what torchvision.io.read_image gives
    assert np.array_equal(np.asarray(infer.upscale(model, u8)), ref)
    assert np.array_equal(np.asarray(infer.upscale(model, u8.float() / 255)), ref)
    batch = infer.upscale(model, torch.stack([u8, u8.flip(-1)]))
    assert isinstance(batch, list) and len(batch) == 2 and np.array_equal(np.asarray(batch[0]), ref)
    assert not np.array_equal(np.asarray(batch[1]), ref)
    assert isinstance(infer.upscale(model, u8[None]), Image.Image)      # a batch of one: one image, as before


@pytest.mark.parametrize("tensor,message", [
    (torch.full((3, 8, 8), float("nan")), "NaN"),
    (torch.ones(3, 8, 8, dtype=torch.bool), "not an image"),
    (torch.ones(3, 8, 8, dtype=torch.complex64), "not an image"),
    (torch.full((3, 8, 8), 200.0), r"divide 0-255 values by 255"),
    (torch.full((3, 8, 8), -0.5), r"\(x \+ 1\) / 2"),
    (torch.zeros(3, 0, 0), "empty"),
    (torch.zeros(8, 8, 3), r"\[C, H, W\]"),
    (torch.zeros(2, 2, 3, 8, 8), r"\[B, C, H, W\]"),
])
def test_upscale_refuses_wrong_tensors_with_a_message(model, tensor, message):
    with pytest.raises(infer.InputError, match=message):
        infer.upscale(model, tensor)


def test_bad_devices_are_one_line(model_file, tmp_path, capsys):
    Image.fromarray(picture(8, 8)).save(tmp_path / "x.png")
    code, _, err = run(["-i", tmp_path / "x.png", "-o", tmp_path / "o", "-m", model_file, "--device", "bogus"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "not a device name" in err
    if not torch.cuda.is_available():
        code, _, err = run(["-i", tmp_path / "x.png", "-o", tmp_path / "o", "-m", model_file, "--device", "cuda"],
                           capsys)
        assert code == 2 and "no CUDA GPU" in err and "--device cpu" in err


def test_output_format_notes_and_16bit_colour_tiff(model_file, tmp_path, capsys):
    pytest.importorskip("cv2")
    import cv2
    src = tmp_path / "in"
    src.mkdir()
    rgba = np.dstack([picture(8, 8), np.full((8, 8), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    deep = (np.random.default_rng(0).random((8, 8, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(src / "deep.tif"), deep[..., ::-1])                           # 16-bit colour TIFF
    code, _, err = run(["-i", src / "alpha.png", "-o", tmp_path / "o1", "-m", model_file, "--ext", "jpg"], capsys)
    assert code == 0 and "alpha.png: written as PNG: JPEG cannot keep the alpha channel" in err
    assert [p.name for p in (tmp_path / "o1").iterdir()] == ["alpha_glean.png"]
    a, bits = images.read_image(src / "deep.tif")
    assert bits == 16 and np.abs(a - deep / 65535).max() < 1e-6                   # read as 16 bits, not 8
    code, _, err = run(["-i", src / "deep.tif", "-o", tmp_path / "o2", "-m", model_file], capsys)
    assert code == 0
    out = cv2.imread(str(tmp_path / "o2" / "deep_glean.tif"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (32, 32, 3)


def test_pixel_limit_flag(model_file, tmp_path, capsys):
    Image.fromarray(picture(40, 40)).save(tmp_path / "big.png")                  # 1600 pixels
    code, _, err = run(["-i", tmp_path / "big.png", "-o", tmp_path / "o", "-m", model_file,
                        "--max-megapixels", "0.001"], capsys)
    assert code == 1 and "40x40" in err and "above the limit of" in err
    code, _, _ = run(["-i", tmp_path / "big.png", "-o", tmp_path / "o", "-m", model_file], capsys)
    assert code == 0


# -- downloads ------------------------------------------------------------------------------------------------


def test_download_from_a_server_that_never_answers_times_out_and_says_where_the_file_goes(tmp_path, capsys):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)                                   # accepts connections (backlog), never sends a byte
    url = f"http://127.0.0.1:{server.getsockname()[1]}/glean_x.pth"
    t = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        glean_io.download(url, "abcd", progress=False, cache_dir=tmp_path / "cache", timeout=0.5)
    server.close()
    assert time.perf_counter() - t < 10
    assert "no answer within 0.5 s" in str(e.value) and str(tmp_path / "cache" / "glean_x.pth") in str(e.value)
    assert "trying again" in capsys.readouterr().err                      # one retry
    assert not list((tmp_path / "cache").iterdir())


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_official_release_file_by_path(tmp_path, capsys):
    """A release file downloaded by hand works as -m PATH: its configuration is read off its tensors."""
    Image.fromarray(picture(16, 16)).save(tmp_path / "x.png")
    code, _, err = run(["-i", tmp_path / "x.png", "-o", tmp_path / "o", "-m", DATA / "golden_in16_out64_ckpt.pth"],
                       capsys)
    assert code == 0, err
    with Image.open(tmp_path / "o" / "x_glean.png") as im:
        assert im.size == (64, 64)
    meta = json.loads((DATA / "golden_in16_out64.json").read_text())
    cfg = zoo.load_pretrained(DATA / "golden_in16_out64_ckpt.pth").cfg
    expected = glean.GLEANConfig.from_dict(dict(meta["constructor_kwargs"], channel_base=64))
    assert cfg == expected


def crafted(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_crafted_or_damaged_checkpoints_are_one_line(tmp_path):
    torch.manual_seed(0)
    glean.GLEAN(tiny_cfg()).save(tmp_path / "good.pt")
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    huge = crafted(tmp_path, "huge.pt", {**good, "config": {**good["config"], "num_rrdbs": 200000}})
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"huge.pt: its config \(num_rrdbs=200000"):
        zoo.load_pretrained(huge)
    assert time.perf_counter() - t < 5                                    # refused before building anything
    sd = dict(good["state_dict"])
    nan = crafted(tmp_path, "nan.pt", {**good, "state_dict": {**sd, "decoder.0.upsample_conv.bias":
                                                                  sd["decoder.0.upsample_conv.bias"] * float("nan")}})
    with pytest.raises(CheckpointError, match="nan.pt .*NaN"):
        zoo.load_pretrained(nan)
    k = "decoder.0.upsample_conv.weight"
    int8 = crafted(tmp_path, "int8.pt", {**good, "state_dict": {**sd, k: sd[k].to(torch.int8)}})
    with pytest.raises(CheckpointError, match="int8.pt .*int8 values, expected floating point"):
        zoo.load_pretrained(int8)
    shape = crafted(tmp_path, "shape.pt", {**good, "state_dict": {**sd, k: sd[k][:1]}})
    with pytest.raises(CheckpointError, match="shape.pt does not match"):
        zoo.load_pretrained(shape)
    for bad in ({**good, "config": "{not json"}, {**good, "config": {**good["config"], "in_size": "8"}},
                {**good, "config": [1, 2]}, {**good, "state_dict": [1, 2]}, {"metadata": "x", "format": "glean"}):
        path = crafted(tmp_path, "bad.pt", bad)
        with pytest.raises(CheckpointError, match="bad.pt"):
            zoo.load_pretrained(path)


class Evil:
    def __reduce__(self):
        return (sys.exit, ("code ran",))


def test_crafted_pickle_runs_no_code_and_names_the_file(tmp_path):
    path = crafted(tmp_path, "evil.pt", {"format": "glean", "config": Evil(), "state_dict": {}})
    with pytest.raises(CheckpointError, match="evil.pt: its config is not usable"):
        zoo.load_pretrained(path)


def test_torchscript_archive_gets_no_weights_only_false_advice(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(CheckpointError) as e, warnings.catch_warnings():
        warnings.simplefilter("error")                                  # no torch warning before the one line
        zoo.load_pretrained(path)
    assert "TorchScript" in str(e.value) and "weights_only=False" not in str(e.value)
