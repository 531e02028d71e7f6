"""Upscale images with GLEAN: an importable `upscale(model, image)` and a thin command line.

    python infer.py -i photo.png -o out/                 # the default model
    python infer.py -i example:astronaut -o out/         # a face crop from scikit-image's astronaut
    python infer.py -i folder/ more.jpg -o out/ -m glean_face_16x --batch 4
    python infer.py -i portrait.jpg -o out/ --simulate   # degrade and restore: LR, bicubic, GLEAN, original
    python infer.py -i group.jpg -o out/ --faces         # the whole photo upscaled, faces GLEAN fits restored
    python infer.py -i edited.png --retouch --mask mask.png -o out/   # Sec. 6: remove retouching artefacts

GLEAN has a fixed input size (in_size). For a face model, an image of another size has its largest face aligned to
the model's framing (faces.py, the template in the weights table); other images are centre-cropped to a square and
resized with MATLAB's bicubic (--pad keeps the whole frame, --strict-size refuses). Every such change gets a note,
and so does a result smaller than its input. EXIF orientation, greyscale, palette, alpha (upscaled separately with
bicubic and re-attached) and 16-bit PNG/TIFF (written back as 16-bit) are handled. Outputs are written atomically:
a failed image leaves no file behind, and the run goes on with the others.
"""
import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import faces
import glean
import glean_fast
import photos
import zoo
from glean_io import CheckpointError, one_line, remove_killed_temp
from images import (IMAGE_EXTS, MAX_PIXELS, InputError, example_image, from_pil, imresize, kind_of, merge, read_image,
                    split, to_pil, write_format, write_image)

# ----------------------------------------------------------------------------------------------------------
# Upscaling


def resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """MATLAB bicubic resize of [..., H, W] to size x size (antialiased when shrinking)."""
    return t if t.shape[-1] == t.shape[-2] == size else imresize(t, size=size)


def fit(planes: torch.Tensor, size: int, *, strict: bool, pad: bool, notes: list, name: str = "input"):
    """[C, H, W] -> [C, size, size], and the box (top, left, height, width) of the original frame in it, as
    fractions. Centre-crop + resize by default, reflect-pad to a square with --pad, refuse with --strict-size."""
    _, H, W = planes.shape
    if H == W == size:
        return planes, (0.0, 0.0, 1.0, 1.0)
    if strict:
        raise InputError(f"{name} is {W}x{H}, the model takes {size}x{size} (drop --strict-size to crop and resize)")
    if pad:
        s = max(H, W)
        top, left = (s - H) // 2, (s - W) // 2
        notes.append(f"{name}: {W}x{H} padded to {s}x{s} and resized to {size}x{size}")
        return pad_resize(planes, size, top, left), (top / s, left / s, H / s, W / s)
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    if (H, W) != (s, s):
        notes.append(f"{name}: {W}x{H} centre-cropped to {s}x{s}" + (f" and resized to {size}x{size}"
                                                                       if s != size else ""))
    elif s != size:
        notes.append(f"{name}: {W}x{H} resized to {size}x{size} (MATLAB bicubic)")
    return resize(planes[:, top:top + s, left:left + s], size), (0.0, 0.0, 1.0, 1.0)


def pad_resize(planes: torch.Tensor, size: int, top: int, left: int) -> torch.Tensor:
    """[C, H, W] replicate-padded to a square of side s = max(H, W) (the image at (top, left)) and resized to
    [C, size, size], without making the s x s square: the resize is separable and padding one axis commutes with
    resizing the other, so the long axis is resized first ([C, H, size] for a wide image) and only then padded."""
    _, H, W = planes.shape
    s = max(H, W)
    x = imresize(planes, size=(H, size)) if W == s else imresize(planes, size=(size, W))   # long axis only
    pads = (0, 0, top, s - H - top) if W == s else (left, s - W - left, 0, 0)
    x = torch.nn.functional.pad(x[None], pads, mode="replicate")[0]               # [C, s, size] or [C, size, s]
    return imresize(x, size=(size, size))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_model(model: glean.GLEAN, rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, in, in] in [0, 1] -> [B, 3, out, out] in [0, 1] (float32, CPU)."""
    p = next(model.parameters())
    x = (rgb * 2 - 1).to(p.device, p.dtype)
    return ((model(x).float().clamp(-1, 1) + 1) / 2).cpu()


FACE_MIN_SIDE = 12   # faces.Detector searches with P-Net's 12 px window: an image with a shorter side has no face


def too_small(H: int, W: int) -> str:
    """Why faces are not searched for in an H x W image ('' when they are)."""
    return f"{W}x{H} is too small to search for a face (a side under {FACE_MIN_SIDE} px)" if min(H, W) < \
        FACE_MIN_SIDE else ""


def face_template(model: glean.GLEAN) -> np.ndarray | None:
    """The model's face template ([5, 2] fractions of its input frame, from the weights table), or None."""
    t = getattr(model, "face_template", ())
    return np.asarray(t, dtype=np.float64) if len(t) else None


