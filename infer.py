"""Upscale images with GLEAN: an importable `upscale(model, image)` and a thin command line.

    python infer.py -i photo.png -o out/                 # the default model
    python infer.py -i example:astronaut -o out/         # a face crop from scikit-image's astronaut
    python infer.py -i folder/ more.jpg -o out/ -m glean_face_16x --batch 4
    python infer.py -i edited.png --retouch --mask mask.png -o out/   # Sec. 6: remove retouching artefacts

GLEAN has a fixed input size (in_size): other images are centre-cropped to a square and resized to it with
MATLAB's bicubic (a notice says so), or refused with --strict-size; --pad keeps the whole frame instead. EXIF
orientation, greyscale, palette, alpha (upscaled separately with bicubic and re-attached) and 16-bit PNGs (written
back as 16-bit) are handled. Outputs are written atomically: a failed image leaves no file behind.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import glean
import zoo
from glean_io import CheckpointError, atomic_write
from images import (IMAGE_EXTS, InputError, example_image, from_pil, imresize, read_image, to_pil,
                    write_image)

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
        padded = torch.nn.functional.pad(planes[None], (left, s - W - left, top, s - H - top), mode="replicate")[0]
        notes.append(f"{name}: {W}x{H} padded to {s}x{s} and resized to {size}x{size}")
        return resize(padded, size), (top / s, left / s, H / s, W / s)
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    if (H, W) != (s, s):
        notes.append(f"{name}: {W}x{H} centre-cropped to {s}x{s}" + (f" and resized to {size}x{size}"
                                                                       if s != size else ""))
    elif s != size:
        notes.append(f"{name}: {W}x{H} resized to {size}x{size} (MATLAB bicubic)")
    return resize(planes[:, top:top + s, left:left + s], size), (0.0, 0.0, 1.0, 1.0)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_model(model: glean.GLEAN, rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, in, in] in [0, 1] -> [B, 3, out, out] in [0, 1] (float32, CPU)."""
    p = next(model.parameters())
    x = (rgb * 2 - 1).to(p.device, p.dtype)
    return ((model(x).float().clamp(-1, 1) + 1) / 2).cpu()


def split(a: np.ndarray) -> tuple:
    """[H, W, C] -> (RGB planes [3, H, W], alpha [1, H, W] or None, grey?)."""
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    C = t.shape[0]
    rgb = t[:1].expand(3, -1, -1) if C in (1, 2) else t[:3]
    alpha = t[C - 1:] if C in (2, 4) else None
    return rgb, alpha, C in (1, 2)


def merge(rgb: torch.Tensor, alpha, grey: bool) -> np.ndarray:
    """Inverse of split: greyscale outputs are converted back with ITU-R 601 luma, alpha re-attached."""
    planes = [(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None] if grey else rgb]
    if alpha is not None:
        planes.append(alpha)
    return torch.cat(planes).clamp(0, 1).permute(1, 2, 0).numpy()


def upscale_arrays(model: glean.GLEAN, arrays: list, *, strict_size: bool = False, pad: bool = False,
                   names=None) -> tuple:
    """Upscale a batch of arrays [H, W, C] in [0, 1]; returns (outputs, notes). One forward pass for all."""
    cfg, notes, prepared = model.cfg, [], []
    names = names or [f"image {i}" for i in range(len(arrays))]
    for a, name in zip(arrays, names):
        rgb, alpha, grey = split(a)
        rgb, box = fit(rgb, cfg.in_size, strict=strict_size, pad=pad, notes=notes, name=name)
        if alpha is not None:                      # the alpha plane follows the same crop/pad, then bicubic up
            alpha = resize(fit(alpha, cfg.in_size, strict=False, pad=pad, notes=[])[0], cfg.out_size).clamp(0, 1)
        prepared.append((rgb, alpha, grey, box))
    sr = run_model(model, torch.stack([p[0] for p in prepared]))
    outputs = []
    for y, (_, alpha, grey, (top, left, h, w)) in zip(sr, prepared):
        a = merge(y, alpha, grey)
        n = cfg.out_size
        t, l_, hh, ww = round(top * n), round(left * n), round(h * n), round(w * n)
        outputs.append(a[t:t + hh, l_:l_ + ww])     # --pad: back to the original frame's aspect ratio
    return outputs, notes


def upscale(model: glean.GLEAN, image, *, strict_size: bool = False, pad: bool = False) -> Image.Image:
    """Upscale one image with GLEAN: a PIL image, or a tensor [3, H, W] / [1, 3, H, W] in [0, 1]. Returns a PIL
    image of the same kind (greyscale stays greyscale, alpha is kept, 16-bit greyscale stays 16-bit)."""
    if isinstance(image, Image.Image):
        a, bits = from_pil(image)
    elif torch.is_tensor(image):
        t = image[0] if image.ndim == 4 else image
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise InputError(f"expected a tensor [C, H, W] or [1, C, H, W] in [0, 1], got {list(image.shape)}")
        a, bits = t.detach().float().cpu().permute(1, 2, 0).numpy(), 8
    else:
        raise TypeError(f"upscale takes a PIL image or a tensor, not {type(image).__name__}")
    out, _ = upscale_arrays(model, [a], strict_size=strict_size, pad=pad)
    return to_pil(out[0], bits)


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


