"""Faces in the wild: detection with 5 landmarks, alignment to a model's framing, and paste-back.

GLEAN's face models only know faces framed like their training data. This module finds the faces of a photo,
cuts each out framed like that, and puts the upscaled faces back.

**Detection: MTCNN** (K. Zhang, Z. Zhang, Z. Li, Y. Qiao, "Joint Face Detection and Alignment using Multitask
Cascaded Convolutional Networks", IEEE Signal Processing Letters 23(10), 2016), a cascade of three small CNNs:
    P-Net   stage 1, fully convolutional over an image pyramid (factor 0.709): each 12x12 window, stride 2,
            gives a face probability p and box offsets t
    R-Net   stage 2, the P-Net candidates squared and resized to 24x24: p, t
    O-Net   stage 3, the R-Net survivors at 48x48: p, t and 5 landmarks (eyes, nose, mouth corners)
Each stage keeps candidates with p above its threshold, refines boxes by regression
    box' = box + t * (w, h, w, h)            (w, h: the box's width and height)
and removes duplicates with non-maximum suppression (NMS; IoU, and intersection over the smaller box at the end).
Weights: the original authors' models as converted by facenet-pytorch 2.6.0 (MIT licence, T. Esler), stored as
weights/mtcnn.safetensors (see weights/MTCNN.md; `python faces.py --convert DIR` rebuilds it from the wheel).

**Alignment.** Every face model declares a template T: the normalised positions (in [0, 1]) of the 5 landmarks in
its input frame. The similarity transform (rotation R, uniform scale s, translation t) that best maps the detected
landmarks p_i onto q_i = size * T_i,
    M = argmin_{s, R, t} sum_i || s R p_i + t - q_i ||^2                     (Umeyama, IEEE TPAMI 13(4), 1991)
is applied with bicubic sampling; a face larger than the crop is first warped at its own scale and then shrunk
with MATLAB's antialiased bicubic (`imresize`), the resize that made the models' training inputs.

**Paste-back.** The upscaled face is warped back with the inverse of M (rescaled to the output's resolution) and
blended into the background under a feathered mask m: out = bg + m (face - bg); where m = 0 the background is left
bit for bit as it was.

Coordinates (boxes, landmarks, templates, transforms): x to the right, y down, in pixels, with pixel (row i,
column j) covering [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). Resizing an image by r then multiplies
every coordinate by r exactly. (OpenCV and dlib put pixel centres at integers: add 0.5 to their coordinates.)
Images: numpy arrays [H, W, C], float in [0, 1] (uint8 and uint16 are accepted and scaled).
"""
import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from images import imresize, read_rgb, split
from zoo import CELEBA_64, FFHQ, Weights, shipped_file
from glean_io import load_file, load_state_strict, save_file

MTCNN_WEIGHTS = Weights(
    "weights/mtcnn.safetensors", "505969c4", "mtcnn", {}, "face detection + 5 landmarks (MTCNN)",
    "weights: MIT (facenet-pytorch 2.6.0, T. Esler), models of Zhang et al. 2016; see weights/MTCNN.md",
    pixel_range="RGB in [0, 255], fed as (x - 127.5) / 128",
    note="P-Net, R-Net and O-Net state dicts under the prefixes pnet., rnet., onet.")

# Where a face model wants the 5 landmarks, as fractions of its input frame: declared with each model in zoo.WEIGHTS.
FFHQ_TEMPLATE = np.array(FFHQ)                       # the official face models
GLEAN_FACE_SMALL_TEMPLATE = np.array(CELEBA_64)      # the shipped glean_face_small_8x, measured on its training crops


# ----------------------------------------------------------------------------------------------------------
# Images


def as_float_image(image) -> np.ndarray:
    """[H, W] or [H, W, C] uint8/uint16/float -> float32 [H, W, C] (values of integer images scaled to [0, 1])."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"expected a uint8, uint16 or float image, got {a.dtype}")
    return a.astype(np.float32, copy=False)


def rgb_planes(image) -> torch.Tensor:
    """An image [H, W, C] (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA; uint8, uint16 or float) -> RGB [3, H, W]
    float32 in [0, 1]; grey is repeated, alpha dropped."""
    a = as_float_image(image)
    if a.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected 1-4 channels (grey, grey+alpha, RGB, RGBA), got {a.shape[2]}")
    return split(a)[0].contiguous()


# ----------------------------------------------------------------------------------------------------------
# MTCNN networks. Layer names follow the converted weights (facenet-pytorch), so the file loads without renaming.


def flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, W*H*C] in (w, h, c) order: the original models were trained in Caffe on images stored
    column-major (MATLAB), so their fully connected layers read the feature map transposed."""
    B = x.shape[0]
    return x.permute(0, 3, 2, 1).reshape(B, -1)


