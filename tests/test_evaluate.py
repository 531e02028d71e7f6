"""evaluate.py on small images the tests make: known values, identical images, the command line."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import glean
from conftest import tiny_cfg


def faces(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.cos(3 * xx), torch.sin(2 * yy), xx * yy]) * 0.6
    return (base[None] + 0.2 * torch.rand(n, 3, size, size, generator=g) - 0.1).clamp(-1, 1)


def test_psnr_of_a_known_perturbation():
    a = torch.full((1, 3, 8, 8), -1.0) + 100 / 127.5          # 8-bit value 100
    b = a + 5 / 127.5                                          # every value off by 5
    assert evaluate.psnr(b, a).item() == pytest.approx(10 * math.log10(255 ** 2 / 25), abs=1e-9)
    assert evaluate.psnr_y(b, a).item() == pytest.approx(10 * math.log10(255 ** 2 / (5 * 219 / 255) ** 2), abs=1e-6)


def test_identical_images_give_inf_and_one():
    x = faces()
    m = evaluate.score(x, x)
    assert torch.isinf(m["psnr"]).all() and torch.isinf(m["psnr_y"]).all()
    assert torch.allclose(m["ssim"], torch.ones(3, dtype=torch.float64))
    results = evaluate.evaluate({"same": lambda y, idx: y}, x)
    assert math.isinf(results["same"]["mean"]["psnr"])
    assert "| same | inf | inf | 1.0000 | 1.0000 |" in evaluate.markdown(results, 3)
    assert json.loads(json.dumps(evaluate._json_safe(results)))["same"]["mean"]["psnr"] == "inf"


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = faces(1, 48, 0), faces(1, 48, 1)
    ua, ub = [evaluate.to_uint8_range(t)[0].permute(1, 2, 0).numpy() for t in (a, b)]
    ref = metrics.structural_similarity(ua, ub, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
    assert evaluate.ssim(a, b).item() == pytest.approx(ref, abs=2e-3)  # skimage pads the border, we use the valid part


def test_identity_similarity_with_dlib():
    pytest.importorskip("dlib")
    try:
        identity = evaluate.DlibIdentity()
    except ImportError:
        pytest.skip("face_recognition_models not installed")
    x = faces(2, 64)
    sim = evaluate.identity_similarity(identity, x, x)
    assert torch.allclose(sim, torch.ones(2, dtype=torch.float64))
    assert (evaluate.identity_similarity(identity, x, x.flip(0)) < 1 - 1e-6).all()


def test_arcface_from_a_weights_file(tmp_path):
    torch.manual_seed(0)
    net = evaluate.IResNet([1, 1, 1, 1]).eval()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    arc = evaluate.ArcFaceIdentity(path)
    x = faces(2, 64)
    assert arc.embed(x).shape == (2, 512)
    assert torch.allclose(evaluate.identity_similarity(arc, x, x), torch.ones(2, dtype=torch.float64))


def test_command_line(tmp_path, capsys):
    gt_dir, out_dir = tmp_path / "gt", tmp_path / "outputs"
    gt_dir.mkdir(), out_dir.mkdir()
    x = faces(3, 32)
    for i, t in enumerate(x):
        a = evaluate.to_uint8_range(t).permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(a).save(gt_dir / f"p{i}.png")
        Image.fromarray(np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)).save(out_dir / f"p{i}.png")
    torch.manual_seed(0)
    glean.GLEAN(tiny_cfg(8, 32)).save(tmp_path / "tiny.pt")
    j, md, fig = tmp_path / "new" / "r.json", tmp_path / "r.md", tmp_path / "fig.png"   # "new/" is made
    assert evaluate.main(["--gt", str(gt_dir), "--bicubic", "--model", f"{tmp_path / 'tiny.pt'}=tiny", "--outputs",
                          f"{out_dir}=plus5", "--identity", "none", "--json", str(j), "--markdown", str(md),
                          "--figure", str(fig)]) == 0
    with Image.open(fig) as im:  # LR | bicubic | tiny | GT, for the astronaut and 3 bank samples, 4x enlarged
        assert im.size == (4 * 32 * 4, 4 * 32 * 4 + 18)
    r = json.loads(j.read_text())["results"]
    assert set(r) == {"bicubic", "tiny", "plus5"} and r["plus5"]["mean"]["psnr"] < 35
    assert r["plus5"]["mean"]["psnr"] > 30 and "| tiny |" in md.read_text()
    assert evaluate.main(["--gt", str(gt_dir), "--gt-size", "32", "--outputs", str(tmp_path / "nothing_here")]) == 2
    assert "no images" in capsys.readouterr().err


def centred_face(tmp_path, n=2):
    """Photos with the public-domain astronaut's face at their centre (as LFW's labelled faces are)."""
    from skimage import data
    folder = tmp_path / "photos"
    folder.mkdir()
    a = data.astronaut()[0:220, 115:335]
    for i in range(n):
        Image.fromarray(a).save(folder / f"astro{i}.png")
    return folder


def test_detections_find_the_faces_and_take_no_false_ones(tmp_path):
    pytest.importorskip("skimage")
    study = evaluate.detection_study(sorted(centred_face(tmp_path).iterdir()))
    for k, (n, found, kept) in study["recall"].items():
        assert n == 2 and (kept == 2 or k == 8), (k, found, kept)            # the face, down to 27 px photos
    (n, found, kept), (n_tex, _, kept_tex) = study["false"]["face-free pictures"], study["false"][
        "textures (photo strips)"]
    assert n >= 80 and found >= 1 and kept == 0                          # MTCNN errs, photos.plausible does not
    assert n_tex == 6 and kept_tex == 0
    table = evaluate.detection_table(study)
    assert "| face-free pictures: false faces | " in table and table.count("\n") == 8


def test_photo_benchmark_scores_face_regions_against_bicubic(tmp_path):
    pytest.importorskip("skimage")
    folder = centred_face(tmp_path, 1)
    out = tmp_path / "photos.json"
    assert evaluate.main(["--photos", str(folder), "--shrink", "8", "--identity", "none", "--json", str(out)]) == 0
    study = json.loads(out.read_text())
    (row,) = study["faces"]
    assert row["photo"] == "astro0.png" and row["psnr_bicubic"] > 20
    if not row["restored"]:                        # no offline model fits: the face is the bicubic one, exactly
        assert row["psnr_faces"] == row["psnr_bicubic"] and study["totals"]["harmed"] == 0
    else:
        assert row["psnr_faces"] > row["psnr_bicubic"]
    assert study["precision"] == "fp32"                                  # the models' own numbers by default
    assert evaluate.main(["--photos", str(folder), "--shrink", "8", "--identity", "none", "--json", str(out),
                          "--precision", "bf16"]) == 0
    bf16 = json.loads(out.read_text())
    assert bf16["precision"] == "bf16" and bf16["faces"][0]["psnr_bicubic"] == row["psnr_bicubic"]
    assert abs(bf16["faces"][0]["psnr_faces"] - row["psnr_faces"]) < 0.3           # bf16 rounding, not a change
    assert evaluate.main(["--photos", str(folder), "--model", "glean_face_small_8x", "--model",
                          "glean_face_small_8x=again"]) == 2                      # one model at most