def load_model(name_or_path: str = "", device: str = "", half: bool = False) -> glean.GLEAN:
    """A registered model (zoo.WEIGHTS) or a checkpoint file, on the device, in half precision if asked (CUDA)."""
    model = zoo.load_pretrained(name_or_path or zoo.DEFAULT_MODEL)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev)
    if half:
        if dev.type != "cuda":
            raise InputError("half precision is for CUDA only; on a CPU the model runs in float32")
        model = model.half()
    return model


# ----------------------------------------------------------------------------------------------------------
# Command line


def collect(inputs: list) -> tuple:
    """Files to process (folders: their image files, sorted; `example:NAME` for a built-in example image) and
    problems with the inputs themselves."""
    files, problems = [], []
    for item in inputs:
        if item.startswith("example:"):
            files.append(Path(item))
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTS)
            if not found:
                problems.append(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def output_path(src: Path, outdir: Path, suffix: str, ext: str, bits: int, channels: int) -> Path:
    ext = src.suffix.lower() if ext == "auto" else "." + ext.lstrip(".").lower()
    if (bits == 16 or channels in (2, 4)) and ext in (".jpg", ".jpeg"):
        ext = ".png"                                                      # keep 16 bits / alpha
    if bits == 16 and channels >= 3:
        ext = ".png"
    return outdir / f"{src.stem}{suffix}{ext}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", nargs="+", required=True, help="image files and/or folders")
    ap.add_argument("-o", "--output", default="results", help="output folder (created if needed)")
    ap.add_argument("-m", "--model", default="", help=f"registered model ({', '.join(zoo.WEIGHTS)}) or a "
                                                       f"checkpoint file; default: {zoo.DEFAULT_MODEL}")
    ap.add_argument("--suffix", default="_glean", help="appended to each output file name")
    ap.add_argument("--ext", default="auto", help="output format: auto (as the input), png, jpg, webp, ...")
    ap.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--fp32", action="store_true", help="full precision on CUDA (half precision otherwise)")
    ap.add_argument("--batch", type=int, default=1, help="images per forward pass")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--strict-size", action="store_true", help="refuse inputs that are not in_size x in_size")
    size.add_argument("--pad", action="store_true", help="pad to a square instead of cropping (keeps the frame)")
    ap.add_argument("--retouch", action="store_true", help="Sec. 6: downsample edited HR images, super-resolve back")
    ap.add_argument("--mask", help="with --retouch: only the white region of this mask is replaced")
    args = ap.parse_args(argv)

    name = args.model or zoo.DEFAULT_MODEL
    if name not in zoo.WEIGHTS and not Path(name).is_file():
        print(f"error: unknown model '{name}': choose one of {', '.join(zoo.WEIGHTS)}, or give a checkpoint "
              f"file", file=sys.stderr)
        return 2
    if args.mask and not args.retouch:
        print("error: --mask goes with --retouch", file=sys.stderr)
        return 2
    outdir = Path(args.output)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with atomic_write(outdir / ".write-test"):
            pass
        (outdir / ".write-test").unlink()
    except OSError as e:
        print(f"error: cannot write to output folder {outdir} ({e.strerror or e}); choose another with -o",
              file=sys.stderr)
        return 2
    files, problems = collect(args.input)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    try:
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(name, dev, half=torch.device(dev).type == "cuda" and not args.fp32)
    except (CheckpointError, InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mask = None
    if args.mask:
        try:
            mask = read_image(args.mask)[0]
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from tqdm import tqdm
    failed = 0
    bar = tqdm(total=len(files), unit="img", disable=len(files) < 2 or None)
    queue = []

    def flush():
        nonlocal failed
        if not queue:
            return
        try:
            if args.retouch:
                notes = []
                outs = [retouch_arrays(model, a, mask, notes=notes) for _, a, _ in queue]
            else:
                outs, notes = upscale_arrays(model, [a for _, a, _ in queue], strict_size=args.strict_size,
                                             pad=args.pad, names=[str(s) for s, _, _ in queue])
            for note in notes:
                tqdm.write(f"note: {note}", file=sys.stderr)
            for (src, _, bits), out in zip(queue, outs):
                dst = output_path(src, outdir, args.suffix, args.ext, bits, out.shape[2])
                write_image(out, dst, bits)
        except InputError as e:
            failed += len(queue)
            tqdm.write(f"error: {e}", file=sys.stderr)
        except torch.cuda.OutOfMemoryError:
            failed += len(queue)
            tqdm.write("error: out of GPU memory: use --batch 1, or --device cpu", file=sys.stderr)
        bar.update(len(queue))
        queue.clear()

    for src in files:
        try:
            if str(src).startswith("example:"):
                a, bits = from_pil(example_image(str(src).split(":", 1)[1]))
                src = Path(str(src).split(":", 1)[1] + ".png")
            else:
                a, bits = read_image(src)
        except InputError as e:
            failed += 1
            tqdm.write(f"error: {e}", file=sys.stderr)
            bar.update(1)
            continue
        queue.append((src, a, bits))
        if len(queue) >= args.batch:
            flush()
    flush()
    bar.close()
    bad = failed + len(problems)
    done = len(files) - failed
    print(f"{done} image(s) written to {outdir}" + (f"; {bad} problem(s), see above" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