class PNet(nn.Module):
    """Proposal network: [B, 3, H, W] -> face probability [B, H', W'] and box offsets [B, 4, H', W'] of the 12x12
    windows at stride 2 (H' = ceil((H - 2) / 2) - 4)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)     # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)     # box offsets t

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)   # [B, 10, ceil((H-2)/2), ...]
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))               # [B, 32, H', W']
        return F.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refinement network: [B, 3, 24, 24] -> face probability [B], box offsets [B, 4]."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor):
        B = x.shape[0]
        assert x.shape == (B, 3, 24, 24), x.shape
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)   # [B, 28, 11, 11]
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)   # [B, 48, 4, 4]
        x = self.prelu3(self.conv3(x))                                        # [B, 64, 3, 3]
        x = self.prelu4(self.dense4(flatten_transposed(x)))                   # [B, 128]
        return F.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output network: [B, 3, 48, 48] -> face probability [B], box offsets [B, 4], landmarks [B, 10] (x of the 5
    points, then y, as fractions of the input box)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor):
        B = x.shape[0]
        assert x.shape == (B, 3, 48, 48), x.shape
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)   # [B, 32, 23, 23]
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)   # [B, 64, 10, 10]
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)   # [B, 64, 4, 4]
        x = self.prelu4(self.conv4(x))                                        # [B, 128, 3, 3]
        x = self.prelu5(self.dense5(flatten_transposed(x)))                   # [B, 256]
        return F.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


class MTCNN(nn.Module):
    """The three networks, named as in weights/mtcnn.safetensors (pnet.*, rnet.*, onet.*)."""

    def __init__(self):
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()


# ----------------------------------------------------------------------------------------------------------
# Detection


@dataclass
class Face:
    box: tuple                # (x0, y0, x1, y1): the face's box in pixels (may reach outside the image)
    score: float              # O-Net's face probability
    landmarks: np.ndarray     # [5, 2] (x, y): left eye, right eye, nose, left, right mouth corner (as seen)


@dataclass
class DetectorConfig:
    min_face: float = 20.0                   # smallest face searched for (box side, px; >= 12, P-Net's window)
    factor: float = 0.709                    # image pyramid step (the original code's 0.709 ~ 1/sqrt(2))
    thresholds: tuple = (0.6, 0.7, 0.7)      # face probability needed to pass P-, R- and O-Net
    nms: tuple = (0.5, 0.7, 0.7, 0.7)        # NMS overlap: P-Net per scale (IoU), all scales (IoU), R-Net (IoU),
    #                                          O-Net (intersection over the smaller box)


def normalise(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> the networks' input: (255 x - 127.5) / 128."""
    return (rgb * 255 - 127.5) / 128


def square(boxes: torch.Tensor) -> torch.Tensor:
    """[K, 4] boxes -> squares of side max(w, h) with the same centres."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values
    return torch.cat([c - side / 2, c + side / 2], dim=1)


def regress(boxes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Box regression: box + t * (w, h, w, h) for boxes [K, 4] and offsets t [K, 4]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + t * wh


def nms_min(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS by intersection over the smaller box's area, so a box inside a larger, more confident one is
    dropped; indices kept, best first. (Used on O-Net's few boxes; torchvision's nms is IoU only.)"""
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[rest, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        order = rest[inter / torch.minimum(area[i], area[rest]) <= threshold]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long, device=scores.device)


def crops(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[1, 3, H, W] normalised image, [K, 4] boxes -> [K, 3, size, size]: each box resampled by roi_align (the
    average of bilinear samples over each output cell, so large boxes are antialiased). Parts outside the image are
    black (-1 after normalising), as in the original MTCNN's zero padding."""
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)           # [K, 5]: batch index, x0, y0, x1, y1
    # roi_align reads 0 outside the image: shift black to 0 and back. aligned=True: pixel centres at j + 0.5.
    return roi_align(x + 1, rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True) - 1


