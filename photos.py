"""Faces in real photos (infer.py --faces, the demo's Photo tab): which model restores which face, and the whole
photo at any scale in bounded memory.

The promise is "do no harm": a face is only handed to a GLEAN model whose input fits it. Each face model takes a
face framed by its template at in_size x in_size pixels; squeezing a 60 px face into an 8 px input throws its
identity away, and no model can give it back. So, per face:

    shrink(face, model) = photo pixels per pixel of the model's aligned input   (faces.crop_scale)
    fits                 <=>  shrink <= max_shrink   (default 1.25: at most a mild antialiased shrink)
    chosen model         =   the fitting model with the largest shrink (the least enlargement: it uses the photo's
                             pixels best); none fits -> the face stays as the plain (bicubic) upscale, with a note

The candidates are the registered face models whose weights are on this machine (the shipped ones, and official
ones downloaded before); `-m` forces one. Detections are filtered first (`plausible`): a weak score or a landmark
layout no face has (mouth above the eyes, eyes too close for the box, a profile) is never given a face.

A model trained with framing jitter (a "window" model: the 128 px ones) takes an upright face near its scale as the
window of the photo's own pixels nearest its template's frame, not resampled (model_input); others get the face
warped onto their template.

Each face is restored at its model's own scale and warped into the output at the user's scale (antialiased when
that shrinks it). It is blended under a feathered mask of the face region, brows to chin and cheek to cheek, built
from the landmarks (not the aligned square), so hair, text and neighbours stay as the background; overlapping
faces are averaged by their masks (no seams). Outside every mask the output is the background upscale, bit for bit.

The background (MATLAB bicubic of the whole photo) and the paste-back are computed in bands of output rows, and the
result is assembled directly in its final 8- or 16-bit form, so memory grows with one band, not with the output
(plus the output itself, at one or two bytes per sample). A greyscale photo (L, LA, or RGB with equal channels)
gets greyscale faces.
"""
import functools
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import faces
import glean_fast
import zoo
from images import InputError, imresize, upscale_axis

MAX_SHRINK = 1.25            # default: a face may be shrunk at most this much to fit a model's input
MIN_SCORE = 0.985            # O-Net probability a detection needs (tuned: evaluate.py --detections, README) ...
MIN_SCORE_TINY = 0.92        # ... or, for a face box under 12 px wide (tiny faces score lower), this
MIN_FACE = 12                # smallest face box searched for (px): MTCNN's 12 px window, the faces our models take
WINDOW_SHRINK = (0.8, 1.25)  # a face this near its model's scale (shrink) ...
WINDOW_ROLL = 10.0           # ... and this near upright (degrees) goes to a window model as a window (model_input)
MAX_OUTPUT_PIXELS = 400e6    # default --max-output-megapixels: refused before any work
BAND_VALUES = 1 << 23        # float32 values per band of output rows (32 MiB): bounds the working memory


class Note(UserWarning):
    """What the photo pipeline did that a caller should know (a face left alone, a shrink, a crop). The command
    line prints these; from Python, `restore_faces` returns them and `infer.upscale` emits them as warnings."""


@dataclass(frozen=True)
class FaceModel:
    """What choosing a model for a face needs to know about it, without loading its weights."""
    name: str
    in_size: int
    out_size: int
    template: tuple
    offline: bool = True
    window: bool = False        # takes a window of the photo's own pixels near its framing (model_input)


@dataclass
class FaceReport:
    """One detected face: where it is in the input photo, and what happened to it."""
    box: tuple                  # (x0, y0, x1, y1) in the input photo's pixels
    score: float                # the detector's face probability
    restored: bool = False
    model: str = ""             # the model that restored it (restored) or would fit it (left alone), if any
    shrink: float = 0.0         # photo pixels per input pixel of `model`
    reason: str = ""            # why it was left alone


@dataclass
class Restored:
    """restore_photo's result: the image [H', W', C] (dtype as asked), the faces, and notes for the user."""
    image: np.ndarray
    faces: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    scale: float = 1.0


# ----------------------------------------------------------------------------------------------------------
# Which model for which face


def registered_face_models(offline_only: bool = True) -> list:
    """The registered GLEAN face models (zoo.WEIGHTS with a template), those whose file is on this machine first."""
    out = []
    for name, w in zoo.WEIGHTS.items():
        if w.kind.startswith("glean") and w.template:
            offline = zoo.local_file(name) is not None
            if offline or not offline_only:
                out.append(FaceModel(name, w.config["in_size"], w.config["out_size"], w.template, offline, w.window))
    return out


