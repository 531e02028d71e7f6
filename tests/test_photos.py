"""Real photos in, honest results out: face alignment by default, --simulate (degrade and restore), --faces (faces in
the wild), on the public-domain astronaut and synthetic scenes of her face, with the shipped model."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import faces
import images
import infer

pytest.importorskip("skimage")
from skimage import data  # noqa: E402


@pytest.fixture(scope="module")
def model():                                       # the shipped face model (conftest.model is a tiny one)
    torch.manual_seed(0)
    return infer.load_model("glean_face_small_8x", "cpu")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut().astype(np.float32) / 255                      # [512, 512, 3], one face ~100 px


def save(a: np.ndarray, path: Path, **kw) -> Path:
    Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8).squeeze()).save(path, **kw)
    return path


def run(args, capsys):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, err


def test_simulate_writes_the_five_files(astronaut, tmp_path, capsys):
    code, err = run(["-i", save(astronaut, tmp_path / "astro.png"), "-o", tmp_path / "out", "--simulate"], capsys)
    assert code == 0, err
    sizes = {}
    for p in sorted((tmp_path / "out").iterdir()):
        with Image.open(p) as im:
            sizes[p.name] = im.size
    assert sizes == {"astro_lr.png": (8, 8), "astro_bicubic.png": (64, 64), "astro_glean.png": (64, 64),
                     "astro_reference.png": (64, 64), "astro_compare.png": (4 * 128, 128 + 18)}
    ref = np.asarray(Image.open(tmp_path / "out" / "astro_reference.png"), np.float32) / 255
    lr = np.asarray(Image.open(tmp_path / "out" / "astro_lr.png"), np.float32) / 255
    expected = images.imresize(torch.from_numpy(ref).permute(2, 0, 1), size=8).clamp(0, 1)     # MATLAB bicubic
    assert np.abs(lr - expected.permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6
    glean_out = np.asarray(Image.open(tmp_path / "out" / "astro_glean.png"), np.float32)
    bicubic = np.asarray(Image.open(tmp_path / "out" / "astro_bicubic.png"), np.float32)
    err_g, err_b = [np.square(x - ref * 255).mean() for x in (glean_out, bicubic)]
    assert err_g < err_b                                                   # GLEAN is closer to the original


def test_simulate_on_grey_rgba_and_exif_rotated_photos(astronaut, tmp_path, capsys):
    grey = save(astronaut @ np.array([0.299, 0.587, 0.114], np.float32), tmp_path / "grey.png")
    rgba = save(np.dstack([astronaut, np.full(astronaut.shape[:2], 0.5, np.float32)]), tmp_path / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 8                                                       # "rotate 90 CCW to display"
    rotated = save(np.rot90(astronaut, k=-1), tmp_path / "rotated.jpg", exif=exif, quality=95)   # stored sideways
    code, err = run(["-i", grey, rgba, rotated, "-o", tmp_path / "out", "--simulate"], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "out").iterdir())) == 15
    upright, _ = faces.align(astronaut, faces.load_detector().detect(astronaut)[0].landmarks,
                             faces.GLEAN_FACE_SMALL_TEMPLATE, 64)
    ref = np.asarray(Image.open(tmp_path / "out" / "rotated_reference.png"), np.float32) / 255
    assert np.abs(ref - upright).mean() < 0.03                             # the face was found upright


def test_a_photo_without_a_face_is_one_line_and_the_run_goes_on(astronaut, tmp_path, capsys):
    coffee = save(data.coffee()[::4, ::4].astype(np.float32) / 255, tmp_path / "coffee.png")   # 100x150, no face
    code, err = run(["-i", coffee, save(astronaut, tmp_path / "astro.png"), "-o", tmp_path / "out", "--simulate"],
                    capsys)
    assert code == 1 and err.count("error:") == 1 and "coffee.png: no face found" in err
    assert len(list((tmp_path / "out").glob("astro_*.png"))) == 5
    code, err = run(["-i", coffee, "-o", tmp_path / "faces", "--faces"], capsys)
    assert code == 0 and "coffee.png: no face found; the whole image was upscaled with bicubic" in err


def scene_masks(model, scene, scale):
    """The feathered masks of the faces restore_faces pastes, at the output's resolution."""
    found = faces.load_detector().detect(scene)
    template = infer.face_template(model)
    Ms = [faces.align(scene, f.landmarks, template, model.cfg.in_size)[1] for f in found]
    shape = (round(scene.shape[0] * scale), round(scene.shape[1] * scale))
    return found, [faces.face_mask(shape, faces.rescale(M, scale, scale), round(model.cfg.in_size * scale))
                   for M in Ms]


def test_faces_paste_back_every_face_and_leave_the_rest_bicubic(model):
    scene, placed = faces.face_scene()                                     # 640x480, 5 faces of 20-61 px
    times = {}
    out = infer.restore_faces(model, scene, times=times, outscale=3)
    assert out.shape == (480 * 3, 640 * 3, 3) and set(times) == {"detect", "align", "glean", "background", "paste"}
    background = images.imresize(torch.from_numpy(scene).permute(2, 0, 1), scale=3).clamp(0, 1)
    background = background.permute(1, 2, 0).numpy()
    found, masks = scene_masks(model, scene, 3)
    assert len(found) == len(placed) == 5
    outside = np.max(masks, axis=0) == 0
    assert np.array_equal(out[outside], background[outside])              # bit for bit outside the faces
    for m in masks:
        assert np.abs(out[m > 0.9] - background[m > 0.9]).mean() > 0.01   # each face was redrawn


