"""Real photos in, honest results out: face alignment by default, --simulate (degrade and restore), --faces (faces in
the wild), on the public-domain astronaut and synthetic scenes of her face, with the shipped model."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from types import SimpleNamespace

import faces
import images
import infer
import photos
import zoo

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


class BicubicFace(torch.nn.Module):
    """A stand-in face model whose "restoration" is MATLAB bicubic plus `lift` (in [0, 1] units): a face pasted at
    the right place and size matches the bicubic background lifted by `lift`; a misplaced or mis-sized one does not."""

    def __init__(self, in_size=32, out_size=128, lift=0.0, template=zoo.TIGHT):
        super().__init__()
        self.cfg = SimpleNamespace(in_size=in_size, out_size=out_size, scale=out_size // in_size)
        self.face_template, self.name, self.lift = template, f"bicubic{in_size}", lift
        self.anchor = torch.nn.Parameter(torch.zeros(()))                    # a device and dtype to follow

    def forward(self, x):
        return images.imresize(x, size=self.cfg.out_size) + 2 * self.lift + self.anchor


def background(a: np.ndarray, s: float) -> np.ndarray:
    return images.imresize(torch.from_numpy(a).permute(2, 0, 1), scale=s).clamp(0, 1).permute(1, 2, 0).numpy()


def face_masks(a: np.ndarray, s: float, model) -> tuple:
    """The detected faces of a and the masks photos.py blends them with at scale s."""
    found = [f for f in faces.load_detector().detect(a, min_face=photos.MIN_FACE) if not photos.plausible(f)]
    shape = (int(np.ceil(a.shape[0] * s)), int(np.ceil(a.shape[1] * s)))
    masks = []
    for f in found:
        m = np.zeros(shape, np.float32)
        x0, y0, x1, y1 = photos.region_box(f.landmarks * s, shape)
        m[y0:y1, x0:x1] = photos.face_region(f.landmarks * s, shape, (x0, y0, x1, y1)).numpy()
        masks.append(m)
    return found, masks


@pytest.fixture(scope="module")
def small_scene() -> np.ndarray:
    """faces.face_scene shrunk 4x: 160x120 with faces of about 10-32 px, the sizes real low-resolution photos hold."""
    scene, _ = faces.face_scene()
    return background(scene, 0.25)


def test_a_face_no_model_fits_is_left_as_the_background_bit_for_bit(model):
    scene, placed = faces.face_scene()                                     # faces of 20-61 px: 8 px input too small
    reports, notes = [], []
    out = infer.restore_faces(model, scene, outscale=3, reports=reports, notes=notes)
    assert len(reports) == len(placed) == 5 and not any(r.restored for r in reports)
    assert np.array_equal(out, photos.restore_photo(scene, model=model, outscale=3, found=[]).image)
    np.testing.assert_allclose(out, background(scene, 3), atol=2e-6, rtol=0)
    assert any("5 face(s) left as the bicubic upscale, not restored" in n and "would fit" in n for n in notes)
    assert not any("restored (" in n for n in notes)


def test_each_face_goes_to_the_model_whose_input_fits_it(small_scene):
    found = [f for f in faces.load_detector().detect(small_scene, min_face=12) if not photos.plausible(f)]
    assert len(found) >= 4                                                  # the 10 px face is at MTCNN's limit
    small, large = photos.FaceModel("in16", 16, 128, zoo.TIGHT), photos.FaceModel("in32", 32, 128, zoo.TIGHT)
    for f in found:
        s16, s32 = photos.shrink_for(f.landmarks, small), photos.shrink_for(f.landmarks, large)
        assert s16 == pytest.approx(2 * s32)
        m, s = photos.choose(f.landmarks, [small, large], max_shrink=1.25)
        expected = large if s32 <= 1.25 and s16 > 1.25 else small if s16 <= 1.25 else None if s32 > 1.25 else large
        assert m == expected and (m is None or s <= 1.25)
        assert photos.choose(f.landmarks, [small, large], max_shrink=100)[0] == small   # least enlargement


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_faces_are_restored_at_the_model_scale_and_placed_at_any_outscale(small_scene, s):
    lift = BicubicFace(32, 128, lift=0.15)
    reports = []
    out = infer.restore_faces(lift, small_scene, outscale=s, reports=reports, notes=[], max_shrink=2.5)
    assert out.shape == (120 * s, 160 * s, 3)
    restored = [r for r in reports if r.restored]
    assert restored and all(r.model == "bicubic32" for r in restored)
    bg = background(small_scene, s)
    found, masks = face_masks(small_scene, s, lift)
    for m in masks:
        inner = m > 0.99
        if not inner.any():
            continue
        diff = (out - bg)[inner]
        # the face lands where it belongs, at the right size: the bicubic face, lifted (not clipped), on top of
        # the bicubic background; a misplaced or mis-scaled face would differ by the picture's own contrast
        unclipped = (bg[inner] < 0.8)
        assert abs(np.median(diff[unclipped]) - 0.15) < 0.03, (s, np.median(diff[unclipped]))
    outside = np.max(masks, axis=0) == 0
    assert np.array_equal(out[outside], bg[outside]) or np.abs(out[outside] - bg[outside]).max() < 2e-6


def test_only_the_face_region_is_pasted_not_the_square(small_scene):
    lift = BicubicFace(32, 128, lift=0.3)
    out = infer.restore_faces(lift, small_scene, outscale=4, notes=[], max_shrink=2.5)
    bg = background(small_scene, 4)
    found, masks = face_masks(small_scene, 4, lift)
    outside = np.max(masks, axis=0) == 0
    np.testing.assert_allclose(out[outside], bg[outside], atol=2e-6, rtol=0)
    f = found[0]
    M = faces.similarity_transform(f.landmarks * 4, np.asarray(zoo.TIGHT) * 128)     # output -> the 128 px square
    corners = faces.apply(faces.invert(M), [[6, 6], [122, 6], [6, 122], [122, 122]])   # inside the square ...
    for x, y in corners.round().astype(int):
        if 0 <= y < out.shape[0] and 0 <= x < out.shape[1]:
            assert masks[0][y, x] == 0 and np.array_equal(out[y, x], bg[y, x])      # ... but not the face


def test_overlapping_faces_blend_without_seams():
    bg = torch.full((3, 60, 60), 0.5)
    lm = np.array([[22.0, 24], [38, 24], [30, 32], [24, 40], [36, 40]])             # a face, 16 px eye distance
    pastes = []
    for value, dx in ((0.1, 0), (0.9, 6)):
        M = faces.similarity_transform(lm + [dx, 0], np.asarray(zoo.TIGHT) * 64)
        pastes.append(photos.warp_into(torch.full((3, 64, 64), value), M, lm + [dx, 0], (0, 0, 60, 60)))
    out = photos.blend_band(bg.clone(), pastes, 0)[0]
    both = (pastes[0].mask > 0.5) & (pastes[1].mask > 0.5)
    assert both.sum() > 100 and out.min() >= 0.1 - 1e-6 and out.max() <= 0.9 + 1e-6   # convex combinations
    assert (out[:, 1:] - out[:, :-1]).abs().max() < 0.2                             # no step (seam) anywhere
    assert (out[1:] - out[:-1]).abs().max() < 0.2


def test_grey_photos_get_grey_faces(small_scene):
    lift = BicubicFace(32, 128, lift=0.1)
    grey = small_scene.mean(axis=2, keepdims=True)
    out = infer.restore_faces(lift, grey, outscale=2, notes=[], max_shrink=2.5)
    assert out.shape == (240, 320, 1)
    rgb = np.repeat(grey, 3, axis=2)                                                 # RGB with equal channels
    out = infer.restore_faces(BicubicFace(32, 128, lift=0.1), rgb, outscale=2, notes=[], max_shrink=2.5)
    assert out.shape == (240, 320, 3) and np.array_equal(out[..., 0], out[..., 1]) and \
        np.array_equal(out[..., 1], out[..., 2]) and np.abs(out - background(rgb, 2)).max() > 0.05


def test_alpha_and_only_center(small_scene):
    rgba = np.dstack([small_scene, np.linspace(0, 1, 160, dtype=np.float32)[None].repeat(120, 0)])
    out = infer.restore_faces(BicubicFace(32, 128, lift=0.2), rgba, outscale=2, notes=[], max_shrink=2.5)
    assert out.shape == (240, 320, 4)
    np.testing.assert_allclose(out[..., 3], background(rgba, 2)[..., 3], atol=2e-6)   # alpha: the background's
    reports = []
    infer.restore_faces(BicubicFace(32, 128), small_scene, outscale=2, notes=[], max_shrink=2.5, only_center=True,
                        reports=reports)
    assert len([r for r in reports if r.restored]) == 1


@pytest.mark.parametrize("s", [4, 2.5])
def test_banded_background_and_paste_equal_the_one_shot_result(small_scene, monkeypatch, s):
    lift = BicubicFace(32, 128, lift=0.2)
    whole = photos.restore_photo(small_scene, model=lift, outscale=s, max_shrink=2.5).image
    monkeypatch.setattr(photos, "BAND_VALUES", 3 * 160 * 4 * 7)                      # bands of 7 output rows
    banded = photos.restore_photo(small_scene, model=lift, outscale=s, max_shrink=2.5).image
    if s == int(s):
        assert np.array_equal(banded, whole)
    else:
        np.testing.assert_allclose(banded, whole, atol=1e-5, rtol=0)
    np.testing.assert_allclose(whole, photos.restore_photo(small_scene, model=lift, outscale=s, max_shrink=2.5,
                                                           dtype=np.uint8).image / 255, atol=0.5 / 255 + 1e-6)


def test_photo_size_limits_are_checked_first(monkeypatch):
    monkeypatch.setattr(faces, "load_detector", lambda *a: pytest.fail("nothing may run before the size check"))
    with pytest.raises(images.InputError, match="above the limit of 1 million"):
        photos.restore_photo(np.zeros((600, 600, 3), np.float32), outscale=2, max_output_pixels=1e6)
    notes = []
    monkeypatch.undo()
    out = infer.restore_faces(None, np.full((1, 2000, 3), 0.5, np.float32), outscale=4, notes=notes)
    assert out.shape == (4, 8000, 3) and any("smaller than the face detector's 12 px window" in n for n in notes)


def test_python_users_see_the_notes(model, astronaut):
    with pytest.warns(photos.Note, match="left as the bicubic upscale"):
        infer.restore_faces(model, astronaut, outscale=1)
    with pytest.warns(photos.Note) as caught:
        infer.upscale(model, images.to_pil(astronaut))
    said = [str(w.message) for w in caught]
    assert any("aligned to the model's 8x8 framing" in m for m in said)
    assert any("the 64x64 result is smaller than the 512x512 input" in m for m in said)


def test_faces_touching_the_border(astronaut):
    cut = background(np.ascontiguousarray(astronaut[60:260, 200:330]), 0.25)   # the face cut by the left and top
    reports = []
    out = infer.restore_faces(BicubicFace(32, 128, lift=0.2), cut, outscale=4, reports=reports, notes=[],
                              max_shrink=2.5)
    assert out.shape == (200, 132, 3) and [r.restored for r in reports] == [True]
    assert np.abs(out - background(cut, 4)).max() > 0.1                    # the face was restored


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
                          (["--faces", "--max-shrink", "0.5"], "--max-shrink must be >= 1"),
                          (["--faces", "--outscale", "100", "--max-output-megapixels", "0.5"], "above the limit"),
                          (["--max-shrink", "2"], "go with --faces"),
                          (["--outscale", "2"], "go with --faces")):
        code, err = run(["-i", x, "-o", tmp_path / "o", *args], capsys)
        assert code in (1, 2) and message in err and len(err.strip().splitlines()) <= 2, err


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


def test_window_is_the_photos_own_pixels_mirrored_beyond_its_border():
    a = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    lm = np.array([[12.0, 8], [17, 8], [14.5, 11], [12.5, 14], [16.5, 14]])               # a face near (14.5, 11)
    crop, M = faces.window(a, lm, np.asarray(zoo.TIGHT), 16)
    x0, y0 = -int(M[0, 2]), -int(M[1, 2])
    assert crop.shape == (16, 16, 3) and np.array_equal(M[:, :2], np.eye(2))          # a whole-pixel shift
    _, Mw = faces.align(a, lm, np.asarray(zoo.TIGHT), 16)                                  # the warp's frame ...
    centre = faces.invert(Mw) @ np.array([8, 8, 1.0])
    assert abs(x0 + 8 - centre[0]) <= 0.5 and abs(y0 + 8 - centre[1]) <= 0.5              # ... centred the same
    assert np.array_equal(crop, a[y0:y0 + 16, x0:x0 + 16])                                # no resampling
    edge, M = faces.window(a, lm - [12, 0], np.asarray(zoo.TIGHT), 16)                    # past the left border
    x0 = -int(M[0, 2])
    assert x0 < 0 and np.array_equal(edge[:, -x0:], a[-int(M[1, 2]):-int(M[1, 2]) + 16, :16 + x0])
    assert np.array_equal(edge[:, -x0 - 1], edge[:, -x0])                                  # 'symmetric': -1 -> 0


def test_window_models_take_upright_faces_near_their_scale_as_windows(astronaut):
    """photos.model_input: a window model (trained with framing jitter) gets the photo's own pixels for a face near
    its scale and upright, a warped face otherwise (tilted, or far from its scale); other models always the warp."""
    face = faces.load_detector().detect(astronaut)[0]
    m = photos.FaceModel("w", 16, 128, zoo.TIGHT, window=True)
    s = photos.shrink_for(face.landmarks, m)
    small = images.imresize(torch.from_numpy(astronaut).permute(2, 0, 1), scale=1 / s).clamp(0, 1)
    a = small.permute(1, 2, 0).contiguous().numpy()                                         # the face at shrink 1
    lm = np.asarray(face.landmarks) / s
    crop, M = photos.model_input(a, lm, m)
    assert np.array_equal(M[:, :2], np.eye(2)) and np.array_equal(crop, a[-int(M[1, 2]):-int(M[1, 2]) + 16,
                                                                         -int(M[0, 2]):-int(M[0, 2]) + 16])
    c, t = np.cos(np.radians(20)), np.sin(np.radians(20))
    tilted = (lm - lm.mean(0)) @ np.array([[c, t], [-t, c]]) + lm.mean(0)                  # a head tilted 20 degrees
    for landmarks, model in ((tilted, m), (lm * 0.6, m), (lm, photos.FaceModel("w", 16, 128, zoo.TIGHT))):
        _, M = photos.model_input(a, landmarks, model)
        assert not np.allclose(M[:, :2], np.eye(2)), landmarks                             # warped onto the template
