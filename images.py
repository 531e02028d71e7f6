"""Images in and out: MATLAB's bicubic resize and the image-file helpers shared by infer.py, train.py, evaluate.py
and demo.py.

- `imresize`: MATLAB `imresize(..., 'bicubic')`, antialiased when shrinking. The released GLEAN models were trained
  on LR inputs made this way; resizers without antialiasing (OpenCV's INTER_CUBIC, F.interpolate's default) give
  aliased inputs and much worse results, Pillow's (antialiased) bicubic nearly the same (course/01 measures it).
- Files: `read_image` / `write_image` (arrays [H, W, C] float32 in [0, 1], C = 1 grey, 2 grey + alpha, 3 RGB,
  4 RGBA, with their bits per sample: 8 or 16), `read_rgb` (a tensor [3, H, W] for training), `image_size` (from the
  header only), `list_images`, `square` (crop box + resize), and the public-domain example pictures.
"""
import contextlib
import math
import os
import stat
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from glean_io import atomic_write, one_line

# Suffixes read from folders (anything Pillow reads can also be named directly).
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}


class InputError(Exception):
    """An input that cannot be processed as asked: the message (one line, even for a file name with a line break)
    says why and what to do."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


# ----------------------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic resize


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = x.abs()
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def resize_weights(in_len: int, out_len: int, scale: float, antialias: bool = True) -> tuple:
    """MATLAB imresize's bicubic weights along one axis as taps: (idx [out_len, taps] long, w [out_len, taps]
    float64); output x is sum_k w[x, k] input[idx[x, k]].

    Output pixel x (1-based) samples input coordinate u = x / scale + (1 - 1/scale) / 2. When downscaling with
    antialiasing the kernel is stretched by 1/scale (width 4/scale) and its height scaled by `scale`. Weights are
    normalised to sum 1; taps outside the image are mirrored back in (MATLAB's 'symmetric' boundary).
    """
    stretch = scale < 1 and antialias
    width = 4.0 / scale if stretch else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]     # [out, taps], 1-based
    dist = u[:, None] - idx
    w = scale * cubic(dist * scale) if stretch else cubic(dist)
    w = w / w.sum(dim=1, keepdim=True)
    idx = idx.long() - 1                                                     # 0-based
    idx = torch.where(idx < 0, -idx - 1, idx)                                # mirror: -1 -> 0, -2 -> 1
    idx = torch.where(idx >= in_len, 2 * in_len - 1 - idx, idx)              # mirror: n -> n-1, n+1 -> n-2
    return idx.clamp(0, in_len - 1), w                                       # (clamp: kernels wider than 2n)


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """[out_len, in_len] float64 matrix of MATLAB imresize's bicubic weights along one axis (resize_weights)."""
    idx, w = resize_weights(in_len, out_len, scale, antialias)
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    m.scatter_add_(1, idx, w)
    return m


DENSE = 1 << 22      # entries of the largest dense resize matrix [out, in] (32 MB); larger axes are resized by taps
BAND = 1 << 24       # values gathered at a time by the tap form (64 MB in float32)


def resize_last(x: torch.Tensor, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """imresize along the last axis of [..., L] alone, in memory that grows with the output, never with out x in:
    the same length and scale 1 is the identity; an integer upscale of L >= 8 is upscale_axis; a small axis is
    one dense matrix; a long one sums its taps, a band of outputs at a time."""
    L = x.shape[-1]
    r = round(scale)
    if out_len == L and scale == 1:
        return x
    if out_len == L * r and r >= 2 and scale == r and L >= 8:
        return upscale_axis(x.contiguous(), r)
    if out_len * L <= DENSE:
        return x @ resize_matrix(L, out_len, scale, antialias).T.to(x.dtype).to(x.device)
    idx, w = resize_weights(L, out_len, scale, antialias)                    # [out, taps]
    idx, w = idx.to(x.device), w.to(x.dtype).to(x.device)
    out = x.new_empty(*x.shape[:-1], out_len)
    step = max(1, BAND // max(1, x[..., 0].numel() * idx.shape[1]))
    for a in range(0, out_len, step):
        out[..., a:a + step] = (x[..., idx[a:a + step]] * w[a:a + step]).sum(-1)   # [..., step, taps] -> [..., step]
    return out


def imresize(img: torch.Tensor, scale: float | None = None, size: tuple | int | None = None,
             antialias: bool = True) -> torch.Tensor:
    """MATLAB `imresize(img, scale, 'bicubic')` on float tensors [..., H, W] (any value range; no rounding).

    Give either `scale` (output = ceil(in * scale)) or `size` (int or (H, W)). Antialiased when downscaling,
    as MATLAB does; the released GLEAN models were trained on LR images made this way. Memory grows with the
    output, also for extreme sides (a 20000x1 image): no dense matrix is larger than DENSE entries.
    """
    if not torch.is_floating_point(img):
        raise TypeError(f"imresize expects a float tensor, got {img.dtype} (convert with .float())")
    H, W = img.shape[-2:]
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    if size is None:
        out_h, out_w = math.ceil(H * scale), math.ceil(W * scale)
        sh = sw = float(scale)
    else:
        out_h, out_w = (size, size) if isinstance(size, int) else size
        sh, sw = out_h / H, out_w / W
    if out_h == H * round(sh) and out_w == W * round(sw) and min(H, W) >= 8 and round(sh) >= 2 and round(sw) >= 2:
        return upscale_integer(img, round(sh), round(sw))                     # same result, no dense matrices
    if out_h * H <= DENSE and out_w * W <= DENSE:
        mh = resize_matrix(H, out_h, sh, antialias).to(img.dtype).to(img.device)  # [out_h, H]
        mw = resize_matrix(W, out_w, sw, antialias).to(img.dtype).to(img.device)  # [out_w, W]
        return mh @ img @ mw.T                                                      # [..., out_h, out_w]
    x = resize_last(img.transpose(-1, -2), out_h, sh, antialias).transpose(-1, -2)  # [..., out_h, W]
    return resize_last(x, out_w, sw, antialias)                                     # [..., out_h, out_w]


def phases(r: int) -> tuple:
    """The bicubic weights of an integer upscale by r as r filters, one per output phase: output j r + p (0-based) is
    sum_k w[p, k] x[j + offset + k]. Read off resize_matrix away from the borders. Returns (w [r, K] float64,
    offset <= 0)."""
    n = 16
    rows = resize_matrix(n, n * r, float(r))[n // 2 * r:(n // 2 + 1) * r]     # [r, n]: the phases of input n/2
    cols = rows.abs().sum(0).nonzero()[:, 0]
    lo, hi = int(cols.min()), int(cols.max())
    return rows[:, lo:hi + 1], lo - n // 2


def upscale_axis(x: torch.Tensor, r: int) -> torch.Tensor:
    """MATLAB bicubic upscale of the last axis by an integer r: [..., L] -> [..., r L], as one small convolution
    with r output channels (the phases), on the input mirrored at its ends as MATLAB does (-1 -> 0, L -> L - 1)."""
    w, offset = phases(r)
    L, K = x.shape[-1], w.shape[1]
    idx = torch.arange(offset, L + offset + K - 1)
    idx = torch.where(idx < 0, -idx - 1, torch.where(idx >= L, 2 * L - 1 - idx, idx))       # symmetric padding
    xp = x.reshape(-1, 1, L).index_select(-1, idx.to(x.device))                             # [N, 1, L + K - 1]
    y = torch.nn.functional.conv1d(xp, w[:, None].to(x.dtype).to(x.device))               # [N, r, L]
    return y.transpose(1, 2).reshape(*x.shape[:-1], r * L)


def upscale_integer(img: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    """imresize by integer factors (rh, rw) >= 2, computed as two 1-D polyphase convolutions: for an 8x upscale of a
    640x480 photo 2-3x faster than the dense resize matrices, and equal to them up to float rounding (tested)."""
    x = upscale_axis(img.transpose(-1, -2), rh).transpose(-1, -2)                # [..., rh H, W]
    return upscale_axis(x.contiguous(), rw)                                      # [..., rh H, rw W]


# ----------------------------------------------------------------------------------------------------------
# Image files


# Decoded images above this many pixels are refused (--max-megapixels sets it): an RGB image becomes float32 arrays
# of 12 bytes per pixel, so 80 million pixels already take ~1 GB. The check is made per call, from the header
# (open_image), never through Pillow's process-wide Image.MAX_IMAGE_PIXELS, which this project never changes.
MAX_PIXELS = 80_000_000


@contextlib.contextmanager
def open_image(path):
    """Image.open of a file, without Pillow's process-wide "decompression bomb" limit: callers check their own limit
    per call from the header (im.size) before decoding anything. Formats are recognised as Image.open does: each
    registered opener whose check accepts the first 16 bytes, common formats first, then every plugin."""
    if not stat.S_ISREG(os.stat(path).st_mode):                             # a FIFO would block, a device never end
        raise OSError("not a regular file: a FIFO, a device or a folder")
    with open(path, "rb") as fp:
        prefix, im = fp.read(16), None
        for register in (Image.preinit, Image.init):
            register()
            for fmt in list(Image.ID):
                factory, accept = Image.OPEN[fmt]
                try:
                    taken = accept is None or accept(prefix)
                    if taken and not isinstance(taken, str):              # (a string: Pillow's warning, a no)
                        fp.seek(0)
                        im = factory(fp, str(path))
                        break
                except (SyntaxError, IndexError, TypeError, struct.error):   # not this format, as in Image.open
                    continue
            if im is not None:
                break
        if im is None:
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")
        with im:
            yield im


def _deep_colour(path: Path, im: Image.Image) -> bool:
    """A colour image with 16 bits per sample: Pillow would read it as 8-bit, so it goes through OpenCV (PNG, TIFF)."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)                                       # signature + IHDR: depth at 24, colour type 25
        return len(head) == 26 and head[24] == 16 and head[25] in (2, 6)
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))                             # BitsPerSample, one per sample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return len(bits) >= 3 and bits[0] == 16
    return False


def read_image(path, *, max_pixels: int | None = MAX_PIXELS, notes: list | None = None) -> tuple:
    """Read an image file as (array [H, W, C] float32 in [0, 1], bits per sample: 8 or 16). Any problem with the
    file is an InputError naming it; images over max_pixels (0 or None: no limit) are refused from their header,
    before they are decoded. Remarks the caller may want to pass on (e.g. the first frame of an animation) are
    appended to `notes`."""
    path = Path(path)
    try:
        with open_image(path) as im:                               # reads the header only
            W, H = im.size
            if max_pixels and W * H > max_pixels:
                raise InputError(f"{path}: {W}x{H} is {W * H / 1e6:.0f} million pixels, above the limit of "
                                 f"{max_pixels / 1e6:g} million (raise it with --max-megapixels)")
            if _deep_colour(path, im):
                return _read_deep_colour(path), 16
            if getattr(im, "n_frames", 1) > 1 and notes is not None:
                notes.append(f"{path}: {im.n_frames} frames; the first one is used")
            return from_pil(im, str(path))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error,
            Image.DecompressionBombError) as e:                   # (Pillow's own check, e.g. a GIF frame, a TIFF tile)
        reason = "empty file" if path.is_file() and path.stat().st_size == 0 else e
        raise InputError(f"{path}: not a readable image ({reason})") from e


def _read_deep_colour(path: Path) -> np.ndarray:
    try:
        import cv2
    except ImportError as e:
        raise InputError(f"{path}: 16-bit colour image; pip install opencv-python-headless to read it") from e
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.dtype != np.uint16:
        raise InputError(f"{path}: cannot read this 16-bit colour image")
    return a[..., [2, 1, 0, 3][:a.shape[2]]].astype(np.float32) / 65535.0         # BGR(A) -> RGB(A)


def quantized(a: np.ndarray, bits: int = 8) -> np.ndarray:
    """Array [H, W, C] in [0, 1] -> uint8 (bits 8) or uint16 (bits 16), rounded; arrays of those types as they are
    (large results are assembled in their final type: photos.py)."""
    if a.dtype in (np.uint8, np.uint16):
        return a
    return (np.clip(a, 0, 1) * (255 if bits == 8 else 65535)).round().astype(np.uint8 if bits == 8 else np.uint16)


def to_pil(a: np.ndarray, bits: int = 8) -> Image.Image:
    """Array [H, W, C] in [0, 1], or uint8 / uint16 -> PIL image (16-bit greyscale as mode I;16)."""
    C = a.shape[2]
    b = quantized(a, bits)
    if b.dtype == np.uint16 and C == 1:
        return Image.fromarray(b[..., 0])
    if b.dtype == np.uint16:
        b = (b.astype(np.uint32) * 255 + 32767) // 65535
        b = b.astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[C]
    return Image.fromarray(b[..., 0] if C == 1 else b, mode)


def write_format(suffix: str) -> str | None:
    """Pillow's format for writing files with this suffix (".jpg" -> "JPEG", ".jfif" -> "JPEG"), or None."""
    fmt = Image.registered_extensions().get(suffix.lower())
    return fmt if fmt in Image.SAVE else None


def _png_chunk(f, kind: bytes, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png_stream(a: np.ndarray, f, rows: int = 256) -> None:
    """An 8- or 16-bit image [H, W, C] (uint8 / uint16; C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) as a PNG file,
    compressed band by band: memory grows with a band, not with the image (Pillow first copies a large image into
    its own 4-byte-per-pixel buffer). Every row uses PNG's Sub filter (each byte minus the one a pixel before)."""
    H, W, C = a.shape
    depth = 16 if a.dtype == np.uint16 else 8
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[C]
    f.write(b"\x89PNG\r\n\x1a\n")
    _png_chunk(f, b"IHDR", struct.pack(">IIBBBBB", W, H, depth, colour, 0, 0, 0))
    z, bpp = zlib.compressobj(6), C * depth // 8
    for r0 in range(0, H, rows):
        band = a[r0:r0 + rows]
        raw = (band.astype(">u2") if depth == 16 else band).reshape(len(band), -1).view(np.uint8)   # [h, W bpp]
        sub = raw.copy()
        sub[:, bpp:] -= raw[:, :-bpp]                                   # Sub filter (mod 256)
        data = z.compress(np.concatenate([np.ones((len(band), 1), np.uint8), sub], axis=1).tobytes())
        if data:
            _png_chunk(f, b"IDAT", data)
    _png_chunk(f, b"IDAT", z.flush())
    _png_chunk(f, b"IEND", b"")


def write_image(a: np.ndarray, path, bits: int = 8) -> None:
    """Write atomically (temporary file, then rename). 16-bit colour goes through OpenCV (PNG or TIFF); uint8 and
    uint16 arrays (photos.py's results) go to PNG band by band (write_png_stream)."""
    path = Path(path)
    fmt = write_format(path.suffix)
    if fmt is None:
        raise InputError(f"{path}: cannot write '{path.suffix}' files; choose another format with --ext (png, jpg)")
    if fmt == "PNG" and a.dtype in (np.uint8, np.uint16):                # large results: written as they are
        with atomic_write(path) as f:
            write_png_stream(a, f)
        return
    if bits == 16 and a.shape[2] >= 3:
        if fmt not in ("PNG", "TIFF"):
            raise InputError(f"{path}: 16-bit colour is kept in PNG or TIFF only; use --ext png")
        import cv2
        b = quantized(a, 16)[..., [2, 1, 0, 3][:a.shape[2]]]
        ok, data = cv2.imencode(".png" if fmt == "PNG" else ".tif", b)
        if not ok:
            raise OSError(f"could not encode {path}")
        with atomic_write(path) as f:
            f.write(data.tobytes())
        return
    im = to_pil(a, bits)
    if fmt == "JPEG" and im.mode in ("LA", "RGBA"):
        raise InputError(f"{path}: JPEG cannot keep the alpha channel; use --ext png")
    with atomic_write(path) as f:
        im.save(f, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def from_pil(image: Image.Image, name: str = "the image") -> tuple:
    """A PIL image -> (array [H, W, C] float32 in [0, 1], bits: 8 or 16). EXIF orientation is applied; palette and
    other modes become RGB(A); 16-bit greyscale (I;16) stays 16-bit; 32-bit integer (I) samples in 0-65535 and
    float (F) samples in [0, 1] are read as 16-bit greyscale, other ranges are refused (an InputError naming
    `name`): scaling them to fit would change what the image means."""
    W, H = image.size
    if W == 0 or H == 0:
        raise InputError(f"{name}: an empty image ({W}x{H} pixels)")
    image = ImageOps.exif_transpose(image)                                  # camera orientation
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0)[..., None], 16
    if image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64 if image.mode == "I" else np.float32)
        kind, top, slack = ("32-bit integer", 65535, 0) if image.mode == "I" else ("floating-point", 1, 1e-3)
        if not np.isfinite(a).all():
            raise InputError(f"{name}: {kind} samples with NaN or infinite values; save it as an 8- or 16-bit image")
        lo, hi = float(a.min()), float(a.max())
        if not (lo >= -slack and hi <= top + slack):                           # (slack: float rounding near 1)
            raise InputError(f"{name}: {kind} samples from {lo:.6g} to {hi:.6g}, outside 0-{top}: save it as an 8- "
                             f"or 16-bit image (or scale it to 0-{top} yourself)")
        return (np.clip(a / top, 0, 1).astype(np.float32))[..., None], 16
    bands = image.getbands()
    if image.mode == "P":                                                   # palette, maybe with transparency
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in bands or "a" in bands else "RGB")
    a = np.asarray(image, dtype=np.float32)
    a /= 255.0
    return (a[..., None] if a.ndim == 2 else a), 8


# Example images that ship with scikit-image (public domain): NASA's astronaut portrait (a face crop) and Chelsea
# the cat. Usable as `-i example:astronaut` and in the demo; never research-only photos.
EXAMPLES = {"astronaut": ("astronaut", (45, 185, 155, 295)), "cat": ("chelsea", None)}


def example_image(name: str) -> Image.Image:
    if name not in EXAMPLES:
        raise InputError(f"unknown example '{name}': choose one of {', '.join(EXAMPLES)}")
    try:
        from skimage import data
    except ImportError as e:
        raise InputError("the example images come with scikit-image: pip install scikit-image") from e
    func, box = EXAMPLES[name]
    a = getattr(data, func)()
    if box:
        top, bottom, left, right = box
        a = a[top:bottom, left:right]
    return Image.fromarray(a)


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


def read_rgb(path) -> torch.Tensor:
    """An image file as float RGB [3, H, W] in [0, 1] (EXIF orientation applied; grey repeated, alpha dropped)."""
    return split(read_image(path)[0])[0].contiguous()


def list_images(folder, warn: bool = False) -> list:
    """The image files (IMAGE_EXTS) under a folder, recursively, sorted; [] if there are none. Entries with an
    image suffix that are not files (broken links, FIFOs: opening one would block) are left out, with `warn` named
    on stderr in one line each."""
    found = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    for p in found if warn else ():
        if not p.is_file() and not p.is_dir():
            print(f"warning: skipping {p}: {kind_of(p)}, not an image file", file=sys.stderr)
    return [p for p in found if p.is_file()]


def kind_of(p: Path) -> str:
    """What a path that is neither a file nor a folder is: a broken link, a FIFO, ... ('' if nothing is there)."""
    try:
        mode = p.lstat().st_mode
    except OSError:
        return ""
    if stat.S_ISLNK(mode):
        try:
            mode = p.stat().st_mode                                          # what the link points to
        except OSError:
            return f"a broken link (to {os.readlink(p)})"
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else "not a regular file")


def image_size(path) -> tuple | None:
    """(H, W) of an image file as read_rgb returns it (EXIF rotation applied), from its header only; None if
    unreadable (the dataset reports and skips such files when it loads them)."""
    try:
        with open_image(path) as im:
            W, H = im.size
            return (W, H) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (H, W)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, struct.error):
        return None


def box_fits(box: tuple, H: int, W: int) -> bool:
    left, top, s = box
    return s > 0 and 0 <= left and left + s <= W and 0 <= top and top + s <= H


def square(img: torch.Tensor, size: int, box: tuple = ()) -> torch.Tensor:
    """Crop [C, H, W] to the square box (left, top, side) (default: the centre square) and resize it to
    size x size with MATLAB's bicubic (antialiased)."""
    _, H, W = img.shape
    if box:
        if not box_fits(box, H, W):
            raise ValueError(f"crop box (left, top, size) {tuple(box)} does not fit in the {W}x{H} image")
        left, top, s = box
    else:
        s = min(H, W)
        left, top = (W - s) // 2, (H - s) // 2
    img = img[:, top:top + s, left:left + s]
    return img if s == size else imresize(img, size=size).clamp(0, 1)