def frame(model: glean.GLEAN, a: np.ndarray, name: str, notes: list, *, strict: bool = False, pad: bool = False,
          align_faces: bool = True) -> tuple:
    """An image [H, W, C] -> the model's input (rgb [3, in, in], alpha [1, out, out] or None, grey?, box of the
    original frame in the output as fractions). For a face model (one with a face template) an image of another
    size has its largest face aligned to the model's framing (faces.py); otherwise, or without a face, it is
    centre-cropped (--pad: padded; --strict-size: refused) and resized. Every change of size gets a note, and so
    does a result smaller than the image it came from."""
    cfg = model.cfg
    rgb, alpha, grey = split(a)
    H, W = a.shape[:2]
    template = face_template(model)
    found = []
    if align_faces and template is not None and (H, W) != (cfg.in_size, cfg.in_size) and not (strict or pad):
        found = [] if too_small(H, W) else faces.load_detector().detect(rgb.permute(1, 2, 0).numpy())
        if not found:
            notes.append(f"{name}: {too_small(H, W) or 'no face found'}; centre-cropped instead")
    if found:
        planes = np.ascontiguousarray(np.concatenate([rgb.permute(1, 2, 0).numpy()] + (
            [alpha.permute(1, 2, 0).numpy()] if alpha is not None else []), axis=2))
        crop, _ = faces.align(planes, found[0].landmarks, template, cfg.in_size)
        if alpha is not None:                                                  # at the output size directly
            alpha = torch.from_numpy(faces.align(planes, found[0].landmarks, template, cfg.out_size)[0][..., 3:])
            alpha = alpha.permute(2, 0, 1).clamp(0, 1)
        rgb = torch.from_numpy(np.ascontiguousarray(crop[..., :3])).permute(2, 0, 1).clamp(0, 1)
        notes.append(f"{name}: {W}x{H}, its largest face" + (f" (of {len(found)})" if len(found) > 1 else "") +
                     f" aligned to the model's {cfg.in_size}x{cfg.in_size} framing")
        box = (0.0, 0.0, 1.0, 1.0)
    else:
        rgb, box = fit(rgb, cfg.in_size, strict=strict, pad=pad, notes=notes, name=name)
        if alpha is not None:                      # the alpha plane follows the same crop/pad, then bicubic up
            alpha = resize(fit(alpha, cfg.in_size, strict=False, pad=pad, notes=[])[0], cfg.out_size).clamp(0, 1)
    out_h, out_w = max(1, round(box[2] * cfg.out_size)), max(1, round(box[3] * cfg.out_size))
    if out_h < H or out_w < W:
        hint = ("--faces upscales the whole photo with its faces restored, --simulate compares GLEAN with this face"
                if template is not None else f"the model takes {cfg.in_size}x{cfg.in_size} images")
        notes.append(f"{name}: the {out_w}x{out_h} result is smaller than the {W}x{H} input: {hint}")
    return rgb, alpha, grey, box


def upscale_arrays(model: glean.GLEAN, arrays: list, *, strict_size: bool = False, pad: bool = False,
                   names=None, align_faces: bool = True) -> tuple:
    """Upscale a batch of arrays [H, W, C] in [0, 1] (see `frame`); returns (outputs, notes). One forward pass."""
    cfg, notes = model.cfg, []
    names = names or [f"image {i}" for i in range(len(arrays))]
    prepared = [frame(model, a, name, notes, strict=strict_size, pad=pad, align_faces=align_faces)
                for a, name in zip(arrays, names)]
    sr = run_model(model, torch.stack([p[0] for p in prepared]))
    outputs = []
    for y, (_, alpha, grey, (top, left, h, w)) in zip(sr, prepared):
        a = merge(y, alpha, grey)
        n = cfg.out_size
        t, l_, hh, ww = round(top * n), round(left * n), max(1, round(h * n)), max(1, round(w * n))
        outputs.append(a[t:t + hh, l_:l_ + ww])     # --pad: back to the original frame's aspect ratio
    return outputs, notes


# ----------------------------------------------------------------------------------------------------------
# Photos: "degrade and restore" (--simulate) and faces in the wild (--faces), with faces.py


def needs_template(model: glean.GLEAN, what: str) -> np.ndarray:
    template = face_template(model)
    if template is None:
        raise InputError(f"{what} needs a face model (one whose face template is in the weights table: "
                         f"{', '.join(n for n, w in zoo.WEIGHTS.items() if w.template)})")
    return template