def describe_model(model) -> FaceModel:
    """A loaded model (e.g. `-m FILE`) as a candidate: its config and face template."""
    template = tuple(getattr(model, "face_template", ()))
    if not template:
        raise InputError(f"--faces needs a face model (one whose face template is in the weights table: "
                         f"{', '.join(m.name for m in registered_face_models(False))})")
    return FaceModel(getattr(model, "name", "") or "the given model", model.cfg.in_size, model.cfg.out_size, template,
                     window=bool(getattr(model, "face_window", False)))


def shrink_for(landmarks, m: FaceModel) -> float:
    """Photo pixels per pixel of m's aligned input for this face (> 1: shrunk to fit, < 1: enlarged)."""
    return faces.crop_scale(landmarks, np.asarray(m.template), m.in_size)


def choose(landmarks, candidates: list, max_shrink: float = MAX_SHRINK) -> tuple:
    """(the fitting candidate with the largest shrink, its shrink), or (None, smallest shrink of any candidate)."""
    scored = [(shrink_for(landmarks, m), m) for m in candidates]
    fitting = [(s, m) for s, m in scored if s <= max_shrink]
    if fitting:
        s, m = max(fitting, key=lambda t: t[0])
        return m, s
    return None, min((s for s, _ in scored), default=math.inf)


def model_input(a: np.ndarray, landmarks, m: FaceModel) -> tuple:
    """The model's input for a face: (crop [in, in, 3] in [0, 1], M: photo -> crop coordinates).

    Warping a face onto the template resamples the photo, and at 16 px that blurs away much of what the model has
    to go on (bicubic from such a crop: 1.4 dB below plain bicubic in the face region, README). So a face near the
    model's scale and upright goes to a window model (trained with framing jitter) as the window of the photo's own
    pixels nearest the template's frame (faces.window: a whole-pixel shift, no resampling); others are warped onto
    the template (faces.align)."""
    rgb = a[..., :3] if a.shape[2] >= 3 else np.repeat(a[..., :1], 3, 2)
    template = np.asarray(m.template)
    M = faces.similarity_transform(landmarks, template * m.in_size)
    roll = abs(math.degrees(math.atan2(M[1, 0], M[0, 0])))
    shrink = 1 / faces.scale_of(M)
    if m.window and roll <= WINDOW_ROLL and WINDOW_SHRINK[0] <= shrink <= WINDOW_SHRINK[1]:
        return faces.window(rgb, landmarks, template, m.in_size)
    return faces.align(rgb, landmarks, template, m.in_size)


# ----------------------------------------------------------------------------------------------------------
# Which detections are faces


def face_frame(landmarks) -> tuple:
    """The face's own frame from its 5 landmarks: (eye midpoint e [2], eye distance d, x axis ex [2] along the eyes,
    y axis ey [2] pointing down the face)."""
    lm = np.asarray(landmarks, np.float64)
    e = (lm[0] + lm[1]) / 2
    d = float(np.linalg.norm(lm[1] - lm[0]))
    ex = (lm[1] - lm[0]) / max(d, 1e-9)
    ey = np.array([-ex[1], ex[0]])                      # ex turned 90 degrees: down when the face is upright
    return e, d, ex, ey


def plausible(f) -> str:
    """'' if the detection looks like a face, else why not: a weak score, or a landmark layout no frontal face has.
    Measured on 277 LFW training photos shrunk 1-8x (the faces' boxes 9-200 px): faces score >= 0.986 with boxes of
    12 px and more, >= 0.934 below; patterned ties, gravel and the like reach 0.95-0.98. Faces' eye distance is
    0.34-0.55 of the box width, the mouth 0.86-1.7 eye distances below the eyes, the nose within 0.71 of the eyes'
    midpoint across and below the eye line; the limits below leave a margin around those ranges."""
    width = f.box[2] - f.box[0]
    needed = MIN_SCORE if width >= 12 else MIN_SCORE_TINY
    if f.score < needed:
        return f"weak detection (score {f.score:.3f} < {needed:g})"
    e, d, ex, ey = face_frame(f.landmarks)
    lm = np.asarray(f.landmarks, np.float64)
    rel = lambda p: ((p - e) @ ex / max(d, 1e-9), (p - e) @ ey / max(d, 1e-9))  # noqa: E731  in eye distances
    nose, ml, mr = rel(lm[2]), rel(lm[3]), rel(lm[4])
    mouth_y = (ml[1] + mr[1]) / 2
    if not 0.3 <= d / max(width, 1e-9) <= 0.62:
        return f"eyes {d:.1f} px apart in a {width:.0f} px box"
    if not 0.75 <= mouth_y <= 1.8:
        return "mouth not below the eyes"
    if not (-0.75 <= nose[0] <= 0.75 and 0.1 <= nose[1] <= mouth_y):
        return "nose outside the face (a profile or not a face)"
    if not ml[0] < mr[0]:
        return "mouth corners in the wrong order"
    return ""


