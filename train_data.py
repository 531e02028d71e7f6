"""Training data for train.py: HR images from folders, the LR images made from them, and the order they come in.

- `scan(folders)`: every image file's header read once, before any weights are loaded: what cannot be read is
  named, an empty or unreadable folder is a one-line error;
- `SRDataset`: an HR image cropped square and resized to out_size, its LR image made on the fly (MATLAB bicubic,
  clipped and rounded to 8 bits as a file holds it; optionally `degrade`d as real photos are) or read from a folder
  of pre-made LR images;
- `BatchStream`, `loader`: which images each process takes at each step, the same for any number of DataLoader
  workers, so that a resumed run continues exactly where it stopped.
"""
import hashlib
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import images
from images import IMAGE_EXTS, InputError, box_fits, image_size, imresize, read_rgb, square
from train_run import UserError, ignore_stop_signals, micro_batch


def list_images(folder, report: bool = True) -> list:
    """The image files of a folder (images.list_images, its odd entries named when `report`); none at all is a
    one-line UserError."""
    files = images.list_images(folder, warn=report)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {folder}")
    return files


@dataclass
class Scan:
    """The image files of one or more folders, with their sizes read from the headers."""
    folders: list                    # the folders, in order
    files: list                      # every image file, folder by folder (unreadable ones included: see bad)
    sizes: dict                      # path -> (H, W) for the readable ones
    bad: set                         # files whose header cannot be read
    fingerprint: str                 # their count and a hash of their names (see `fingerprint`)


def scan(folders, limit: int = 0, exclude=(), report: bool = True) -> Scan:
    """Read every image header of `folders` (a folder or a list of them) once. Files in `exclude` (e.g. the
    validation images) are left out; `report` names the unreadable ones. A folder without images, or with none
    readable, is a one-line UserError."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    leave_out = {Path(p).resolve() for p in exclude}
    files = []
    for folder in folders:
        files += [p for p in list_images(folder, report) if p.resolve() not in leave_out]
    files = files[:limit or None]
    sizes = {path: image_size(path) for path in files}                  # (H, W), or None if unreadable
    bad = {path for path, hw in sizes.items() if hw is None}
    if len(bad) == len(files):
        raise UserError(f"none of the {len(files)} image files in {', '.join(map(str, folders))} can be read "
                        f"(e.g. {files[0].name}); check the folder and the files")
    for path in sorted(bad) if report else ():
        print(f"warning: skipping unreadable image {path}", file=sys.stderr)
    return Scan(folders, files, {p: hw for p, hw in sizes.items() if hw is not None}, bad,
                fingerprint(folders, files))


def fingerprint(folders, files: list) -> str:
    """The image files of a dataset in one short string (their count and a hash of their names relative to their
    folders): a moved dataset keeps it, another one does not."""
    folders = [Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)]
    names = [next(str(p.relative_to(f)) for f in folders if p.is_relative_to(f)) for p in files]
    names = names if len(folders) == 1 else [f"{i}/{n}" for i, n in enumerate(names)]
    return f"{len(files)} files, names sha256 {hashlib.sha256(chr(10).join(names).encode()).hexdigest()[:12]}"


def jitter_box(box: tuple, H: int, W: int, jitter: float, g: torch.Generator) -> tuple:
    """The box (left, top, side) scaled by up to 1 +- jitter and shifted by up to jitter * side each way,
    at random from g, then moved (and if need be shrunk) to lie inside the H x W image."""
    u = lambda: 2 * torch.rand((), generator=g).item() - 1                 # noqa: E731  uniform in [-1, 1]
    left, top, s = box or ((W - min(H, W)) // 2, (H - min(H, W)) // 2, min(H, W))
    cx, cy = left + s / 2 + jitter * s * u(), top + s / 2 + jitter * s * u()
    s = min(max(1, round(s * (1 + jitter * u()))), H, W)
    left = min(max(0, round(cx - s / 2)), W - s)
    top = min(max(0, round(cy - s / 2)), H - s)
    return left, top, s


# Ranges of the degradations: blur sigma in LR pixels (x scale / 2 in HR pixels), noise sigma in 8-bit levels, JPEG
# quality; each step is applied with probability p. "strong" is the ffhq 8x (in128) preset's, narrower than the
# official configuration's; "mild" keeps half of the inputs clean, like the photos people actually upscale.
DEGRADE = {"strong": dict(p=1.0, blur=(0.2, 1.5), noise=(0, 25), jpeg=(30, 95)),
           "mild": dict(p=0.5, blur=(0.2, 1.0), noise=(0, 8), jpeg=(60, 95))}


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round to 256 levels, as an image file stores it."""
    return (x.clamp(0, 1) * 255).round() / 255