def to_display(t: torch.Tensor, size: int) -> Image.Image:
    """[3, h, w] in [0, 1] -> a PIL image enlarged to size x size with nearest neighbour (pixels stay visible)."""
    t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="nearest")[0]
    return Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def side_by_side(panels: list, labels: list, size: int) -> np.ndarray:
    """Panels [3, h, w] in [0, 1], each shown at size x size under its label: [18 + size, n size, 3]."""
    from PIL import ImageDraw
    canvas = Image.new("RGB", (size * len(panels), size + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (t, label) in enumerate(zip(panels, labels)):
        canvas.paste(to_display(t, size), (i * size, 18))
        draw.text((i * size + 4, 3), label, fill="black")
    return np.asarray(canvas, dtype=np.float32) / 255


def simulate(model: glean.GLEAN, a: np.ndarray, *, name: str = "image", notes: list | None = None) -> dict:
    """The paper's own setting ("degrade and restore"): the photo is the high-resolution original. Its largest face
    is aligned to the model's framing at out_size (for other categories: its centre square at out_size) as the
    reference, made the model's input with MATLAB's bicubic (imresize, antialiased), and upscaled by bicubic and by
    GLEAN. Returns {lr, bicubic, glean, reference,
    compare} as arrays [H, W, 3] in [0, 1] (evaluate.py --framing scores them on many faces)."""
    cfg, notes = model.cfg, notes if notes is not None else []
    template = face_template(model)
    rgb = split(a)[0]
    if template is None:                                   # not a face model: the centre square is the framing
        ref, _ = fit(rgb, cfg.out_size, strict=False, pad=False, notes=notes, name=name)
        enlarged = cfg.out_size / min(a.shape[:2])
    else:
        photo = rgb.permute(1, 2, 0).contiguous().numpy()                     # RGB [H, W, 3]
        found = [] if too_small(*photo.shape[:2]) else faces.load_detector().detect(photo)
        if not found:
            raise InputError(f"{name}: {too_small(*photo.shape[:2]) or 'no face found'}; --simulate needs a photo "
                             f"with a face")
        ref, M = faces.align(photo, found[0].landmarks, template, cfg.out_size)
        ref, enlarged = torch.from_numpy(np.ascontiguousarray(ref)).permute(2, 0, 1), faces.scale_of(M)
    if enlarged > 1.05:
        notes.append(f"{name}: the {'face' if template is not None else 'image'} is smaller in the photo than the "
                     f"{cfg.out_size}x{cfg.out_size} output, so the reference is enlarged from it ({enlarged:.1f}x): "
                     f"no true high-resolution original")
    ref = ref.clamp(0, 1)                                                     # [3, out, out]
    lr = imresize(ref, size=cfg.in_size).clamp(0, 1)                                        # the model's input
    bicubic = imresize(lr, size=cfg.out_size).clamp(0, 1)
    sr = run_model(model, lr[None])[0]
    size = max(cfg.out_size, 128)
    compare = side_by_side([lr, bicubic, sr, ref], [f"input {cfg.in_size}x{cfg.in_size}", "bicubic", "GLEAN",
                                                    "original"], size)
    hwc = lambda t: t.permute(1, 2, 0).contiguous().numpy()  # noqa: E731
    return {"lr": hwc(lr), "bicubic": hwc(bicubic), "glean": hwc(sr), "reference": hwc(ref), "compare": compare}


def restore_faces(model: glean.GLEAN | None, a: np.ndarray, *, outscale: float = 0, only_center: bool = False,
                  name: str = "image", notes: list | None = None, times: dict | None = None,
                  found: list | None = None, max_shrink: float = photos.MAX_SHRINK, reports: list | None = None,
                  max_output_pixels: float = photos.MAX_OUTPUT_PIXELS, dtype=np.float32,
                  precision: str = "auto") -> np.ndarray:
    """Faces in the wild (--faces, photos.restore_photo): the photo a [H, W, C] upscaled `outscale` times (default:
    4, or the given model's scale) with MATLAB bicubic, and each face whose size a model's input fits (shrunk at
    most `max_shrink`) restored by that model and blended back under a mask of the face region; every other face
    is left as the bicubic upscale. model=None picks, per face, among the face models available offline; a model
    is used for every face that fits it. Returns the image (float32 in [0, 1]); what happened to each face is
    appended to `reports` (photos.FaceReport), and the notes (faces left alone, detections rejected) to `notes` -
    or, when `notes` is None, emitted as photos.Note warnings. `times` collects seconds per stage; `found`: the
    photo's detections if made already. dtype=np.uint8 / np.uint16: the image as a file of 8 / 16 bits holds it
    (the command line: a large result never exists in float). `precision`: of the models loaded here (model=None).
    """
    r = photos.restore_photo(a, model=model, outscale=outscale, max_shrink=max_shrink, only_center=only_center,
                             found=found, name=name, times=times, max_output_pixels=max_output_pixels, dtype=dtype,
                             precision=precision)
    if reports is not None:
        reports += r.faces
    emit(r.notes, notes)
    return r.image


def emit(found: list, notes: list | None) -> None:
    """Pass notes on: into the caller's list, or (None) as photos.Note warnings a Python user sees."""
    if notes is not None:
        notes += found
        return
    for note in found:
        warnings.warn(note, photos.Note, stacklevel=3)


def as_arrays(image) -> tuple:
    """What upscale() takes, as arrays [H, W, C] float32 in [0, 1]: (arrays, bits, one image?). A PIL image; or a
    tensor [C, H, W] or a batch [B, C, H, W] (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) of uint8 (0-255), uint16
    (0-65535) or floats in [0, 1], as torchvision.io.read_image and ToTensor give them. Anything else is refused
    with a message that says what is expected."""
    if isinstance(image, Image.Image):
        a, bits = from_pil(image)
        return [a], bits, True
    if not torch.is_tensor(image):
        raise TypeError(f"upscale takes a PIL image or a tensor [C, H, W] / [B, C, H, W], not {type(image).__name__}"
                        f" (for a numpy array: PIL.Image.fromarray(array))")
    shape, t = list(image.shape), image.detach()
    if t.layout != torch.strided or t.is_meta:
        raise InputError(f"a {'meta' if t.is_meta else 'sparse'} tensor holds no image values here: pass a dense "
                         f"tensor (.to_dense(), or real data)")
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 2, 3, 4):
        raise InputError(f"expected an image tensor [C, H, W] or a batch [B, C, H, W] with C = 1, 2, 3 or 4 "
                         f"channels, got shape {shape}")
    if t.numel() == 0:
        raise InputError(f"the image tensor is empty (shape {shape})")
    if t.dtype in (torch.uint8, torch.uint16):
        bits = 8 if t.dtype == torch.uint8 else 16
        t = t.float() / (2 ** bits - 1)
    elif t.is_floating_point():
        t, bits = t.float(), 8
        if not torch.isfinite(t).all():
            raise InputError("the image tensor holds NaN or infinite values")
        lo, hi = t.min().item(), t.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            hint = (" (divide 0-255 values by 255)" if hi <= 255 and lo >= 0 else
                    " (map [-1, 1] values with (x + 1) / 2)" if lo >= -1 and hi <= 1 else "")
            raise InputError(f"float image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]{hint}")
        t = t.clamp(0, 1)
    else:
        raise InputError(f"a {t.dtype} tensor is not an image: pass uint8 (0-255) or floats in [0, 1]")
    batch = t if t.ndim == 4 else t[None]
    return [x.cpu().permute(1, 2, 0).contiguous().numpy() for x in batch], bits, t.ndim == 3 or len(batch) == 1


def upscale(model: glean.GLEAN, image, *, strict_size: bool = False, pad: bool = False):
    """Upscale with GLEAN: a PIL image, or a tensor (see as_arrays: uint8 or float [0, 1], [C, H, W] or a batch
    [B, C, H, W]). Returns a PIL image of the same kind (greyscale stays greyscale, alpha is kept, 16-bit greyscale
    stays 16-bit), or for a batch of several a list of them. What was done to fit the model (a crop, a face
    alignment, a result smaller than the input) is emitted as photos.Note warnings."""
    arrays, bits, single = as_arrays(image)
    out, notes = upscale_arrays(model, arrays, strict_size=strict_size, pad=pad)
    emit(notes, None)                                    # a crop, a face alignment, a result smaller than its input
    result = [to_pil(a, bits) for a in out]
    return result[0] if single else result


def retouch_arrays(model: glean.GLEAN, edited: np.ndarray, mask: np.ndarray | None = None, *, notes=None):
    """Sec. 6: bring an edited image to out_size, downsample it to in_size (where retouching artefacts vanish),
    super-resolve it back; with a mask (white = replace), blend only the masked region into the edited image."""
    cfg, notes = model.cfg, notes if notes is not None else []
    rgb, alpha, grey = split(edited)
    base, _ = fit(rgb, cfg.out_size, strict=False, pad=False, notes=notes, name="edited image")
    sr = run_model(model, resize(base, cfg.in_size)[None].clamp(0, 1))[0]
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask)).permute(2, 0, 1)
        m = m[:3].mean(0, keepdim=True) if m.shape[0] >= 3 else m[:1]
        m, _ = fit(m, cfg.out_size, strict=False, pad=False, notes=notes, name="mask")
        sr = base * (1 - m.clamp(0, 1)) + sr * m.clamp(0, 1)
    if alpha is not None:
        alpha = fit(alpha, cfg.out_size, strict=False, pad=False, notes=[])[0].clamp(0, 1)
    return merge(sr, alpha, grey)