class Detector:
    """MTCNN face detector with 5 landmarks, over the shipped weights (hash-checked). No gradients; deterministic.

        faces = load_detector().detect(image)       # image [H, W, C] float in [0, 1] or uint8
    """

    def __init__(self, cfg: DetectorConfig | None = None, *, weights=None, device="cpu"):
        self.cfg = cfg or DetectorConfig()
        path = Path(weights) if weights is not None else shipped_file(MTCNN_WEIGHTS)
        with torch.device("meta"):
            net = MTCNN()
        sd = load_file(path)["state_dict"]
        load_state_strict(net, sd, {k: k for k in net.state_dict()}, str(path))
        self.net = net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)

    def pyramid(self, H: int, W: int, min_face: float) -> list:
        """Scales at which P-Net's 12 px window covers faces of min_face, min_face / 0.709, ... up to the image."""
        scales, s = [], 12 / min_face
        while min(H, W) * s >= 12:
            scales.append(s)
            s *= self.cfg.factor
        return scales

    def stage1(self, x: torch.Tensor, min_face: float) -> tuple:
        """P-Net over the pyramid -> candidate boxes [K, 4] (squared, regressed) with scores [K]."""
        _, _, H, W = x.shape
        t_p, (nms_scale, nms_all, _, _) = self.cfg.thresholds[0], self.cfg.nms
        boxes, scores, offsets = [], [], []
        for s in self.pyramid(H, W, min_face):
            h, w = math.ceil(H * s), math.ceil(W * s)
            xs = F.interpolate(x, size=(h, w), mode="area")                    # [1, 3, h, w]
            prob, t = self.net.pnet(xs)                                        # [1, h', w'], [1, 4, h', w']
            iy, ix = torch.nonzero(prob[0] >= t_p, as_tuple=True)
            if not len(iy):
                continue
            # window (2j, 2i) .. (2j + 12, 2i + 12) of the scaled image, in the image's pixels
            win = torch.stack([2 * ix, 2 * iy, 2 * ix + 12, 2 * iy + 12], dim=1).float()
            win = win / torch.tensor([w / W, h / H, w / W, h / H], device=x.device)
            sc, off = prob[0, iy, ix], t[0, :, iy, ix].T                        # [k], [k, 4]
            keep = nms(win, sc, nms_scale)
            boxes.append(win[keep]), scores.append(sc[keep]), offsets.append(off[keep])
        if not boxes:
            return torch.zeros(0, 4, device=x.device), torch.zeros(0, device=x.device)
        boxes, scores, offsets = torch.cat(boxes), torch.cat(scores), torch.cat(offsets)
        keep = nms(boxes, scores, nms_all)
        return square(regress(boxes[keep], offsets[keep])), scores[keep]

    def stage2(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """R-Net on 24x24 crops -> surviving boxes [K, 4] (squared, regressed)."""
        prob, t = self.net.rnet(crops(x, boxes, 24))
        ok = prob >= self.cfg.thresholds[1]
        boxes, prob, t = boxes[ok], prob[ok], t[ok]
        keep = nms(boxes, prob, self.cfg.nms[2])
        return square(regress(boxes[keep], t[keep]))

    def stage3(self, x: torch.Tensor, boxes: torch.Tensor):
        """O-Net on 48x48 crops -> boxes [K, 4], scores [K], landmarks [K, 5, 2]."""
        prob, t, lm = self.net.onet(crops(x, boxes, 48))
        ok = prob >= self.cfg.thresholds[2]
        boxes, prob, t, lm = boxes[ok], prob[ok], t[ok], lm[ok]
        wh = boxes[:, 2:] - boxes[:, :2]                                        # [K, 2]
        # landmarks: fractions of the box that went into O-Net (before its regression)
        points = boxes[:, None, :2] + torch.stack([lm[:, :5], lm[:, 5:]], dim=2) * wh[:, None]   # [K, 5, 2]
        boxes = regress(boxes, t)
        keep = nms_min(boxes, prob, self.cfg.nms[3])
        return boxes[keep], prob[keep], points[keep]

    @torch.inference_mode()
    def detect(self, image, min_face: float | None = None) -> list:
        """The faces in `image` ([H, W, C] float in [0, 1], or uint8; grey is repeated, alpha ignored), largest
        first. min_face (px, box side; default: the config's, 20; at least 12) is the smallest face searched for:
        the pyramid starts where P-Net's 12 px window covers it. Somewhat smaller faces are often found too; a
        smaller min_face costs time (640x480: 26 ms at 40, 51 ms at 20, 90 ms at 12 on 2 cores)."""
        min_face = max(12.0, self.cfg.min_face if min_face is None else float(min_face))
        rgb = rgb_planes(image).to(self.device)
        _, H, W = rgb.shape
        if min(H, W) < 12:
            return []
        x = normalise(rgb)[None]                                                # [1, 3, H, W]
        boxes, _ = self.stage1(x, min_face)
        if len(boxes):
            boxes = self.stage2(x, boxes)
        if not len(boxes):
            return []
        boxes, scores, points = (v.double().cpu() for v in self.stage3(x, boxes))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return [Face(tuple(boxes[i].tolist()), float(scores[i]), points[i].numpy())
                for i in area.argsort(descending=True).tolist()]


@functools.lru_cache(maxsize=4)
def load_detector(device: str = "cpu") -> Detector:
    """The shipped MTCNN, loaded once per device."""
    return Detector(device=device)


# ----------------------------------------------------------------------------------------------------------
# Similarity transforms. M is a 2x3 float64 array: a point p maps to M[:, :2] @ p + M[:, 2].


def similarity_transform(src, dst) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection) mapping the points
    src [N, 2] onto dst [N, 2], in closed form (Umeyama 1991). N >= 2 distinct points."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    assert src.shape == dst.shape and src.ndim == 2 and src.shape[1] == 2, (src.shape, dst.shape)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    S, D = src - mu_s, dst - mu_d                                  # centred, [N, 2]
    var_s = (S ** 2).sum() / len(src)                              # sigma_x^2
    if var_s == 0:
        raise ValueError("similarity_transform needs at least two distinct source points")
    cov = D.T @ S / len(src)                                       # Sigma_xy [2, 2]
    U, sig, Vt = np.linalg.svd(cov)
    E = np.diag([1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])   # no reflection
    R = U @ E @ Vt                                                 # rotation
    c = np.trace(np.diag(sig) @ E) / var_s                         # scale
    t = mu_d - c * R @ mu_s                                        # translation
    return np.concatenate([c * R, t[:, None]], axis=1)


