"""infer.py on real decoded files the tests write: every input kind, bad inputs, retouching, the Python API."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
import infer


def photo(h, w, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(5 * xx), np.cos(4 * yy), xx * yy], -1) * 100 + 128
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def run(args):
    return infer.main([str(a) for a in args])


def outputs(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir()}


def test_every_input_kind(model_file, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo(8, 8)).save(src / "exact.png")                       # already in_size
    Image.fromarray(photo(40, 60)).save(src / "wide.jpg", quality=95)          # cropped + resized
    Image.fromarray(photo(30, 30)).convert("L").save(src / "grey.png")
    Image.fromarray(photo(24, 24)).convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    rgba = np.dstack([photo(16, 16), np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))])
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    Image.fromarray((photo(16, 16)[..., 0].astype(np.uint16) * 257)).save(src / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                                           # "rotate 90 CW to display"
    Image.fromarray(photo(20, 40)).save(src / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    assert run(["-i", src, "-o", out, "-m", model_file, "--batch", "3"]) == 0
    got = outputs(out)
    assert set(got) == {f"{n}_glean{e}" for n, e in [("exact", ".png"), ("wide", ".jpg"), ("grey", ".png"),
                                                      ("palette", ".png"), ("alpha", ".png"), ("grey16", ".png"),
                                                      ("rotated", ".jpg")]}
    with Image.open(got["exact_glean.png"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    with Image.open(got["grey_glean.png"]) as im:
        assert im.mode == "L" and im.size == (32, 32)
    with Image.open(got["alpha_glean.png"]) as im:
        a = np.asarray(im)
        assert im.mode == "RGBA" and a.shape == (32, 32, 4)
        assert a[:, 0, 3].mean() < 40 and a[:, -1, 3].mean() > 215           # the alpha ramp survives
    with Image.open(got["grey16_glean.png"]) as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255          # still 16-bit
    with Image.open(got["palette_glean.png"]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


def test_16bit_colour_png_stays_16bit(model_file, tmp_path):
    cv2 = pytest.importorskip("cv2")
    a = (photo(12, 12).astype(np.uint16) * 257 + 7)[..., ::-1]
    cv2.imwrite(str(tmp_path / "deep.png"), np.ascontiguousarray(a))
    arr, bits = infer.read_image(tmp_path / "deep.png")
    assert bits == 16 and arr.shape == (12, 12, 3)
    assert run(["-i", tmp_path / "deep.png", "-o", tmp_path / "out", "-m", model_file]) == 0
    out = cv2.imread(str(tmp_path / "out/deep_glean.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == (32, 32, 3)


def test_exif_orientation_and_pad_keep_the_frame(model, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo(20, 40)).save(tmp_path / "r.jpg", exif=exif)         # stored 40 wide, displayed 20 wide
    a, _ = infer.read_image(tmp_path / "r.jpg")
    assert a.shape[:2] == (40, 20)
    out, notes = infer.upscale_arrays(model, [a], pad=True)
    assert out[0].shape == (32, 16, 3) and "padded" in notes[0]               # the whole frame, 4x
    out, notes = infer.upscale_arrays(model, [a])
    assert out[0].shape == (32, 32, 3) and "centre-cropped" in notes[0]


def test_strict_size_refuses(model_file, tmp_path, capsys):
    Image.fromarray(photo(20, 20)).save(tmp_path / "a.png")
    assert run(["-i", tmp_path / "a.png", "-o", tmp_path / "out", "-m", model_file, "--strict-size"]) == 1
    assert "20x20, the model takes 8x8" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())


def test_folder_with_a_corrupt_file_and_a_non_image(model_file, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(16, 16, i)).save(src / f"ok{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code = run(["-i", src, tmp_path / "notes.txt", "-o", out, "-m", model_file])
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.jpg" in err and "notes.txt" in err and "not a readable image" in err
    assert sorted(outputs(out)) == ["ok0_glean.png", "ok1_glean.png", "ok2_glean.png"]  # no partial files


def test_unwritable_output_folder(model_file, tmp_path, capsys):
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("x")
    assert run(["-i", tmp_path / "a.png", "-o", tmp_path / "file" / "out", "-m", model_file]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err


def test_unknown_model_lists_valid_ones(tmp_path, capsys):
    assert run(["-i", tmp_path, "-o", tmp_path / "out", "-m", "glean_dog_64x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'glean_dog_64x'" in err and all(name in err for name in zoo.WEIGHTS)


def test_missing_input_and_unknown_precision(model_file, tmp_path, capsys):
    assert run(["-i", tmp_path / "nope.png", "-o", tmp_path / "out", "-m", model_file]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(infer.InputError, match="unknown precision 'half': choose auto, fp32, bf16, fp16"):
        infer.load_model(str(model_file), "cpu", "half")


def test_write_is_atomic(tmp_path):
    """A failing write leaves neither the target nor a temporary file."""
    with pytest.raises(infer.InputError, match="alpha"):
        infer.write_image(np.zeros((4, 4, 4), np.float32), tmp_path / "x.jpg")
    assert list(tmp_path.iterdir()) == []


def test_retouch_with_mask_only_changes_the_masked_region(model, model_file, tmp_path):
    edited = photo(32, 32) / 255.0
    mask = np.zeros((32, 32, 1), np.float32)
    mask[8:20, 8:20] = 1
    out = infer.retouch_arrays(model, edited.astype(np.float32), mask)
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[mask[..., 0] == 0], edited[mask[..., 0] == 0], atol=1e-6)
    assert np.abs(out[10:18, 10:18] - edited[10:18, 10:18]).mean() > 0.01
    Image.fromarray(photo(32, 32)).save(tmp_path / "edited.png")
    Image.fromarray((mask[..., 0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    assert run(["-i", tmp_path / "edited.png", "--retouch", "--mask", tmp_path / "mask.png", "-o", tmp_path / "o",
                "-m", model_file]) == 0
    with Image.open(tmp_path / "o/edited_glean.png") as im:
        assert im.size == (32, 32)


def test_python_api(model):
    rgb = Image.fromarray(photo(8, 8))
    out = infer.upscale(model, rgb)
    assert isinstance(out, Image.Image) and out.size == (32, 32) and out.mode == "RGB"
    t = torch.from_numpy(photo(8, 8)).permute(2, 0, 1).float() / 255
    same = infer.upscale(model, t[None])
    assert np.array_equal(np.asarray(same), np.asarray(out))
    assert infer.upscale(model, rgb.convert("L")).mode == "L"
    assert infer.upscale(model, rgb.convert("RGBA")).mode == "RGBA"
    with pytest.raises(TypeError):
        infer.upscale(model, np.zeros((8, 8, 3)))


def test_example_images():
    pytest.importorskip("skimage")
    face = infer.example_image("astronaut")
    assert face.size == (140, 140)
    with pytest.raises(infer.InputError, match="unknown example"):
        infer.example_image("dog")


def test_readme_first_command_uses_the_shipped_model(tmp_path, monkeypatch):
    """`python infer.py -i example:astronaut -o results`: the default (shipped) model, no download, 8x8 -> 64x64."""
    pytest.importorskip("skimage")
    monkeypatch.setattr(zoo, "download", lambda *a, **k: pytest.fail("tried to download"))
    assert run(["-i", "example:astronaut", "-o", tmp_path / "results"]) == 0
    (out,) = (tmp_path / "results").iterdir()
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        face = np.asarray(im, dtype=np.float64)
    assert face.std() > 20                               # a picture, not a flat or blank tile


def test_readme_python_api_snippet_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written, on a face image."""
    import re
    from conftest import ROOT
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    Image.fromarray(photo(8, 8)).save(tmp_path / "face.png")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (64, 64)


def test_help_texts_name_what_exists():
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    examples = [line for line in out.splitlines() if "python evaluate.py" in line]
    names = [n for line in examples for n in re.findall(r"--model (\w+)", line)]
    assert names and all(n in zoo.WEIGHTS for n in names), names
    doc = subprocess.run([sys.executable, "-c", "import pydoc, hubconf; print(pydoc.render_doc(hubconf, renderer="
                          "pydoc.plaintext))"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in ("glean_face_small_8x", "glean_face_16x", "stylegan2_ffhq_1024"):
        assert f"{name}(*, pretrained" in doc