def pick_device(name: str = "") -> torch.device:
    """--device: "" = CUDA if torch sees a GPU, else the CPU; a name torch does not know, or a device that is not
    there, is an InputError that says what to use instead."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: only cpu and cuda are supported")
    return dev


def load_model(name_or_path: str = "", device: str = "", precision: str = "auto", *,
               notes: list | None = None) -> glean.GLEAN:
    """A registered model (zoo.WEIGHTS) or a checkpoint file, on the device, its convolutions in `precision`:
    fp32, bf16, fp16 or auto (glean_fast.AUTO_RULE). The model takes and returns float32 whatever the precision;
    its `dtype` says which it runs in. A precision the device has no instructions for runs as asked, with a note
    (into `notes`, or a photos.Note warning). A file ending in .onnx (written by export.py) runs through
    onnxruntime, in the precision it was exported in (fp32)."""
    dev = pick_device(device)
    if precision not in ("auto", *glean_fast.PRECISIONS):
        raise InputError(f"unknown precision '{precision}': choose auto, {', '.join(glean_fast.PRECISIONS)}")
    if str(name_or_path).lower().endswith(".onnx"):
        if precision not in ("auto", "fp32"):
            raise InputError(f"--precision {precision}: an .onnx file runs in the precision it was exported in "
                             "(fp32); leave --precision out or use a PyTorch checkpoint")
        import export
        return export.OnnxGLEAN(name_or_path, str(dev))
    chosen, note = glean_fast.choose_precision(precision, dev)
    model = glean_fast.to_precision_(zoo.load_pretrained(name_or_path or zoo.DEFAULT_MODEL),
                                     glean_fast.PRECISIONS[chosen]).to(dev)
    emit([note] if note else [], notes)
    return model


# ----------------------------------------------------------------------------------------------------------
# Command line


def collect(inputs: list, outdir: Path | None = None) -> tuple:
    """The images to process as (file, folder it was found in or None), problems with the inputs themselves, and
    notes. Folders give their image files (IMAGE_EXTS, recursively, sorted; links to files are followed, links to
    folders are not), without the output folder `outdir` when it lies inside one; `example:NAME` is a built-in
    picture. Broken links, FIFOs and other non-files with an image suffix, and folders that cannot be read, are
    problems, one line each."""
    files, problems, notes = [], [], []
    skip = os.path.realpath(outdir) if outdir is not None else None
    for item in inputs:
        p = Path(item)
        if item.startswith("example:"):
            files.append((p, None))
        elif p.is_dir():
            found, odd = walk(p, skip, problems, notes)
            images = [q for q in found if q.suffix.lower() in IMAGE_EXTS]
            problems += [f"{q}: {why}, not an image file" for q, why in odd if q.suffix.lower() in IMAGE_EXTS]
            if not images and not odd:
                problems.append(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
            others = [q for q in found if q.suffix.lower() not in IMAGE_EXTS and not q.name.startswith(".")]
            if others:
                notes.append(f"{p}: {len(others)} file(s) skipped, not images by their suffix (e.g. {others[0].name})")
            files += [(q, p) for q in images]
        elif p.is_file():
            files.append((p, None))
        else:
            problems.append(f"{p}: {kind_of(p) or 'no such file or folder'}")
    return files, problems, notes


def walk(folder: Path, skip: str | None, problems: list, notes: list) -> tuple:
    """The files under `folder` (sorted) and the entries that are not files, as (path, what it is); a folder whose
    real path is `skip` (the output folder) is left out with a note, an unreadable folder is a problem."""
    found, odd, todo = [], [], [folder]
    while todo:
        d = todo.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as e:
            problems.append(f"{d}: cannot read this folder ({e.strerror or e}); its images were not processed")
            continue
        for e in entries:
            q = Path(e.path)
            if e.is_dir(follow_symlinks=False):
                if skip is not None and os.path.realpath(q) == skip:
                    notes.append(f"{q}: the output folder, inside the input folder {folder}: not read as input")
                else:
                    todo.append(q)
            elif e.is_file():
                found.append(q)
            elif not (e.is_symlink() and q.is_dir()):                          # links to folders: not followed
                odd.append((q, kind_of(q)))
    return sorted(found), sorted(odd)


def output_ext(src: Path, ext: str, bits: int, channels: int, notes: list) -> str:
    """The output suffix: --ext, or the input's (auto), unless that format cannot hold the result (then PNG, with a
    note): alpha or 16 bits in JPEG, 16-bit colour outside PNG/TIFF, GIF's 256 colours, formats Pillow cannot write."""
    out = src.suffix.lower() if ext == "auto" else "." + ext.lstrip(".").lower()
    fmt = write_format(out)
    why = ("GIF keeps only 256 colours" if fmt == "GIF" else
           f"'{out}' files cannot be written" if fmt is None else
           "JPEG cannot keep the alpha channel" if fmt == "JPEG" and channels in (2, 4) else
           "JPEG cannot keep 16 bits" if fmt == "JPEG" and bits == 16 else
           f"{fmt} cannot keep 16-bit colour" if bits == 16 and channels >= 3 and fmt not in ("PNG", "TIFF") else "")
    if why:
        notes.append(f"{src.name}: written as PNG: {why}")
        return ".png"
    return out