def invert(M) -> np.ndarray:
    """The inverse of a 2x3 affine transform."""
    M = np.asarray(M, np.float64)
    A_inv = np.linalg.inv(M[:, :2])
    return np.concatenate([A_inv, -A_inv @ M[:, 2:]], axis=1)


def apply(M, points) -> np.ndarray:
    """Points [N, 2] -> M applied to them, [N, 2]."""
    points = np.asarray(points, np.float64)
    return points @ np.asarray(M)[:, :2].T + np.asarray(M)[:, 2]


def scale_of(M) -> float:
    """The transform's scale: output pixels per input pixel (sqrt |det|)."""
    return float(math.sqrt(abs(np.linalg.det(np.asarray(M)[:, :2]))))


def rescale(M, image_scale: float = 1.0, face_scale: float = 1.0) -> np.ndarray:
    """M for images resized by the given factors: image -> aligned face becomes (image upscaled by image_scale)
    -> (face upscaled by face_scale). E.g. paste a GLEAN output (face_scale = out_size / in_size) into the image
    upscaled by the same factor: rescale(M, scale, scale)."""
    M = np.asarray(M, np.float64)
    return np.concatenate([M[:, :2] * (face_scale / image_scale), M[:, 2:] * face_scale], axis=1)


def crop_scale(landmarks, template, model_in_size: int) -> float:
    """How many image pixels span one pixel of the model's aligned input for this face: > 1 when the face holds
    more detail than the model takes in (it is shrunk to fit: a model with a larger input would suit it better),
    < 1 when the face is smaller than the input (it is enlarged before upscaling)."""
    return 1 / scale_of(similarity_transform(landmarks, np.asarray(template) * model_in_size))


# ----------------------------------------------------------------------------------------------------------
# Warping


def _grid(M_out_to_in, out_h: int, out_w: int, in_h: int, in_w: int, x0: int = 0, y0: int = 0) -> torch.Tensor:
    """grid_sample grid [1, out_h, out_w, 2] sampling, for output pixel centres (x0 + j + 0.5, y0 + i + 0.5), the
    input at M_out_to_in applied to them; normalised for align_corners=False (-1 and 1 at the input's outer edges)."""
    A = np.asarray(M_out_to_in, np.float64) * np.array([[2 / in_w], [2 / in_h]])   # to [-1, 1] units ...
    A[:, 2] += A[:, :2] @ [x0 + 0.5, y0 + 0.5] - 1                          # ... from the output pixel (0, 0)
    xs, ys = torch.arange(out_w, dtype=torch.float32), torch.arange(out_h, dtype=torch.float32)
    gx = A[0, 0] * xs[None, :] + (A[0, 1] * ys + A[0, 2])[:, None]          # [out_h, out_w]
    gy = A[1, 0] * xs[None, :] + (A[1, 1] * ys + A[1, 2])[:, None]
    return torch.stack([gx, gy], dim=-1)[None]                              # [1, out_h, out_w, 2]


def warp(planes: torch.Tensor, M, out_h: int, out_w: int, padding: str = "reflection") -> torch.Tensor:
    """[C, H, W] -> [C, out_h, out_w]: out(p) = in(M^-1 p), bicubic (not antialiased: see align)."""
    C, H, W = planes.shape
    g = _grid(invert(M), out_h, out_w, H, W)
    return F.grid_sample(planes[None], g, mode="bicubic", padding_mode=padding, align_corners=False)[0]


def align(image, landmarks, template, size: int, *, antialias: bool = True):
    """Cut out a face framed like a model's input: warp `image` [H, W, C] so that `landmarks` [5, 2] land on
    `template` [5, 2] * size. Returns (aligned [size, size, C] float32, M: image -> aligned coordinates).

    A face larger than `size` is warped at its own scale and then shrunk with MATLAB's antialiased bicubic (the
    resize that made the models' low-resolution training inputs), not sampled sparsely. Parts of the crop beyond
    the image border are mirrored (reflection about the border, like MATLAB's 'symmetric'); `coverage` says how
    much of the crop lies inside the image. Values are clipped to [0, 1] (bicubic overshoot).
    """
    planes = torch.from_numpy(np.ascontiguousarray(as_float_image(image))).permute(2, 0, 1)   # [C, H, W]
    M = similarity_transform(landmarks, np.asarray(template, np.float64) * size)
    s = scale_of(M)                                    # aligned pixels per image pixel
    if antialias and s < 1:
        n = math.ceil(size / s)                        # the crop at (about) the face's own resolution
        native = warp(planes, rescale(M, 1, n / size), n, n)
        out = imresize(native, size=size)                # [C, size, size]
    else:
        out = warp(planes, M, size, size)
    return out.clamp(0, 1).permute(1, 2, 0).numpy(), M