# ----------------------------------------------------------------------------------------------------------
# Masks and the background, in bands of output rows


def face_region(landmarks, shape: tuple, box: tuple, feather: float = 0.3) -> torch.Tensor:
    """The blending mask [y1 - y0, x1 - x0] over box (x0, y0, x1, y1) of an image: an ellipse over the face region
    (brows to chin, cheek to cheek) in the face's own frame, 1 inside, falling smoothly (smoothstep) to 0 over the
    outer `feather` of its radius. landmarks in the image's pixel coordinates."""
    e, d, ex, ey = face_frame(landmarks)
    lm = np.asarray(landmarks, np.float64)
    mouth = ((lm[3] + lm[4]) / 2 - e) @ ey                 # eye line to mouth, along the face (~1 d)
    top, bottom = -0.6 * d, mouth + 0.7 * d                # brows ... chin
    cy, ry, rx = (top + bottom) / 2, (bottom - top) / 2, 1.05 * d
    x0, y0, x1, y1 = box
    ys = torch.arange(y0, y1, dtype=torch.float64)[:, None] + 0.5 - e[1]
    xs = torch.arange(x0, x1, dtype=torch.float64)[None, :] + 0.5 - e[0]
    u, v = xs * ex[0] + ys * ex[1], xs * ey[0] + ys * ey[1]    # pixel centres in the face frame
    r = torch.sqrt((u / rx) ** 2 + ((v - cy) / ry) ** 2)
    t = ((1 - r) / feather).clamp(0, 1)
    return (t * t * (3 - 2 * t)).float()