def identity(path: Path) -> set:
    """What makes two paths the same file: the real path, and (device, inode) if it exists."""
    try:
        st = os.stat(path)
        return {os.path.realpath(path), (st.st_dev, st.st_ino)}
    except OSError:
        return {os.path.realpath(path)}


def prepare_output(outdir: Path, started: float) -> list:
    """Make the output folder and check that files can be written there (with a probe named for this process, so
    that runs into one folder do not race), then remove the partial files runs killed earlier left in it
    (glean_io.remove_killed_temp: our own pattern only, older than this run, of processes that are gone). Returns
    notes; raises OSError."""
    outdir.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=outdir, prefix=f".write-test.{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    os.unlink(probe)
    removed = remove_killed_temp(outdir, started, tuple(Image.registered_extensions()) + ("write-test",))
    return [f"{outdir}: removed {len(removed)} partial file(s) that killed runs left (e.g. {removed[0].name})"] \
        if removed else []


@contextlib.contextmanager
def sigterm_as_exit():
    """SIGTERM (kill, a job scheduler's stop) ends the run as Ctrl-C does: through the finally blocks, so the image
    being written leaves no partial file. (Only the main thread can take signals; elsewhere nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print("error: stopped (SIGTERM); the image being written was not saved", file=sys.stderr)
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Outputs:
    """Output paths for one run: each input's folder structure under -o is kept (for files found in a folder), and
    no two inputs of a run ever get the same output: `x.png` and `x.jpg`, or `a/x.jpg` and `b/x.jpg` given by name,
    get distinct names (with a note) instead of overwriting each other."""

    def __init__(self, outdir: Path, suffix: str, inputs=()):
        self.outdir, self.suffix, self.taken = outdir, suffix, set()
        self.inputs = set().union(*map(identity, inputs))           # what must never be written over

    def refuse_input(self, dst: Path) -> None:
        """An InputError if writing dst would replace one of the run's inputs (the same path, a link or a hard link
        to it), as -o set to the input folder with --suffix "" would."""
        if identity(dst) & self.inputs:
            raise InputError(f"{dst}: is an input of this run, not overwritten; choose another -o or --suffix")

    def path(self, src: Path, root: Path | None, ext: str, notes: list, suffix: str | None = None) -> Path:
        suffix = self.suffix if suffix is None else suffix
        folder = self.outdir / (src.parent.relative_to(root) if root is not None else Path())
        dst = folder / f"{src.stem}{suffix}{ext}"
        n, stem = 1, f"{src.stem}_{src.suffix.lstrip('.').lower()}" if src.suffix else src.stem
        while dst in self.taken:
            dst = folder / f"{stem}{suffix if n == 1 else f'_{n}{suffix}'}{ext}"
            n += 1
        if n > 1:
            notes.append(f"{src}: written as {dst.name}, since another input of this run has the same name")
        self.taken.add(dst)
        return dst


def main(argv=None) -> int:
    """The command line (run_cli), stopped by SIGTERM as by Ctrl-C."""
    with sigterm_as_exit():
        return run_cli(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", nargs="+", required=True,
                    help="image files and/or folders (searched recursively), or example:astronaut / example:cat")
    ap.add_argument("-o", "--output", default="results", help="output folder, created if needed (default: results)")
    ap.add_argument("-m", "--model", default="", help=f"registered model ({', '.join(zoo.WEIGHTS)}) or a "
                                                       f"checkpoint file (default: {zoo.DEFAULT_MODEL})")
    ap.add_argument("--suffix", help="appended to each output file name (default: _faces with --faces, where GLEAN "
                                     "redraws only the faces it fits; else _glean)")
    ap.add_argument("--ext", default="auto", help="output format: auto (as the input), png, jpg, webp, tif, ... "
                                                   "(default: auto)")
    ap.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    ap.add_argument("--precision", choices=["auto", *glean_fast.PRECISIONS], default="auto",
                    help=f"the convolutions' precision; input and output stay float32 ({glean_fast.AUTO_RULE}; "
                         f"default: auto)")
    ap.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")
    ap.add_argument("--batch", type=int, default=1, help="images per forward pass (default: 1)")
    ap.add_argument("--max-megapixels", type=float, default=MAX_PIXELS / 1e6,
                    help=f"refuse larger images before decoding them; 0 = no limit (default: {MAX_PIXELS / 1e6:g})")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--strict-size", action="store_true", help="refuse inputs that are not in_size x in_size")
    mode.add_argument("--pad", action="store_true", help="pad to a square instead of cropping (keeps the frame)")
    mode.add_argument("--simulate", action="store_true",
                      help="degrade and restore (the paper's setting): each input is a high-resolution photo; its "
                           "largest face is aligned to the model's framing, shrunk to the model's input with MATLAB "
                           "bicubic and upscaled; writes <stem>_lr, _bicubic, _glean, _reference, _compare .png")
    mode.add_argument("--faces", action="store_true",
                      help="faces in the wild: the whole photo upscaled (bicubic), each face that a face model's "
                           "input fits restored by that model and blended back (photos.py); other faces are left")
    mode.add_argument("--retouch", action="store_true", help="Sec. 6: downsample edited HR images, super-resolve back")
    ap.add_argument("--outscale", type=float, default=0,
                    help="with --faces: scale of the whole photo (default: -m's scale, else 4); faces are restored at "
                         "their model's scale and placed at this one")
    ap.add_argument("--max-shrink", type=float, default=photos.MAX_SHRINK,
                    help=f"with --faces: a face goes to a model only if fitting its input shrinks it at most this "
                         f"much; other faces stay as the bicubic upscale (default: {photos.MAX_SHRINK:g})")
    ap.add_argument("--max-output-megapixels", type=float, default=photos.MAX_OUTPUT_PIXELS / 1e6,
                    help=f"with --faces: refuse a result above this size before any work; 0 = no limit (default: "
                         f"{photos.MAX_OUTPUT_PIXELS / 1e6:g})")
    ap.add_argument("--only-center-face", action="store_true", help="with --faces: restore only the centre face")
    ap.add_argument("--aligned", action="store_true",
                    help="with --faces: the inputs are already aligned face crops (no detection)")
    ap.add_argument("--mask", help="with --retouch: only the white region of this mask is replaced")
    return ap


def check_args(args) -> str:
    """What is wrong with the flags' values, in one sentence; '' if nothing."""
    name = args.model or zoo.DEFAULT_MODEL
    faces_flags = (args.outscale or args.only_center_face or args.aligned or args.max_shrink != photos.MAX_SHRINK or
                   args.max_output_megapixels != photos.MAX_OUTPUT_PIXELS / 1e6)
    return (f"unknown model '{name}': choose one of {', '.join(zoo.WEIGHTS)}, or give a checkpoint file"
            if name not in zoo.WEIGHTS and not Path(name).is_file() else
            "--mask goes with --retouch" if args.mask and not args.retouch else
            "--outscale, --only-center-face, --aligned, --max-shrink and --max-output-megapixels go with --faces"
            if faces_flags and not args.faces else
            f"--max-shrink must be >= 1 (got {args.max_shrink:g}) and --max-output-megapixels >= 0 (got "
            f"{args.max_output_megapixels:g})" if args.max_shrink < 1 or args.max_output_megapixels < 0 else
            f"--outscale must be positive, got {args.outscale:g}" if args.outscale < 0 else
            f"--batch must be at least 1, got {args.batch}" if args.batch < 1 else
            f"--max-megapixels must be >= 0 (0: no limit), got {args.max_megapixels:g}" if args.max_megapixels < 0
            else f"--ext {args.ext}: not a format that can be written; use png, jpg, webp, tif or bmp"
            if args.ext != "auto" and write_format("." + args.ext.lstrip(".")) is None else "")