def window(image, landmarks, template, size: int):
    """Cut out a face near a model's framing without resampling it: the size x size window of `image`'s own pixels
    whose centre is nearest the centre of the frame `align` would give (same scale, no rotation). Returns (window
    [size, size, C] float32, M: image -> window coordinates, a whole-pixel translation). Beyond the image border
    the window is mirrored, as in `align`."""
    a = as_float_image(image)
    H, W = a.shape[:2]
    M = similarity_transform(landmarks, np.asarray(template, np.float64) * size)
    cx, cy = invert(M) @ np.array([size / 2, size / 2, 1.0])           # the frame's centre in the image
    x0, y0 = round(cx - size / 2), round(cy - size / 2)
    rows, cols = _mirror(np.arange(y0, y0 + size), H), _mirror(np.arange(x0, x0 + size), W)
    return np.ascontiguousarray(a[rows][:, cols], np.float32), np.array([[1.0, 0, -x0], [0, 1.0, -y0]])


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected about the borders of 0..n-1 (MATLAB's 'symmetric': -1 -> 0, n -> n - 1), any distance."""
    i = np.mod(i, 2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def coverage(image_shape, M, size: int) -> float:
    """Fraction of an aligned size x size crop (M: image -> crop) that comes from inside the image (1: the face is
    clear of the borders; less: the rest of the crop is mirrored)."""
    H, W = image_shape[:2]
    g = _grid(invert(M), size, size, H, W)[0]                               # [size, size, 2] in [-1, 1] inside
    return float(((g.abs() <= 1).all(dim=-1)).double().mean())


# ----------------------------------------------------------------------------------------------------------
# Paste-back


def feather_mask(u: torch.Tensor, v: torch.Tensor, size: int, feather: float) -> torch.Tensor:
    """Mask of the face crop at crop coordinates (u, v): 0 at and beyond the crop's edges, rising smoothly
    (smoothstep) to 1 at `feather` * size inside them."""
    d = torch.minimum(torch.minimum(u, size - u), torch.minimum(v, size - v))  # distance to the nearest edge
    r = (d / max(feather * size, 1e-9)).clamp(0, 1)
    return r * r * (3 - 2 * r)


def _footprint(shape, M, size: int):
    """The pixel rectangle (x0, y0, x1, y1) of the background covered by the crop [0, size]^2 (M: background ->
    crop), clipped to the background; None if empty."""
    H, W = shape[:2]
    corners = apply(invert(M), [[0, 0], [size, 0], [0, size], [size, size]])
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _region_mask(shape, M, size: int, feather: float):
    """(footprint rectangle, mask [h, w] over it, grid [1, h, w, 2] into the crop) or None."""
    box = _footprint(shape, M, size)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    g = _grid(M, y1 - y0, x1 - x0, size, size, x0, y0)                    # [1, h, w, 2], normalised crop coords
    u, v = (g[0, ..., 0] + 1) * (size / 2), (g[0, ..., 1] + 1) * (size / 2)
    return box, feather_mask(u, v, size, feather), g


def face_mask(shape, M, size: int, feather: float = 0.1) -> np.ndarray:
    """The blending mask [H, W] float32 that paste_back uses for a crop of side `size` (M: background -> crop)."""
    out = np.zeros(shape[:2], np.float32)
    r = _region_mask(shape, M, size, feather)
    if r is not None:
        (x0, y0, x1, y1), m, _ = r
        out[y0:y1, x0:x1] = m.numpy()
    return out


def paste_back(background, face, M, *, feather: float = 0.1, inplace: bool = False) -> np.ndarray:
    """Blend `face` [s, s, C] into `background` [H, W, C] (both float in [0, 1]), where M maps background
    coordinates to face coordinates (align's M, passed through `rescale` when the images were upscaled). Several
    faces: lists of faces and of transforms, pasted in order (one copy of the background).

    out = bg + m (face(M p) - bg) with the feathered mask m of `feather_mask`; pixels where m = 0 are the
    background's, exactly. Blended pixels are clipped to [0, 1]. A face denser than the background (M's scale > 1)
    is first shrunk with antialiased bicubic. Returns a new array of the background's shape and float dtype, or
    with inplace=True the background itself (a float32 array), changed (no copy of a large picture).
    """
    out = as_float_image(background)
    out = out if inplace and out is background else out.copy()
    pairs = zip(face, M) if isinstance(face, (list, tuple)) else [(face, M)]
    for fc, m in pairs:
        _paste_into(out, as_float_image(fc), m, feather)
    return out


def _paste_into(out: np.ndarray, fc: np.ndarray, M, feather: float) -> None:
    """paste_back of one face, in place on out [H, W, C]."""
    s = fc.shape[0]
    assert fc.shape[:2] == (s, s) and fc.shape[2] == out.shape[2], (fc.shape, out.shape)
    planes = torch.from_numpy(np.ascontiguousarray(fc)).permute(2, 0, 1)       # [C, s, s]
    k = scale_of(M)
    if k > 1:                                                                    # antialias: one face px per bg px
        n = max(1, round(s / k))
        planes, M, s = imresize(planes, size=n), rescale(M, 1, n / s), n
    r = _region_mask(out.shape, M, s, feather)
    if r is None:
        return
    (x0, y0, x1, y1), m, g = r
    warped = F.grid_sample(planes[None], g, mode="bicubic", padding_mode="border", align_corners=False)[0]
    region = torch.from_numpy(out[y0:y1, x0:x1]).permute(2, 0, 1)             # [C, h, w], a view of out
    blended = (region + m.to(region.dtype) * (warped.to(region.dtype) - region)).clamp(0, 1)
    region.copy_(torch.where(m > 0, blended, region))                          # m = 0: background, bit for bit


# ----------------------------------------------------------------------------------------------------------
# Templates


def measure_template(detector: Detector, images, box: tuple, size: int = 256):
    """Mean landmark positions of the faces in the square `box` (left, top, side) of `images` (arrays or paths),
    normalised to the box ([0, 1]). Each image is enlarged so the box is `size` px (MTCNN needs faces of 12+ px)
    and searched whole; the largest face whose centre lies in the box counts. Returns (mean [5, 2], std [5, 2],
    number of images with a face)."""
    left, top, side = box
    r = size / side
    found = []
    for image in images:
        a = read_rgb(image).permute(1, 2, 0).numpy() if isinstance(image, (str, Path)) else \
            as_float_image(image)
        t = rgb_planes(a).double()                                               # [3, H, W]
        big = imresize(t, scale=r).clamp(0, 1).float()                           # [3, ceil(rH), ceil(rW)]
        scale = torch.tensor([big.shape[2] / t.shape[2], big.shape[1] / t.shape[1]], dtype=torch.float64)
        for f in detector.detect(big.permute(1, 2, 0).numpy()):
            cx, cy = (f.box[0] + f.box[2]) / 2 / scale[0], (f.box[1] + f.box[3]) / 2 / scale[1]
            if left <= cx < left + side and top <= cy < top + side:
                lm = f.landmarks / scale.numpy()                                   # image pixels
                found.append((lm - np.array([left, top])) / side)
                break
    if not found:
        raise ValueError("no face found in any image: check the box")
    found = np.stack(found)                                                      # [n, 5, 2]
    return found.mean(0), found.std(0), len(found)


def with_margin(template, size: int, margin: int) -> np.ndarray:
    """The template of a crop `margin` px wider on every side: a size x size crop framed by `template` is the centre
    of the (size + 2 margin) crop framed by the result (training crops with room for --crop-jitter)."""
    return (np.asarray(template, np.float64) * size + margin) / (size + 2 * margin)


def align_folder(src, dst, template, size: int, detector: Detector | None = None, margin: int = 0) -> tuple:
    """Training data framed like a model's inputs: every photo of `src` (images.list_images) with its largest face
    aligned to `template` at size x size, written as PNG to `dst` (same relative names); with `margin`, a crop that
    much wider on every side, the size x size frame at its centre. Small photos are searched enlarged to 256 px
    (MTCNN's smallest face is 12 px); the crop is cut from the photo itself. Returns (written, photos without a
    face)."""
    from images import list_images, write_image
    detector = detector or load_detector()
    src, dst = Path(src), Path(dst)
    template, side = with_margin(template, size, margin), size + 2 * margin
    written, missed = 0, []
    for f in list_images(src):
        a = read_rgb(f)                                                           # [3, H, W]
        r = max(1.0, 256 / min(a.shape[1:]))
        found = detector.detect(imresize(a, scale=r).clamp(0, 1).permute(1, 2, 0).numpy() if r > 1 else
                                a.permute(1, 2, 0).numpy())
        if not found:
            missed.append(f)
            continue
        crop, _ = align(a.permute(1, 2, 0).numpy(), found[0].landmarks / r, template, side)
        out = (dst / f.relative_to(src)).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        write_image(crop, out)
        written += 1
    return written, missed


# ----------------------------------------------------------------------------------------------------------
# Weights conversion (facenet-pytorch's three state dicts -> one safetensors file)


def convert(src_dir, out=None) -> Path:
    """Read pnet.pt, rnet.pt, onet.pt (plain state dicts, loaded with weights_only=True) from `src_dir` (the
    facenet_pytorch/data folder of the facenet-pytorch 2.6.0 wheel) and write them, checked against our networks,
    as one safetensors file (default: weights/mtcnn.safetensors next to this file)."""
    src_dir = Path(src_dir)
    out = Path(out) if out else Path(__file__).resolve().parent / MTCNN_WEIGHTS.url
    sd = {}
    for name in ("pnet", "rnet", "onet"):
        part = torch.load(src_dir / f"{name}.pt", map_location="cpu", weights_only=True)
        sd.update({f"{name}.{k}": v.float().contiguous() for k, v in part.items()})
    net = MTCNN()
    load_state_strict(net, sd, {k: k for k in net.state_dict()}, str(src_dir))    # every key and shape present
    about = {"source": "facenet-pytorch 2.6.0 (pip wheel), facenet_pytorch/data/{p,r,o}net.pt",
             "license": "MIT (facenet-pytorch, Copyright (c) 2019 Timothy Esler)",
             "paper": "Zhang, Zhang, Li, Qiao: Joint Face Detection and Alignment using Multitask Cascaded "
                      "Convolutional Networks, IEEE SPL 2016"}
    # one metadata entry: safetensors writes several in hash order, which would change the file's sha256 per run
    save_file({"state_dict": sd, "metadata": {"mtcnn": json.dumps(about, sort_keys=True)}}, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Measurements (python faces.py --measure-template DIR, --rates DIR, --speed)


def face_scene(sizes=(40, 56, 72, 96, 128), width: int = 640, height: int = 480, gap: int = 16):
    """A synthetic photo of several faces: squares around the astronaut's head (scikit-image, public domain) of
    the given sides, in rows on the rocket picture. Returns (image [height, width, 3] float32, [(x0, y0, side)])."""
    from skimage import data
    bg = torch.from_numpy(data.rocket()).permute(2, 0, 1).double() / 255
    canvas = imresize(bg, size=(height, width)).clamp(0, 1)                  # [3, height, width]
    head = torch.from_numpy(data.astronaut()[20:200, 135:315]).permute(2, 0, 1).double() / 255   # [3, 180, 180]
    placed, x, y, row = [], gap, gap, 0
    for s in sizes:
        if x + s > width - gap:
            x, y, row = gap, y + row + gap, 0
        if y + s > height - gap:
            raise ValueError(f"faces of sides {sizes} do not fit in {width}x{height}")
        canvas[:, y:y + s, x:x + s] = imresize(head, size=s).clamp(0, 1)
        placed.append((x, y, s))
        x, row = x + s + gap, max(row, s)
    return canvas.permute(1, 2, 0).float().numpy(), placed


def dlib_detector(upsample: int = 1):
    """The alternative measured in docs/faces.md: dlib's HOG detector (frontal faces; 80 px windows, halved per
    `upsample`) and its CC0 5-point predictor from face_recognition_models. image [H, W, 3] float -> [Face], with
    dlib's 5 points (eye corners and the base of the nose: no mouth) as landmarks and score = HOG margin."""
    import importlib.util
    import dlib
    spec = importlib.util.find_spec("face_recognition_models")                 # its __init__ needs pkg_resources
    if spec is None:
        raise ImportError("pip install face_recognition_models (dlib's CC0 5-point model)")
    models = Path(spec.origin).parent / "models"
    hog = dlib.get_frontal_face_detector()
    points = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))

    def detect(image) -> list:
        # C-contiguous: dlib-bin 20.0.1 reads strided arrays wrongly (detections then vary from call to call)
        a = np.ascontiguousarray((rgb_planes(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        rects, scores, _ = hog.run(a, upsample, 0.0)
        out = []
        for r, sc in zip(rects, scores):
            lm = np.array([[p.x, p.y] for p in points(a, r).parts()], np.float64) + 0.5   # centres at j + 0.5
            out.append(Face((r.left() + 0.5, r.top() + 0.5, r.right() + 1.5, r.bottom() + 1.5), float(sc), lm))
        return sorted(out, key=lambda f: -(f.box[2] - f.box[0]))
    return detect


def detection_rates(files, widths, detectors: dict) -> dict:
    """Detection rate against face size on aligned, centred face crops (e.g. LFW's): each image is resized (MATLAB
    bicubic) so that its face box (MTCNN's at full size, median over `files`) is `width` px. A detection counts as
    a hit when its box centre is within 0.3 width of where the face is; other detections are false alarms.
    Landmark error: the largest distance of a detector's 5 points from its own at full size (scaled), in eye
    distances (MTCNN's median eye distance at that size, for every detector)."""
    ref = load_detector()
    full = [read_rgb(f).permute(1, 2, 0).numpy() for f in files]
    first = [ref.detect(a) for a in full]
    boxes = np.array([f[0].box for f in first if f])                            # [n, 4]
    box_w = float(np.median(boxes[:, 2] - boxes[:, 0]))
    centre = np.median((boxes[:, :2] + boxes[:, 2:]) / 2, axis=0)
    iod = float(np.median([np.linalg.norm(f[0].landmarks[1] - f[0].landmarks[0]) for f in first if f]))
    results = {"files": len(files), "box_w": box_w, "iod": iod, "centre": centre.tolist(), "rows": []}
    own = {name: [det(a) for a in full] for name, det in detectors.items()}      # full-size landmarks per detector
    for w in widths:
        r = w / box_w
        row = {"width": w, "iod": iod * r, "image": math.ceil(full[0].shape[1] * r)}
        small = [imresize(torch.from_numpy(a).permute(2, 0, 1).double(), scale=r).clamp(0, 1).permute(1, 2, 0)
                 .float().numpy() for a in full]
        for name, det in detectors.items():
            hits, false, err = 0, 0, []
            for a, big in zip(small, own[name]):
                found = det(a)
                c = centre * a.shape[1] / full[0].shape[1]
                ok = [f for f in found if np.hypot(*((np.array(f.box[:2]) + f.box[2:]) / 2 - c)) < 0.3 * w]
                hits += bool(ok)
                false += len(found) - min(len(ok), 1)
                if ok and big:
                    ref_lm = big[0].landmarks * a.shape[1] / full[0].shape[1]
                    err.append(np.linalg.norm(ok[0].landmarks - ref_lm, axis=1).max() / row["iod"])
            row[name] = {"rate": hits / len(full), "false": false, "lm_err": float(np.median(err)) if err else None}
        results["rows"].append(row)
    return results


def timed(fn, repeat: int = 5):
    """(result, the shortest time in seconds of `repeat` calls after one warm-up: on a shared machine the least
    disturbed run is the closest to the cost of the work)."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--convert", metavar="DIR", help="rebuild weights/mtcnn.safetensors from facenet_pytorch/data")
    ap.add_argument("--out", help="output file of --convert")
    ap.add_argument("--align", nargs=2, metavar=("SRC", "DST"), help="write the photos of SRC with their largest face "
                    "aligned to --model's framing at its output size into DST (training data, see train.py)")
    ap.add_argument("--model", default="glean_face_small_8x", help="the face model whose framing --align uses")
    ap.add_argument("--template", help="--align: a template by name (ffhq, celeba_64, tight: zoo.TEMPLATES) and "
                    "--size, instead of --model's")
    ap.add_argument("--size", type=int, help="--align: crop size (default: --model's output size)")
    ap.add_argument("--margin", type=int, default=0, help="--align: px added on every side around the framed crop "
                    "(room for train.py --crop-jitter; default 0)")
    ap.add_argument("--measure-template", metavar="DIR", help="CelebA 89x109 folder: the shipped model's template")
    ap.add_argument("--box", type=int, nargs=3, default=(8, 23, 73), metavar=("LEFT", "TOP", "SIDE"),
                    help="crop box of --measure-template (default: the shipped model's, in CelebA's 89x109 photos)")
    ap.add_argument("--count", type=int, default=2000, help="images for --measure-template")
    ap.add_argument("--rates", metavar="DIR", help="detection rate against face size on the first 300 images of DIR "
                    "(aligned face crops, e.g. lfw_val_128/images), MTCNN and dlib HOG")
    ap.add_argument("--speed", action="store_true", help="detection times on synthetic scenes (the whole --faces "
                    "pipeline: python bench.py --configs faces)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.set_printoptions(precision=4, suppress=True)
    if args.convert:
        print(convert(args.convert, args.out))
    if args.align:
        import zoo
        w = zoo.WEIGHTS[args.model]
        template = zoo.TEMPLATES.get(args.template) if args.template else w.template
        if not template:
            print(f"error: {args.template or args.model} is not a face template (ones known: "
                  f"{', '.join(zoo.TEMPLATES)})", file=sys.stderr)
            return 2
        size = args.size or w.config["out_size"]
        n, missed = align_folder(*args.align, np.asarray(template), size, margin=args.margin)
        print(f"{n} aligned crops of {size + 2 * args.margin} px written to {args.align[1]}; no face in {len(missed)}")
    if args.measure_template:
        files = sorted(p for p in Path(args.measure_template).iterdir() if p.suffix in (".png", ".jpg"))
        files = files[:args.count]
        t0 = time.perf_counter()
        mean, std, n = measure_template(load_detector(), files, tuple(args.box))
        print(f"{n} of {len(files)} images with a face ({time.perf_counter() - t0:.0f} s)")
        print("mean:\n", mean, "\nstd:\n", std)
    if args.rates:
        files = sorted(p for p in Path(args.rates).iterdir() if p.suffix in (".png", ".jpg"))[:300]
        d12, d20 = Detector(DetectorConfig(min_face=12)), load_detector()
        dets = {"MTCNN (min 12)": d12.detect, "MTCNN (min 20)": d20.detect,
                **{f"dlib HOG (up {u})": dlib_detector(u) for u in (0, 1, 2)}}
        res = detection_rates(files, (8, 10, 12, 16, 20, 24, 32, 48, 64, 96), dets)
        print(f"{res['files']} images; at full size MTCNN box {res['box_w']:.1f} px, eye distance {res['iod']:.1f} px")
        print("| face box (px) | eye dist. (px) | image (px) | " + " | ".join(dets) + " |")
        print("| --- " * (3 + len(dets)) + "|")
        for row in res["rows"]:
            cells = [f"{row[n]['rate']:.0%} ({row[n]['false']}; " + (f"{row[n]['lm_err']:.2f})" if row[n]['lm_err']
                     is not None else "-)") for n in dets]
            print(f"| {row['width']} | {row['iod']:.1f} | {row['image']} | " + " | ".join(cells) + " |")
    if args.speed:
        for w, h, sizes in ((640, 480, (40, 56, 72, 96, 128)), (1024, 768, (64, 96, 128, 192, 256))):
            img, placed = face_scene(sizes, w, h)
            for name, det in (("MTCNN (min 20)", load_detector().detect),
                              *((f"dlib HOG (up {u})", dlib_detector(u)) for u in (0, 1, 2))):
                found, sec = timed(functools.partial(det, img))
                print(f"{w}x{h}, {len(placed)} faces: {name} finds {len(found)} in {1000 * sec:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