def region_box(landmarks, shape: tuple) -> tuple | None:
    """The pixel rectangle (x0, y0, x1, y1) of an image [H, W, ...] holding face_region's ellipse; None if outside."""
    e, d, ex, ey = face_frame(landmarks)
    lm = np.asarray(landmarks, np.float64)
    reach = max(1.05 * d, (((lm[3] + lm[4]) / 2 - e) @ ey) + 0.7 * d, 0.6 * d) + 1
    H, W = shape[:2]
    x0, y0 = max(0, math.floor(e[0] - reach)), max(0, math.floor(e[1] - reach))
    x1, y1 = min(W, math.ceil(e[0] + reach)), min(H, math.ceil(e[1] + reach))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def background_rows(planes: torch.Tensor, s: float, o0: int, o1: int) -> torch.Tensor:
    """Rows o0..o1 of imresize(planes, scale=s) ([C, H, W] -> [C, o1 - o0, ceil(W s)]), from only the input rows
    they need. Integer s: the polyphase upscale of images.upscale_integer on a window with a halo, equal to the
    whole-image result; other scales: the window's own bicubic resize, equal away from the window's edges (the
    halo is wide enough that they are never used)."""
    C, H, W = planes.shape
    r = round(s)
    if abs(s - r) < 1e-9 and r >= 2 and min(H, W) >= 8:
        a, b = max(0, o0 // r - 4), min(H, -(-o1 // r) + 4)          # input rows with a halo of 4 (bicubic: 2)
        x = upscale_axis(planes[:, a:b].transpose(-1, -2), r).transpose(-1, -2)   # [C, r (b - a), W]
        return upscale_axis(x[:, o0 - a * r:o1 - a * r].contiguous(), r)           # [C, o1 - o0, r W]
    return _rows_by_matrix(planes, s, o0, o1)


def _rows_by_matrix(planes: torch.Tensor, s: float, o0: int, o1: int) -> torch.Tensor:
    """Non-integer scales (and sides under 8 px): the H axis by the taps of MATLAB's resize weights for rows
    o0..o1 only, the W axis by images.resize_last; no dense matrix over images.DENSE entries (a 20000x1 photo at 8x
    would need 25.6 GB for one)."""
    from images import resize_last, resize_weights
    C, H, W = planes.shape
    out_h, out_w = math.ceil(H * s), math.ceil(W * s)
    idx, w = resize_weights(H, out_h, s)                                  # [out_h, taps]
    idx, w = idx[o0:o1], w[o0:o1].to(planes.dtype)
    rows = sum(planes[:, idx[:, k]] * w[None, :, k, None] for k in range(idx.shape[1]))   # [C, rows, W]
    return resize_last(rows, out_w, s)                                                     # [C, rows, out_w]


def quantize(x: torch.Tensor, dtype) -> np.ndarray:
    """[C, h, w] float in [0, 1] -> [h, w, C] of dtype: uint8 / uint16 (rounded, as files hold them) or float32."""
    x = x.clamp(0, 1).permute(1, 2, 0)
    if dtype == np.uint8:
        return (x * 255).round().to(torch.uint8).numpy()
    if dtype == np.uint16:
        return (x.double() * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    return x.contiguous().numpy()


# ----------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Paste:
    """A restored face ready to be blended into the output rectangle box = (x0, y0, x1, y1): the face warped
    there [C, y1 - y0, x1 - x0] and its mask [y1 - y0, x1 - x0] (the face region, within the restored square)."""
    warped: torch.Tensor
    mask: torch.Tensor
    box: tuple


def warp_into(face: torch.Tensor, M: np.ndarray, landmarks, box: tuple) -> Paste:
    """The face [C, S, S] (M: output photo -> face coordinates) sampled over the output rectangle box, with the
    mask of its face region (landmarks in output coordinates) faded out at the square's edges."""
    x0, y0, x1, y1 = box
    S = face.shape[-1]
    g = faces._grid(M, y1 - y0, x1 - x0, S, S, x0, y0)                                 # [1, h, w, 2]
    warped = F.grid_sample(face[None], g, mode="bicubic", padding_mode="border", align_corners=False)[0]
    u, v = (g[0, ..., 0] + 1) * (S / 2), (g[0, ..., 1] + 1) * (S / 2)
    return Paste(warped, face_region(landmarks, None, box) * faces.feather_mask(u, v, S, 0.03), box)


def load_face_model(name: str, device: str = "cpu", precision: str = "auto"):
    """A registered face model, loaded once per process, device and precision (zoo.load_pretrained, the fast path;
    auto, fp32, bf16 or fp16, as glean_fast.choose_precision resolves it)."""
    return _face_model(name, device, glean_fast.choose_precision(precision, torch.device(device))[0])


@functools.lru_cache(maxsize=8)
def _face_model(name: str, device: str, precision: str):
    return glean_fast.to_precision_(zoo.load_pretrained(name), glean_fast.PRECISIONS[precision]).to(device)


def is_grey(a: np.ndarray) -> bool:
    """L / LA images, and RGB(A) images whose three channels are equal everywhere."""
    C = a.shape[2]
    return C in (1, 2) or bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]))


def run_faces(model, crops: list, grey: bool) -> torch.Tensor:
    """Aligned crops [in, in, 3] in [0, 1] -> the model's outputs [n, 3, out, out] in [0, 1] (one forward pass);
    grey photos get grey faces (ITU-R 601 luma in all three channels)."""
    p = next(model.parameters())
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).clamp(0, 1)
    with torch.no_grad():
        y = ((model((x * 2 - 1).to(p.device, p.dtype)).float().clamp(-1, 1) + 1) / 2).cpu()
    if grey:
        y = (0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]).expand(-1, 3, -1, -1).contiguous()
    return y


def prepare_paste(face: torch.Tensor, M: np.ndarray, landmarks, s: float, m: FaceModel, out_shape: tuple):
    """Place a restored face (at its model's scale) into the output at scale s: the transform, an antialiased
    shrink first where the face is denser than the output, and the rectangle its mask covers. None if outside."""
    M_out = faces.rescale(M, s, m.out_size / m.in_size)                 # output photo -> restored face
    k, S = faces.scale_of(M_out), face.shape[-1]
    if k > 1:                                                           # one face pixel per output pixel
        n = max(1, round(S / k))
        face, M_out = imresize(face, size=n).clamp(0, 1), faces.rescale(M_out, 1, n / S)
    lm_out = np.asarray(landmarks, np.float64) * s
    region, crop = region_box(lm_out, out_shape), faces._footprint(out_shape, M_out, face.shape[-1])
    if region is None or crop is None:
        return None
    box = (max(region[0], crop[0]), max(region[1], crop[1]), min(region[2], crop[2]), min(region[3], crop[3]))
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return warp_into(face, M_out, lm_out, box)