def say(kind: str, message: str) -> None:
    """One line on stderr ("error: ...", "note: ..."), above the progress bar."""
    from tqdm import tqdm
    tqdm.write(f"{kind}: {one_line(message)}", file=sys.stderr)


class Run:
    """One command-line run over the collected files: read each, process them in batches (the mode's function),
    write each result atomically; counts what was written and what failed. What happens to each file goes through
    `failure`, `success` and `say`, which batch.py's workers override to report it per file."""

    def __init__(self, args, model, mask, outputs: "Outputs", max_pixels: int, total: int):
        from tqdm import tqdm
        self.args, self.model, self.mask, self.outputs, self.max_pixels = args, model, mask, outputs, max_pixels
        self.failed = self.written = 0
        self.queue = []
        self.bar = tqdm(total=total, unit="img", disable=total < 2 or None)

    def read(self, src: Path, root) -> None:
        """Read one input (an error is one line and the run goes on) and queue it; a full batch is processed."""
        args, notes = self.args, []
        try:
            if str(src).startswith("example:"):
                a, bits = from_pil(example_image(str(src).split(":", 1)[1]))
                src = Path(str(src).split(":", 1)[1] + ".png")
            else:
                a, bits = read_image(src, max_pixels=self.max_pixels, notes=notes)
            size = self.model.cfg.in_size if self.model is not None else 0
            if args.strict_size and not args.retouch and a.shape[:2] != (size, size):
                raise InputError(f"{src} is {a.shape[1]}x{a.shape[0]}, the model takes {size}x{size} (drop "
                                 f"--strict-size to crop and resize)")
        except InputError as e:
            self.failure(src, str(e))
            self.bar.update(1)
            return
        for note in notes:
            self.say("note", note)
        self.queue.append((src, root, a, bits))
        if len(self.queue) >= args.batch:
            self.flush()

    say = staticmethod(say)                                  # a note or an error: one line on stderr

    def failure(self, src: Path, message: str) -> None:
        """An input that could not be processed or written: counted, and one line."""
        self.failed += 1
        self.say("error", message)

    def success(self, src: Path, dst: Path) -> None:
        """An output written."""
        self.written += 1

    def one(self, src: Path, a: np.ndarray, bits: int, notes: list) -> tuple:
        """The outputs of one image in a mode that takes images one at a time: ({suffix: array}, bits)."""
        args, model = self.args, self.model
        if args.retouch:
            return {args.suffix: retouch_arrays(model, a, self.mask, notes=notes)}, bits
        if args.faces and args.aligned:
            return {args.suffix: upscale_arrays(model, [a], names=[str(src)], align_faces=False)[0][0]}, bits
        if args.faces:
            return {args.suffix: restore_faces(model, a, outscale=args.outscale, name=str(src), notes=notes,
                                               max_shrink=args.max_shrink, only_center=args.only_center_face,
                                               max_output_pixels=args.max_output_megapixels * 1e6,
                                               dtype=np.uint16 if bits == 16 else np.uint8,
                                               precision=args.precision)}, bits
        r = simulate(model, a, name=str(src), notes=notes)
        return {f"_{k}": r[k] for k in ("lr", "bicubic", "glean", "reference", "compare")}, 8

    def results(self, notes: list) -> list:
        """(src, root, bits, {output suffix: array}) for each queued image that could be processed."""
        args, queue = self.args, self.queue
        if not (args.simulate or args.faces or args.retouch):                      # one forward for the batch
            outs, found = upscale_arrays(self.model, [a for _, _, a, _ in queue], strict_size=args.strict_size,
                                         pad=args.pad, names=[str(s) for s, _, _, _ in queue])
            notes += found
            return [(src, root, bits, {args.suffix: out}) for (src, root, _, bits), out in zip(queue, outs)]
        done = []
        for src, root, a, bits in queue:                  # one image at a time: each can fail on its own
            try:
                outs, out_bits = self.one(src, a, bits, notes)
            except InputError as e:
                self.failure(src, str(e))
                continue
            done.append((src, root, out_bits, outs))
        return done

    def write(self, src: Path, root, bits: int, outs: dict, notes: list) -> None:
        """Write one image's outputs atomically; a failure is one line (and the image's other outputs skipped)."""
        for suffix, out in outs.items():
            ext = ".png" if self.args.simulate else output_ext(src, self.args.ext, bits, out.shape[2], notes)
            dst = self.outputs.path(src, root, ext, notes, suffix)
            try:
                self.outputs.refuse_input(dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_image(out, dst, bits)
                self.success(src, dst)
            except (InputError, OSError) as e:
                self.failure(src, str(e) if isinstance(e, InputError) else
                             f"{dst}: cannot write ({e.strerror or e}); {src} was not saved")
                return

    def flush(self) -> None:
        """Process the queued images and write their results."""
        if not self.queue:
            return
        notes, done = [], []
        try:
            done = self.results(notes)
        except torch.cuda.OutOfMemoryError:
            for src, _, _, _ in self.queue:
                self.failure(src, f"{src}: out of GPU memory (with {len(self.queue)} image(s) per forward): use "
                                  f"--batch 1, or --device cpu")
        for src, root, bits, outs in done:
            self.write(src, root, bits, outs, notes)
        for note in notes:
            self.say("note", note)
        self.bar.update(len(self.queue))
        self.queue.clear()


def run_cli(argv=None) -> int:
    """The command line: check the flags, prepare the output folder, collect the inputs, load the model (none for
    --faces without -m: photos.py picks one per face), then read, process and write every input."""
    args = build_parser().parse_args(argv)
    started = time.time()

    def error(message: str) -> int:
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2

    if check_args(args):
        return error(check_args(args))
    max_pixels = round(args.max_megapixels * 1e6)
    if args.suffix is None:
        args.suffix = "_faces" if args.faces and not args.aligned else "_glean"
    outdir = Path(args.output)
    try:
        cleaned = prepare_output(outdir, started)
    except OSError as e:
        return error(f"cannot write to output folder {outdir} ({e.strerror or e}); choose another with -o")
    files, problems, notes = collect(args.input, outdir)
    for p in problems:
        print(f"error: {one_line(p)}", file=sys.stderr)
    try:
        dev = pick_device(args.device)
        auto = args.faces and not args.aligned and not args.model        # --faces: a model per face (photos.py)
        onnx = str(args.model).lower().endswith(".onnx")   # runs as exported (fp32), whatever auto would pick
        precision, precision_note = (("fp32", "") if onnx and args.precision == "auto" else
                                     glean_fast.choose_precision(args.precision, dev))
        model = None if auto else load_model(args.model or zoo.DEFAULT_MODEL, str(dev), precision, notes=[])
        mask = read_image(args.mask, max_pixels=max_pixels)[0] if args.mask else None
        if args.faces and not args.aligned and model is not None:
            needs_template(model, "--faces")
    except (CheckpointError, InputError, ValueError) as e:
        return error(str(e))
    print(glean_fast.precision_line(args.precision, precision, dev))       # stdout, like the closing summary
    for note in cleaned + notes + [precision_note] * bool(precision_note):
        say("note", note)
    inputs = [src for src, _ in files if not str(src).startswith("example:")] + ([Path(args.mask)] if args.mask
                                                                                  else [])
    run = Run(args, model, mask, Outputs(outdir, args.suffix, inputs), max_pixels, len(files))
    for src, root in files:
        run.read(src, root)
    run.flush()
    run.bar.close()
    bad = run.failed + len(problems)
    print(one_line(f"{run.written} image(s) written to {outdir}" + (f"; {bad} problem(s), see above" if bad else "")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