def test_faces_options_outscale_only_center_alpha_and_grey(model):
    scene, _ = faces.face_scene()
    out = infer.restore_faces(model, scene, outscale=4, only_center=True)
    assert out.shape == (480 * 4, 640 * 4, 3)
    background = images.imresize(torch.from_numpy(scene).permute(2, 0, 1), scale=4).clamp(0, 1).permute(1, 2, 0)
    changed = np.abs(out - background.numpy()).max(axis=2) > 0
    found, masks = scene_masks(model, scene, 4)
    redrawn = [m for m in masks if changed[m > 0.9].mean() > 0.5]
    assert len(found) == 5 and len(redrawn) == 1                          # only the centre face
    rgba = np.dstack([scene, np.linspace(0, 1, scene.shape[1], dtype=np.float32)[None].repeat(480, 0)])
    out = infer.restore_faces(model, rgba, outscale=2)
    assert out.shape == (960, 1280, 4) and abs(out[..., 3].mean() - 0.5) < 0.01
    grey = infer.restore_faces(model, scene.mean(axis=2, keepdims=True), outscale=2)
    assert grey.shape == (960, 1280, 1)


def test_faces_touching_the_border(model, astronaut):
    cut = np.ascontiguousarray(astronaut[60:260, 200:330])                 # the face cut by the left and top edges
    notes = []
    out = infer.restore_faces(model, cut, notes=notes)
    assert out.shape == (200 * 8, 130 * 8, 3) and not any("no face" in n for n in notes)
    background = images.imresize(torch.from_numpy(cut).permute(2, 0, 1), scale=8).clamp(0, 1).permute(1, 2, 0)
    assert np.abs(out - background.numpy()).max() > 0.1                    # the face was restored


def test_default_mode_aligns_the_face_and_says_the_result_is_smaller(model, astronaut):
    outs, notes = infer.upscale_arrays(model, [astronaut], names=["astro.png"])
    assert outs[0].shape == (64, 64, 3)
    assert any("its largest face aligned to the model's 8x8 framing" in n for n in notes)
    assert any("the 64x64 result is smaller than the 512x512 input: --faces" in n for n in notes)
    coffee = data.coffee().astype(np.float32) / 255
    _, notes = infer.upscale_arrays(model, [coffee], names=["coffee.png"])
    assert any("no face found; centre-cropped instead" in n for n in notes)


def test_faces_aligned_inputs_need_no_detector(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(faces, "load_detector", lambda *a: pytest.fail("--aligned must not detect"))
    face = save(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), tmp_path / "face.png")
    code, err = run(["-i", face, "-o", tmp_path / "out", "--faces", "--aligned"], capsys)
    assert code == 0
    with Image.open(tmp_path / "out" / "face_glean.png") as im:
        assert im.size == (64, 64)


def test_face_flags_need_a_face_model_and_sane_values(tmp_path, capsys):
    import glean
    from conftest import tiny_cfg
    glean.GLEAN(tiny_cfg(8, 32)).save(tmp_path / "tiny.safetensors")
    x = save(np.zeros((8, 8, 3), np.float32), tmp_path / "x.png")
    for args, message in ((["--faces", "-m", tmp_path / "tiny.safetensors"], "needs a face model"),
                          (["--faces", "--outscale", "16"], "above the model's scale"),
                          (["--outscale", "2"], "go with --faces")):
        code, err = run(["-i", x, "-o", tmp_path / "o", *args], capsys)
        assert code == 2 and message in err


def test_simulate_recovers_the_framing_a_centre_crop_loses(model, tmp_path):
    """evaluate.framing_study on the astronaut's face misframed 8 ways (shrunk to 55-80%, off-centre): through
    --simulate GLEAN keeps most of its gain over bicubic at the model's framing, a blind centre crop loses most of
    it. (README: the same on 300 LFW faces.)"""
    import evaluate
    face = images.example_image("astronaut").resize((128, 128), Image.LANCZOS)
    face.save(tmp_path / "astronaut.png")
    study = evaluate.framing_study(model, [tmp_path / "astronaut.png"] * 8)["results"]
    gain = {k: v["GLEAN"]["psnr"] - v["bicubic"]["psnr"] for k, v in study.items()}
    assert gain["model framing"] > 1.5
    assert gain["misframed, --simulate"] > 1.5
    assert gain["misframed, --simulate"] > gain["misframed, centre crop"] + 0.5, gain


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared/data/lfw_val_128/images").is_dir(),
                    reason="LFW evaluation faces not here (research data, not in the repository)")
def test_framing_study_on_real_faces(model):
    import evaluate
    folder = Path(__file__).resolve().parents[2] / "shared/data/lfw_val_128/images"
    study = evaluate.framing_study(model, images.list_images(folder)[:24])["results"]
    gain = {k: v["GLEAN"]["psnr"] - v["bicubic"]["psnr"] for k, v in study.items()}
    assert gain["misframed, --simulate"] > 1.4 and gain["misframed, centre crop"] < 1.0, gain
