"""faces.py: MTCNN detection with 5 landmarks, similarity alignment to a template, paste-back.

Pictures: scikit-image's public-domain astronaut (Eileen Collins, NASA), rocket, coffee and cat; no research photos.
"""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import faces
import images
import zoo
from glean_io import CheckpointError

data = pytest.importorskip("skimage.data")

# the astronaut's face in the 512x512 picture, as MTCNN finds it (checked by eye): box width ~86 px
ASTRONAUT_BOX_W = 86.3
ASTRONAUT_LM = np.array([[203.4, 101.2], [246.9, 103.4], [224.5, 129.2], [202.0, 139.7], [245.2, 141.8]])


def resized(a, r: float) -> np.ndarray:
    t = torch.from_numpy(faces.as_float_image(a)).permute(2, 0, 1).double()
    return images.imresize(t, scale=r).clamp(0, 1).permute(1, 2, 0).float().numpy()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """MTCNN's ops are small: one thread is about as fast as two, and does not stall when the cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def detector():
    return faces.load_detector()


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()


@pytest.fixture(scope="module")
def head(astronaut):
    """The 256x256 top of the picture around the face (cheaper to search than the whole picture)."""
    return astronaut[:256, HEAD_X:HEAD_X + 256]


HEAD_X = 96


def assert_plausible(face, tol=0.0):
    """Eyes above the nose above the mouth, left before right, all inside the box (up to tol px)."""
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    x0, y0, x1, y1 = face.box
    assert lx < nx < rx and mlx < mrx
    assert max(ly, ry) < ny < min(mly, mry)
    assert (face.landmarks[:, 0] > x0 - tol).all() and (face.landmarks[:, 0] < x1 + tol).all()
    assert (face.landmarks[:, 1] > y0 - tol).all() and (face.landmarks[:, 1] < y1 + tol).all()


# ----------------------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("face_px", [16, 40, 80, 200])
def test_astronaut_found_at_several_scales(detector, astronaut, face_px):
    r = face_px / ASTRONAUT_BOX_W
    found = detector.detect(resized(astronaut, r), min_face=12)
    assert len(found) == 1, [f.box for f in found]
    f = found[0]
    assert f.score > 0.95
    assert abs((f.box[2] - f.box[0]) - face_px) < 0.2 * face_px
    assert_plausible(f)
    iod = np.linalg.norm(ASTRONAUT_LM[1] - ASTRONAUT_LM[0]) * r
    assert np.abs(f.landmarks - ASTRONAUT_LM * r).max() < 0.1 * iod   # within a tenth of the eye distance


def test_min_face_limits_the_search(detector, astronaut):
    small = resized(astronaut, 16 / ASTRONAUT_BOX_W)
    assert detector.detect(small, min_face=40) == []
    assert len(detector.detect(small, min_face=12)) == 1


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_no_face_in_face_free_pictures(detector, name):
    assert detector.detect(getattr(data, name)(), min_face=12) == []


def test_uint8_and_float_agree_and_detection_is_deterministic(detector, head):
    a = detector.detect(head)
    b = detector.detect(head.astype(np.float32) / 255)
    c = detector.detect(head)
    assert len(a) == len(b) == 1
    np.testing.assert_allclose(a[0].landmarks, b[0].landmarks, atol=1e-3)
    assert a[0].box == c[0].box and np.array_equal(a[0].landmarks, c[0].landmarks)


def test_grey_and_alpha_inputs(detector, head):
    grey = (head @ np.array([0.299, 0.587, 0.114])).astype(np.float32) / 255          # [H, W]
    colour = detector.detect(head)[0]
    alpha = np.full_like(grey, 0.5)
    for img in (grey, grey[..., None], np.stack([grey, alpha], -1),
                np.concatenate([head / 255, alpha[..., None]], -1)):
        found = detector.detect(img)
        assert len(found) == 1
        assert np.abs(found[0].landmarks - colour.landmarks).max() < 3


@pytest.mark.parametrize("shape", [(0, 0, 3), (1, 1, 3), (11, 40, 3), (40, 11), (12, 12, 3)])
def test_tiny_images_give_no_faces(detector, shape):
    assert detector.detect(np.full(shape, 0.5, np.float32)) == []


def test_many_faces(detector):
    sizes = (24, 30, 36, 48, 64, 80, 100, 120, 150, 28)       # squares around the head; the face is ~55% of it
    img, placed = faces.face_scene(sizes)
    found = detector.detect(img, min_face=12)
    assert len(found) == len(sizes)
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in found]
    assert areas == sorted(areas, reverse=True)                 # largest first
    for x, y, s in placed:                                      # one detection per face, with its landmarks
        hits = [f for f in found if x < (f.box[0] + f.box[2]) / 2 < x + s and y < (f.box[1] + f.box[3]) / 2 < y + s]
        assert len(hits) == 1, (x, y, s)
        assert 0.4 * s < hits[0].box[2] - hits[0].box[0] < 0.8 * s
        assert_plausible(hits[0])


def test_face_cut_by_the_border(detector, astronaut):
    cut = astronaut[:, 205:]                                    # the left eye (x ~ 203) is outside the picture
    found = detector.detect(cut)
    assert len(found) == 1
    f = found[0]
    assert f.box[0] < 0                                         # the box reaches beyond the border
    assert_plausible(f, tol=2)
    np.testing.assert_allclose(f.landmarks[1:], ASTRONAUT_LM[1:] - [205, 0], atol=4)
    aligned, M = faces.align(cut, f.landmarks, faces.FFHQ_TEMPLATE, 64)
    assert aligned.shape == (64, 64, 3) and np.isfinite(aligned).all()
    assert 0.5 < faces.coverage(cut.shape, M, 64) < 0.95       # part of the crop is mirrored
    assert faces.coverage(astronaut.shape, faces.align(astronaut, ASTRONAUT_LM, faces.FFHQ_TEMPLATE, 64)[1],
                          64) == 1.0


# ----------------------------------------------------------------------------------------------------------
# Transforms and alignment


def random_similarity(rng, scale=(0.5, 2.0)):
    a, s = rng.uniform(-np.pi, np.pi), rng.uniform(*scale)
    R = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.concatenate([R, rng.uniform(-50, 50, (2, 1))], axis=1)


def test_similarity_transform_recovers_a_similarity_and_inverts():
    rng = np.random.default_rng(0)
    for _ in range(10):
        M = random_similarity(rng)
        src = rng.uniform(0, 100, (5, 2))
        np.testing.assert_allclose(faces.similarity_transform(src, faces.apply(M, src)), M, atol=1e-9)
        np.testing.assert_allclose(faces.apply(faces.invert(M), faces.apply(M, src)), src, atol=1e-9)
    # least squares, never a reflection: a mirrored point set is matched by a rotation with residual error
    src = np.array([[0.0, 0], [1, 0], [0, 2]])
    M = faces.similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(M[:, :2]) > 0


def blob(shape, point, sigma) -> np.ndarray:
    """A Gaussian dot [H, W, 1] centred on point (pixel centres at j + 0.5)."""
    H, W = shape
    y, x = np.mgrid[0:H, 0:W] + 0.5
    return np.exp(-((x - point[0]) ** 2 + (y - point[1]) ** 2) / (2 * sigma ** 2))[..., None].astype(np.float32)


def centroid(img, point, radius) -> np.ndarray:
    """Intensity centroid (x, y) of img [H, W, 1] within radius of point."""
    H, W = img.shape[:2]
    y, x = np.mgrid[0:H, 0:W] + 0.5
    w = img[..., 0] * (((x - point[0]) ** 2 + (y - point[1]) ** 2) < radius ** 2)
    return np.array([(w * x).sum() / w.sum(), (w * y).sum() / w.sum()])


@pytest.mark.parametrize("size, antialias", [(256, True), (48, True), (48, False)])   # enlarged, shrunk
def test_align_puts_landmarks_on_the_template(size, antialias):
    """One dot at each landmark of a rotated face: after alignment each dot sits on its template point, and
    warping back puts it where it was (the half-pixel conventions of align, warp and imresize agree)."""
    rng = np.random.default_rng(1)
    template, sigma = faces.FFHQ_TEMPLATE, 4.0
    M0 = random_similarity(rng, (1.2, 1.6))                         # template * 100 -> image, rotated
    M0[:, 2] = [160, 140] - M0[:, :2] @ [50, 55]                    # the face inside the 320x280 image
    lm = faces.apply(M0, template * 100)
    for i in range(5):
        aligned, M = faces.align(blob((280, 320), lm[i], sigma), lm, template, size, antialias=antialias)
        assert aligned.shape == (size, size, 1)
        np.testing.assert_allclose(faces.apply(M, lm), template * size, atol=1e-6)   # an exact similarity here
        s = faces.scale_of(M)
        found = centroid(aligned, template[i] * size, radius=4 * sigma * s)
        assert np.abs(found - template[i] * size).max() < 0.05             # aligned pixels
        if size == 256:                                              # fine enough to warp back: round trip
            back = faces.warp(torch.from_numpy(aligned).permute(2, 0, 1), faces.invert(M), 280, 320)
            found = centroid(back.permute(1, 2, 0).numpy(), lm[i], radius=4 * sigma)
            assert np.abs(found - lm[i]).max() < 0.05


def test_align_shrinks_with_antialiasing():
    """A fine stripe pattern shrunk 8x must average out (grey), not alias into coarse stripes."""
    img = np.zeros((512, 512, 1), np.float32)
    img[:, ::2] = 1                                                  # 1-px stripes
    lm = faces.FFHQ_TEMPLATE * 512 + [0.5, 0]                        # sparse samples would hit stripe centres
    aligned, M = faces.align(img, lm, faces.FFHQ_TEMPLATE, 64)
    assert faces.scale_of(M) == pytest.approx(1 / 8)
    assert np.abs(aligned[1:-1, 1:-1] - 0.5).max() < 0.01         # (the mirrored border pairs two stripes)
    sparse, _ = faces.align(img, lm, faces.FFHQ_TEMPLATE, 64, antialias=False)
    assert np.abs(sparse - 0.5).min() > 0.4                           # what sampling alone gives: all one stripe


def test_alignment_round_trip_moves_landmarks_less_than_a_pixel(detector, astronaut):
    """Align the astronaut (FFHQ framing, 256 px), paste the crop back with the inverse transform, detect again."""
    img = astronaut.astype(np.float32) / 255
    f = detector.detect(img)[0]
    aligned, M = faces.align(img, f.landmarks, faces.FFHQ_TEMPLATE, 256)
    back = faces.paste_back(img, aligned, M, feather=0.1)
    g = detector.detect(back)
    assert len(g) == 1
    assert np.abs(g[0].landmarks - f.landmarks).max() < 1.0
    inner = faces.face_mask(img.shape, M, 256, 0.1) == 1
    assert np.abs(back - img)[inner].mean() < 0.01                 # the face came back where it was


def test_crop_scale(astronaut):
    full = faces.crop_scale(ASTRONAUT_LM, faces.FFHQ_TEMPLATE, 64)
    half = faces.crop_scale(ASTRONAUT_LM / 2, faces.FFHQ_TEMPLATE, 64)
    assert half == pytest.approx(full / 2)
    iod_template = np.linalg.norm(faces.FFHQ_TEMPLATE[1] - faces.FFHQ_TEMPLATE[0]) * 64
    assert full == pytest.approx(np.linalg.norm(ASTRONAUT_LM[1] - ASTRONAUT_LM[0]) / iod_template, rel=0.1)


def test_templates_are_in_landmark_order():
    for t in (faces.FFHQ_TEMPLATE, faces.GLEAN_FACE_SMALL_TEMPLATE):
        assert t.shape == (5, 2) and (t > 0).all() and (t < 1).all()
        assert t[0, 0] < t[2, 0] < t[1, 0] and t[3, 0] < t[4, 0]
        assert t[:2, 1].max() < t[2, 1] < t[3:, 1].min()


def test_measure_template(detector, head):
    box = (150 - HEAD_X, 40, 150)                                     # left, top, side
    mean, std, n = faces.measure_template(detector, [head, head], box, size=200)
    assert n == 2 and std.max() < 1e-6
    np.testing.assert_allclose(mean, (ASTRONAUT_LM - [150, 40]) / box[2], atol=0.01)


# ----------------------------------------------------------------------------------------------------------
# Paste-back


def test_paste_back_leaves_the_background_outside_the_masks(astronaut):
    rng = np.random.default_rng(2)
    small = astronaut[::4, ::4].astype(np.float32) / 255                    # [128, 128, 3]
    bg = resized(small, 4)                                                  # the bicubic background, [512, 512, 3]
    out, masks, crops, transforms = bg, [], [], []
    for centre, size in [((100, 100), 64), ((300, 250), 32), ((500, 20), 64), ((-10, 400), 128)]:  # 2 at borders
        M = random_similarity(rng, (0.3, 0.6))                              # background -> face crop
        M[:, 2] += np.array([size / 2, size / 2]) - faces.apply(M, [centre])[0]
        face = rng.uniform(0, 1, (size, size, 3)).astype(np.float32)
        out = faces.paste_back(out, face, M, feather=0.15)
        masks.append(faces.face_mask(bg.shape, M, size, 0.15))
        crops.append(face), transforms.append(M)
    assert np.array_equal(faces.paste_back(bg, crops, transforms, feather=0.15), out)   # all at once: the same
    outside = np.max(masks, axis=0) == 0
    assert out.dtype == bg.dtype and out.shape == bg.shape
    assert np.array_equal(out[outside], bg[outside])                       # bit for bit
    assert (~outside).sum() > 1000 and not np.allclose(out[~outside], bg[~outside])
    assert out.min() >= 0 and out.max() <= 1


def test_paste_back_upscaled_face_matches_the_upscaled_picture(detector, astronaut):
    """The pipeline's geometry: align at 96 px, enlarge the crop to 128 (bicubic stands in for a model), paste it
    into the picture enlarged 4x with the rescaled transform: the face must land where the enlarged picture has it
    (2 px off already doubles the error)."""
    img = resized(astronaut, 0.5)                                            # [256, 256, 3]
    f = detector.detect(img)[0]
    aligned, M = faces.align(img, f.landmarks, faces.FFHQ_TEMPLATE, 96)
    up = resized(aligned, 4 / 3)                                             # [128, 128, 3]
    bg = resized(img, 4)                                                     # [1024, 1024, 3]
    M4 = faces.rescale(M, 4, 4 / 3)
    out = faces.paste_back(bg, up, M4)
    inner = faces.face_mask(bg.shape, M4, 128, 0.1) == 1
    assert inner.sum() > 50000
    err = np.abs(out - bg)[inner].mean()
    assert err < 0.01
    assert err < 0.5 * np.abs(np.roll(out, 2, axis=1) - bg)[inner].mean()


def test_paste_back_with_no_overlap_is_a_copy():
    bg = np.random.default_rng(3).uniform(0, 1, (40, 50, 3)).astype(np.float32)
    M = np.array([[1.0, 0, 500], [0, 1, 500]])                              # crop far away
    out = faces.paste_back(bg, np.zeros((16, 16, 3), np.float32), M)
    assert np.array_equal(out, bg) and out is not bg


# ----------------------------------------------------------------------------------------------------------
# Weights


def test_shipped_weights_are_hash_checked(tmp_path, monkeypatch):
    (tmp_path / "weights").mkdir()
    damaged = tmp_path / faces.MTCNN_WEIGHTS.url
    shutil.copy(zoo.shipped_file(faces.MTCNN_WEIGHTS), damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    monkeypatch.setattr(zoo, "__file__", str(tmp_path / "zoo.py"))         # shipped files are looked up next to it
    with pytest.raises(CheckpointError, match="mtcnn.safetensors is damaged"):
        faces.Detector()
    damaged.unlink()
    with pytest.raises(CheckpointError, match="mtcnn.safetensors is missing"):
        faces.Detector()


def test_weights_are_loaded_strictly(tmp_path):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(zoo.shipped_file(faces.MTCNN_WEIGHTS)))
    assert len(sd) == 50 and all(k.split(".")[0] in ("pnet", "rnet", "onet") for k in sd)
    del sd["onet.dense6_3.weight"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="onet.dense6_3.weight"):
        faces.Detector(weights=tmp_path / "m.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers (python faces.py --rates / --speed)


def test_detection_rates_and_the_dlib_comparison(tmp_path, astronaut):
    from PIL import Image
    files = []
    for i, (top, left) in enumerate([(20, 135), (30, 140)]):                  # centred head crops, 180 px
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(astronaut[top:top + 180, left:left + 180]).save(files[-1])
    dets = {"mtcnn": faces.load_detector().detect}
    try:
        dets["dlib"] = faces.dlib_detector(1)
    except ImportError:
        pass
    res = faces.detection_rates(files, (6, 40), dets)
    assert res["files"] == 2 and 80 < res["box_w"] < 95
    small, large = res["rows"]
    assert small["mtcnn"]["rate"] == 0.0 and large["mtcnn"]["rate"] == 1.0   # 13 px images: below the pyramid
    assert large["mtcnn"]["lm_err"] < 0.15
    if "dlib" in dets:
        assert small["dlib"]["rate"] == 0.0 and large["dlib"]["rate"] == 1.0
        found = dets["dlib"](astronaut[:256, HEAD_X:HEAD_X + 256])
        x0, y0, x1, y1 = found[0].box
        nose = ASTRONAUT_LM[2] - [HEAD_X, 0]
        assert x0 < nose[0] < x1 and y0 < nose[1] < y1 and found[0].landmarks.shape == (5, 2)


def test_align_folder_writes_framed_crops(tmp_path):
    """faces.py --align: training photos framed like the model's inputs (their largest face on the template)."""
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(src / "sub" / "astro.jpg")
    Image.fromarray(data.coffee()[::4, ::4]).save(src / "coffee.png")             # no face
    n, missed = faces.align_folder(src, tmp_path / "out", faces.GLEAN_FACE_SMALL_TEMPLATE, 64)
    assert n == 1 and [m.name for m in missed] == ["coffee.png"]
    crop = np.asarray(Image.open(tmp_path / "out" / "sub" / "astro.png"), np.float32) / 255
    assert crop.shape == (64, 64, 3)
    found = faces.load_detector().detect(images.imresize(torch.from_numpy(crop).permute(2, 0, 1), size=256)
                                         .clamp(0, 1).permute(1, 2, 0).numpy())
    lm = found[0].landmarks / 256                                                  # where the face landed
    assert np.abs(lm - faces.GLEAN_FACE_SMALL_TEMPLATE).max() < 0.05