def degrade(hr: torch.Tensor, in_size: int, g: torch.Generator, level: str = "strong") -> torch.Tensor:
    """Real-world degradation of an HR image [3, H, W] in [0, 1] to an 8-bit LR one [3, in_size, in_size]: random
    (an)isotropic Gaussian blur, MATLAB bicubic downscaling, Gaussian noise, JPEG (ranges: DEGRADE[level]), as for
    the official 128 -> 1024 face model (which samples wider ranges)."""
    r = DEGRADE[level]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    happens = lambda: r["p"] >= 1 or torch.rand((), generator=g).item() < r["p"]  # noqa: E731
    scale = hr.shape[-1] / in_size
    if happens():
        sx, sy, theta = u(*r["blur"]) * scale / 2, u(*r["blur"]) * scale / 2, u(-math.pi, math.pi)
        k = int(2 * math.ceil(3 * max(sx, sy)) + 1)
        ax = torch.arange(k, dtype=torch.float32) - k // 2
        yy, xx = torch.meshgrid(ax, ax, indexing="ij")
        c, s = math.cos(theta), math.sin(theta)
        xr, yr = c * xx + s * yy, -s * xx + c * yy
        kernel = torch.exp(-0.5 * ((xr / sx) ** 2 + (yr / sy) ** 2))
        kernel = (kernel / kernel.sum())[None, None].expand(3, 1, k, k)
        hr = F.conv2d(F.pad(hr[None], [k // 2] * 4, mode="reflect"), kernel, groups=3)[0]
    lr = imresize(hr, size=in_size)
    if happens():
        lr = lr + torch.randn(lr.shape, generator=g) * u(*r["noise"]) / 255
    lr = to_8bit(lr)
    if not happens():
        return lr
    im = Image.fromarray((lr * 255).round().byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(u(*r["jpeg"])))
    with Image.open(buf) as jpg:
        t = torch.frombuffer(bytearray(jpg.convert("RGB").tobytes()), dtype=torch.uint8)
    return t.view(in_size, in_size, 3).permute(2, 0, 1).float() / 255


class SRDataset(torch.utils.data.Dataset):
    """HR images from a folder, or several (any size and format Pillow reads): centre-cropped square, resized to
    out_size; the LR made on the fly with MATLAB bicubic (`images.imresize`), optionally degraded, or read from a
    paired folder.

    Items are addressed by (index, epoch): their random flip and degradation come from a generator seeded by
    (seed, epoch, index), so a run is reproducible whatever the number of workers and resumes exactly.

    The files come from `scan` (made here unless given): unreadable ones are named once and skipped, a --crop that
    does not fit is a one-line error, images smaller than out_size (upscaled, so blurry targets) are counted in one
    notice. A file that fails later, in a worker, is replaced by the next readable one and named in the item's
    "skipped" entry, for the training loop to report once.
    """

    def __init__(self, folder, out_size: int, in_size: int | None = None, lr_dir: str = "", flip: bool = True,
                 degrade: str = "", seed: int = 0, limit: int = 0, crop: tuple = (), crop_jitter: float = 0.0,
                 report: bool = True, lr_float: bool = False, scanned: Scan | None = None):
        found = scanned or scan(folder, limit, report=report)
        self.files, self.bad, self.fingerprint = found.files, set(found.bad), found.fingerprint
        self.out_size, self.in_size, self.flip, self.seed = out_size, in_size, flip, seed
        self.degrade = "strong" if degrade is True else degrade or ""          # older runs stored a bool
        self.lr_float = lr_float
        self.crop, self.crop_jitter = tuple(crop), crop_jitter
        if lr_dir and (crop or crop_jitter):
            raise UserError("--crop / --crop-jitter cannot be used with --lr-dir (the paired LR images are fixed)")
        self.check_sizes(found, report)
        self.lr_files = self.pair(lr_dir, found) if lr_dir else {}

    def check_sizes(self, found: Scan, report: bool) -> None:
        """--crop must fit every image; images smaller than out_size are counted in one notice."""
        crop, where = self.crop, ", ".join(map(str, found.folders))
        for path, (H, W) in found.sizes.items():
            if crop and not box_fits(crop, H, W):
                raise UserError(f"--crop {' '.join(map(str, crop))} (left top size) does not fit in {path.name} "
                                f"({W}x{H}); pass a box inside every training image")
        small = [(p, hw) for p, hw in found.sizes.items() if (crop[2] if crop else min(hw)) < self.out_size]
        if small and report:
            (path, (H, W)) = small[0]
            print(f"notice: {len(small)} of {len(found.sizes)} images in {where} have a "
                  f"{'crop box' if crop else 'square'} smaller than {self.out_size} px (e.g. {path.name}, {W}x{H}): "
                  f"they are upscaled, so the model learns blurry targets from them; remove them or use larger "
                  f"images", file=sys.stderr)

    def pair(self, lr_dir: str, found: Scan) -> dict:
        """HR file -> the LR file of the same stem in lr_dir."""
        if len(found.folders) > 1:
            raise UserError("--lr-dir pairs LR images with one folder of HR images; pass one --data folder")
        by_stem = {p.stem: p for p in list_images(lr_dir)}
        missing = [p.name for p in self.files if p.stem not in by_stem]
        if missing:
            raise UserError(f"{len(missing)} HR images have no LR image of the same name in {lr_dir} "
                            f"(e.g. {missing[0]}); remove --lr-dir to make LR images on the fly")
        return {p: by_stem[p.stem] for p in self.files}

    def __len__(self):
        return len(self.files)

    def load(self, i: int, epoch: int) -> dict:
        path = self.files[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        img = read_rgb(path)
        flip = self.flip and torch.rand((), generator=g).item() < 0.5
        box = self.crop                                                     # fits: checked in __init__
        if self.crop_jitter:
            box = jitter_box(box, img.shape[1], img.shape[2], self.crop_jitter, g)
        hr = square(img, self.out_size, box)
        item = {"hr": hr}
        if self.in_size:
            if self.lr_files:
                lr = read_rgb(self.lr_files[path])
                if lr.shape[-2:] != (self.in_size, self.in_size):
                    raise UserError(f"LR image {self.lr_files[path]} is {lr.shape[-1]}x{lr.shape[-2]}, "
                                    f"expected {self.in_size}x{self.in_size}")
            elif self.degrade:
                lr = degrade(hr, self.in_size, g, self.degrade)
            else:
                lr = imresize(hr, size=self.in_size)
                lr = lr if self.lr_float else to_8bit(lr)                  # as real LR files hold it
            item["lr"] = lr
        if flip:
            item = {k: v.flip(-1) for k, v in item.items()}
        return {k: v * 2 - 1 for k, v in item.items()}                   # [-1, 1], as the network expects

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            if self.files[k] in self.bad:                               # named once, by scan
                continue
            try:
                return {**self.load(k, epoch), "skipped": "\n".join(skipped)}
            except (InputError, OSError, ValueError, RuntimeError) as e:
                self.bad.add(self.files[k])
                skipped.append(str(e) if isinstance(e, InputError) else f"{self.files[k]} ({e})")  # InputError names it
        raise UserError(f"no readable image among the {len(self.files)} files in {self.files[0].parent}")


def report_skipped(batch: dict, seen: set) -> None:
    """Name the files a worker could not read (the "skipped" entries of a batch), each once per process."""
    for entry in (e for item in batch.get("skipped", ()) for e in item.split("\n") if e):
        if entry not in seen:
            seen.add(entry)
            print(f"warning: skipping unreadable image {entry}", file=sys.stderr, flush=True)


class BatchStream(torch.utils.data.Sampler):
    """Index batches for one process, forever, from optimizer step `start` on: the same sequence for any number of
    workers, and a resumed run continues it exactly. Epoch e visits the data in permutation (seed, e); global
    micro-batch k holds positions [k W b, (k + 1) W b) of the concatenated epochs, rank r takes b of them."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start_micro: int = 0):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start_micro

    def __iter__(self):
        k = self.start
        while True:
            pos = k * self.world * self.batch + self.rank * self.batch
            yield [self.item(p) for p in range(pos, pos + self.batch)]
            k += 1

    def item(self, pos: int) -> tuple:
        epoch, i = divmod(pos, self.n)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return int(perm[i]), epoch


def loader(dataset, cfg, env, start_micro: int):
    """Batches of `dataset` for this process (env: train_run.Env) from micro-batch `start_micro` on."""
    sampler = BatchStream(len(dataset), micro_batch(cfg, env), env.rank, env.world, cfg.seed, start_micro)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone: resumes stay exact
        persistent_workers=cfg.workers > 0, worker_init_fn=ignore_stop_signals))


def close_loader(batches) -> None:
    """Stop a DataLoader iterator's workers now, also when an exception leaves the loop: the workers ignore SIGTERM,
    so the terminate() with which multiprocessing ends leftover workers at interpreter exit would wait for ever."""
    shutdown = getattr(batches, "_shutdown_workers", None)                  # torch's own clean shutdown
    if shutdown is not None:
        shutdown()