def blend_band(bg: torch.Tensor, pastes: list, o0: int) -> torch.Tensor:
    """Blend the faces into the colour planes bg [c, h, w] (output rows o0..o0 + h): out = bg + sum_i m_i (f_i - bg)
    / max(1, sum_i m_i), so overlapping faces are averaged by their masks; where every m_i = 0, bg bit for bit."""
    c, h, w = bg.shape
    num, den = torch.zeros_like(bg), torch.zeros(h, w)
    touched = False
    for p in pastes:
        x0, y0, x1, y1 = p.box
        y0, y1 = max(y0, o0), min(y1, o0 + h)
        if y1 <= y0:
            continue
        rows = slice(y0 - p.box[1], y1 - p.box[1])
        m, warped = p.mask[rows], p.warped[:c, rows]
        region = bg[:, y0 - o0:y1 - o0, x0:x1]
        num[:, y0 - o0:y1 - o0, x0:x1] += m * (warped - region)
        den[y0 - o0:y1 - o0, x0:x1] += m
        touched = True
    if not touched:
        return bg
    blended = (bg + num / den.clamp(min=1)).clamp(0, 1)
    return torch.where(den > 0, blended, bg)


def detect(a: np.ndarray, name: str, notes: list, found: list | None, only_center: bool):
    """The faces of photo a [H, W, C] worth restoring, and the reports of the detections rejected as not faces."""
    H, W = a.shape[:2]
    if found is None:
        if min(H, W) < MIN_FACE:
            notes.append(f"{name}: {W}x{H} is smaller than the face detector's {MIN_FACE} px window: upscaled "
                         f"without looking for faces")
            return [], []
        found = faces.load_detector().detect(a, min_face=MIN_FACE)
    kept, rejected = [], []
    for f in found:
        why = plausible(f)
        if why:
            rejected.append(FaceReport(tuple(f.box), f.score, reason=f"not taken for a face: {why}"))
        else:
            kept.append(f)
    if only_center and kept:
        centre = np.array([W, H]) / 2
        kept = [min(kept, key=lambda f: np.linalg.norm((np.array(f.box[:2]) + f.box[2:]) / 2 - centre))]
    return kept, rejected


def assign(found: list, candidates: list, max_shrink: float) -> list:
    """(face, FaceReport, chosen FaceModel or None) for each face: the model that restores it, or why none does."""
    every = registered_face_models(offline_only=False)
    out = []
    for f in found:
        m, s = choose(f.landmarks, candidates, max_shrink)
        report = FaceReport(tuple(f.box), f.score, model=m.name if m else "", shrink=s)
        if m is None:
            alt, alt_s = choose(f.landmarks, every, max_shrink)
            report.model, report.shrink = (alt.name, alt_s) if alt else ("", s)
            report.reason = (f"too large for the models' inputs (shrunk {s:.1f}x at best, more than {max_shrink:g}x)"
                             + (f"; {alt.name} ({'offline' if alt.offline else 'a download'}) fits it" if alt else
                                "; no registered model fits it"))
        out.append((f, report, m))
    return out


def restore_photo(a: np.ndarray, *, model=None, candidates: list | None = None, outscale: float = 0.0,
                  max_shrink: float = MAX_SHRINK, only_center: bool = False,
                  found: list | None = None, name: str = "image", dtype=np.float32,
                  max_output_pixels: float = MAX_OUTPUT_PIXELS, times: dict | None = None,
                  precision: str = "auto") -> Restored:
    """The photo a [H, W, C] (float32 in [0, 1]; C = 1-4) upscaled by `outscale` (default: 4, or a forced model's
    scale) with its faces restored (module docstring). `model`: a loaded GLEAN face model to use for every face
    that fits it (-m); else the `candidates` (default: the offline registered face models). `found`: the photo's
    detections, if made already. The image comes back as `dtype` (uint8/uint16: as a file holds it); `precision`
    (auto, fp32, bf16, fp16): of the models loaded here."""
    times = times if times is not None else {}
    clock = [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        times[stage], clock[0] = times.get(stage, 0.0) + now - clock[0], now

    H, W = a.shape[:2]
    forced = describe_model(model) if model is not None else None
    s = float(outscale or (forced.out_size / forced.in_size if forced else 4))
    out_h, out_w = math.ceil(H * s), math.ceil(W * s)
    if max_output_pixels and out_h * out_w > max_output_pixels:
        raise InputError(f"{name}: {W}x{H} upscaled {s:g}x would be {out_w}x{out_h}, {out_h * out_w / 1e6:.0f} "
                         f"million pixels, above the limit of {max_output_pixels / 1e6:g} million (raise it with "
                         f"--max-output-megapixels, or lower --outscale)")
    notes, grey = [], is_grey(a)
    kept, rejected = detect(a, name, notes, found, only_center)
    lap("detect")
    plan = assign(kept, [forced] if forced else (candidates or registered_face_models()), max_shrink)
    pastes = []
    for m in {m for _, _, m in plan if m is not None}:
        group = [(f, r) for f, r, mm in plan if mm == m]
        net = model if forced else load_face_model(m.name, str(next(model.parameters()).device) if model else "cpu",
                                                   precision)
        aligned = [model_input(a, f.landmarks, m) for f, _ in group]
        lap("align")
        ys = run_faces(net, [c for c, _ in aligned], grey)
        lap("glean")
        for (f, r), (_, M), y in zip(group, aligned, ys):
            p = prepare_paste(y, M, f.landmarks, s, m, (out_h, out_w))
            r.restored = p is not None
            r.reason = "" if p is not None else "outside the picture"
            pastes += [p] if p is not None else []
    out = compose(a, s, pastes, grey, dtype, times, lap)
    reports = [r for _, r, _ in plan] + rejected
    notes += summarize(name, reports, forced, max_shrink)
    return Restored(out, reports, notes, s)


def compose(a: np.ndarray, s: float, pastes: list, grey: bool, dtype, times: dict, lap) -> np.ndarray:
    """The output: the background upscale of every plane of a, band by band, with the faces blended into its colour
    planes (the first 3, or the grey one); alpha stays the background's."""
    H, W, C = a.shape
    planes = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)          # [C, H, W]
    out_h, out_w = math.ceil(H * s), math.ceil(W * s)
    out = np.empty((out_h, out_w, C), dtype)
    colour = 1 if C in (1, 2) else 3
    rows = max(1, BAND_VALUES // (C * out_w))
    for o0 in range(0, out_h, rows):
        o1 = min(out_h, o0 + rows)
        bg = background_rows(planes, s, o0, o1)                                      # [C, o1 - o0, out_w]
        lap("background")
        bg[:colour] = blend_band(bg[:colour], pastes, o0) if not (grey and colour == 3) else \
            blend_band(bg[:1], pastes, o0).expand(3, -1, -1)
        out[o0:o1] = quantize(bg, dtype)
        lap("paste")
    return out


def summarize(name: str, reports: list, forced: FaceModel | None, max_shrink: float) -> list:
    """The notes a user reads: faces restored (by which model), faces left alone (and which registered model would
    fit them, offline or a download), detections not taken for faces."""
    notes = []
    restored = [r for r in reports if r.restored]
    rejected = [r for r in reports if r.reason.startswith("not taken")]
    left = [r for r in reports if not r.restored and r not in rejected]
    if not restored and not left:
        notes.append(f"{name}: no face found; the whole image was upscaled with bicubic")
    if restored:
        by = Counter(r.model for r in restored)
        notes.append(f"{name}: {len(restored)} face(s) restored (" + ", ".join(f"{k} by {m}" for m, k in by.items())
                     + ")")
    if left:
        every = {m.name: m for m in registered_face_models(offline_only=False)}
        fits = Counter(r.model for r in left if r.model in every)
        alts = [f"{m} ({'offline' if every[m].offline else 'a download: -m ' + m}) would fit {k}"
                for m, k in fits.items()]
        none = len(left) - sum(fits.values())
        what = f"{forced.name}'s input" if forced else "the inputs of the offline face models"
        notes.append(f"{name}: {len(left)} face(s) left as the bicubic upscale, not restored: {what} would shrink "
                     f"them more than {max_shrink:g}x (--max-shrink)" + "".join(f"; {a}" for a in alts) +
                     (f"; {none} fit no registered model" if none else ""))
    if rejected:
        notes.append(f"{name}: {len(rejected)} detection(s) not taken for faces (e.g. "
                     f"{rejected[0].reason.removeprefix('not taken for a face: ')})")
    return notes
