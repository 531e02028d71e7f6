"""Train GLEAN (Appendix A, Eq. 5-9), or pretrain the StyleGAN2 latent bank it needs; one process or many (torchrun).

    python train.py --data ffhq --scale 16                 # preset: FFHQ 64 -> 1024 on the official FFHQ bank
    python train.py --data DIR --out-size 256 --scale 8 --bank runs/bank/bank.safetensors
    torchrun --nproc_per_node=4 train.py --data ffhq --scale 16     # the same run on 4 GPUs
    python train.py --stage bank --data DIR --out-size 64   # bring your own latent bank (StyleGAN2)
    python train.py --out runs/x --resume                    # continue exactly where runs/x stopped

Symbols: x the LR input, y the HR ground truth, y_hat = G(x) the GLEAN output, D the StyleGAN2 discriminator,
D(.) = sigmoid(logit). The bank's weights stay fixed throughout (Sec. 3.4).

--batch is the global batch of one optimizer step: it is split evenly over the processes and the --accum
micro-batches, so a command trains the same model on one GPU or several (the discriminator's minibatch-stddev
groups stay inside a micro-batch, and floating-point sums may round differently).

A run directory holds checkpoints (plain data, written atomically; the newest readable one is resumed from),
metrics.jsonl, TensorBoard logs and, when a run finishes, the trained model (glean.safetensors, or bank.safetensors
for the bank stage: the EMA generator).
"""
import argparse
import contextlib
import io
import json
import functools
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import glean
import glean_fast
import images
import stylegan2
import weight_formats
import zoo
from evaluate import LPIPS, psnr
from glean_io import CheckpointError, atomic_write, load_file, load_state_strict, remove_stale_temp, save_file
from images import IMAGE_EXTS, InputError, box_fits, image_size, imresize, read_rgb, square

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    stage: str = "glean"             # "glean" (Appendix A) or "bank" (StyleGAN2 pretraining)
    data: str = ""                   # a preset dataset name (see PRESETS) or a folder of HR images
    data_root: str = ""              # where preset datasets live (default: $GLEAN_DATA or ./data)
    lr_dir: str = ""                 # optional folder of pre-made LR images with the same file stems
    val_data: str = ""               # optional folder of held-out HR images for validation
    out_size: int = 0                # HR size (the bank's resolution); set by the preset
    scale: int = 0                   # out_size / in_size
    model: dict = field(default_factory=dict)   # GLEANConfig / GeneratorConfig overrides (widths, ablations)
    bank: str = ""                   # GLEAN: pretrained StyleGAN2 (registered name, or a file of any known format)
    init: str = ""                   # GLEAN: start from a trained GLEAN (registered name or file; its config + bank);
                                     # bank stage: from a StyleGAN2 generator of the same widths, maybe smaller
    crop: tuple = ()                 # (left, top, size): square box of the training images (default: centre square)
    crop_jitter: float = 0.0         # random shift (fraction of size) and scale (1 +- it) of that box per image
    disc: str = ""                   # discriminator init: "" = from the bank file if it has one, "none", or a file
    degrade: str = ""                # real-world degradations on top of bicubic LR: "", "mild" or "strong" (DEGRADE)
    lr_float: bool = False           # keep on-the-fly LR images as floats (default: clipped, rounded to 8 bits)
    iters: int = 300_000             # optimizer steps (Appendix A: 300k)
    batch: int = 8                   # global batch per optimizer step, over all processes and micro-batches
                                     # (Appendix A: 8 for faces, 16 otherwise); bank stage: 16
    accum: int = 1                   # micro-batches per optimizer step (each process: batch / (processes * accum))
    lr: float = 1e-4                 # Adam learning rate (Appendix A); bank stage: 2e-3
    betas: tuple = (0.9, 0.99)       # Adam betas (official configs); bank stage: (0, 0.99)
    min_lr: float = 1e-7             # eta_min of the cosine annealing (official: 1e-7)
    lr_period: int = 0               # T_max of the cosine in steps, 0 = iters (the released models' configs: the
                                     # whole run; mmagic 1.x's base config: 600k over a 300k-step run)
    pixel_weight: float = 1.0        # MSE, Eq. (5)
    percep_weight: float = 1e-2      # alpha_percep, Eq. (8)
    percep_norm_img: bool = False    # map [-1, 1] to [0, 1] before VGG's ImageNet normalisation (official norm_img:
                                     # False for the 8x/16x models, True for in128 -> 1024)
    gan_weight: float = 1e-2         # alpha_gen, Eq. (8)
    vgg_weights: str = ""            # torchvision VGG16 ImageNet weights file (else torchvision's cache/download)
    r1_gamma: float = 10.0           # bank stage: R1 weight (StyleGAN2)
    reg_every: int = 16              # bank stage: lazy regularisation interval
    ema_kimg: float = 10.0           # bank stage: half-life of the generator EMA, in thousands of images
    mixing: float = 0.9              # bank stage: style-mixing probability
    amp: str = "none"                # "none", "bf16" or "fp16" (fp16 on CUDA only)
    compile: bool = False            # torch.compile the networks
    device: str = ""                 # "" = cuda if available else cpu
    workers: int = 2                 # DataLoader workers per process
    seed: int = 0
    out: str = "runs/glean"          # run directory
    ckpt_every: int = 2000           # steps between checkpoints
    keep: int = 3                    # checkpoints kept
    log_every: int = 50              # steps between metric logs
    val_every: int = 5000            # steps between validations (0: never)
    val_count: int = 16              # validation images
    tensorboard: bool = True
    resume: bool = False             # continue from the newest readable checkpoint in `out`


# The released models' categories and scales: sizes, latent bank, data folders, and the training recipe.
#
# The recipe is Appendix A's (Adam 1e-4, 300k steps, cosine annealing, 8 images per step for faces and 16
# otherwise), with what the paper leaves open taken from the official configs. Two generations of them exist:
# (a) mmediting 0.x, configs/restorers/glean/glean_ffhq_16x.py, glean_cat_8x.py, glean_cat_16x.py,
#     glean_in128out1024_4x2_300k_ffhq_celebahq.py: the configs the released checkpoints and their logs
#     (2021-05 to 2021-08) come from, written by the paper's first author;
# (b) mmagic 1.x ports, configs/glean/glean_x16_2xb8_ffhq.py, glean_x8_2xb8_cat.py, glean_x16_2xb8_cat.py,
#     glean_in128out1024_4xb2-300k_ffhq-celeba-hq.py with their base configs/_base_/models/base_glean.py.
# Both: Adam lr 1e-4, betas (0.9, 0.99) for G and D; 300k iterations; MSE weight 1; perceptual loss on VGG16 layer
# '21' (conv4_3, before its ReLU), MSE, weight 1e-2, with norm_img=False in the 8x/16x configs (the network's
# [-1, 1] images go into the ImageNet normalisation as they are) and True in the in128 -> 1024 one (mapped to
# [0, 1] first); vanilla GAN loss weight 1e-2; the StyleGAN2 discriminator initialised from the same release file
# as the bank ('discriminator' weights).
# Where they differ:
# - schedule: (a) CosineRestart, periods [300000], min_lr 1e-7: one cosine over the whole run, down to 1e-7;
#   (b) CosineAnnealingLR, T_max 600k, eta_min 1e-7 over 300k iterations: the run ends half way, at ~5e-5;
# - images per step: (a) 2 GPUs x 4 = 8 for ffhq 16x, 2 x 8 = 16 for cats, 4 x 2 = 8 for in128 -> 1024, as in
#   Appendix A; (b) "2xb8" = 16 for ffhq 16x as well.
# The presets follow Appendix A and (a): --lr-period 0 (the whole run) and 8 / 16 images per step.
# `--lr-period 600000 --batch 16` gives (b)'s ffhq 16x.
PRESETS = {
    ("ffhq", 16): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, lr_period=0, percep_norm_img=False,
                       hr="ffhq/images", lr="ffhq/BIx16_down", val="CelebA-HQ/GT",
                       url="https://github.com/NVlabs/ffhq-dataset"),
    ("ffhq", 8): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, lr_period=0, percep_norm_img=True,
                      hr="ffhq/images", degrade="strong", val="CelebA-HQ/GT", url="https://github.com/NVlabs/ffhq-dataset"),
    ("cat", 8): dict(out_size=256, bank="stylegan2_cat_256", batch=16, lr_period=0, percep_norm_img=False,
                     hr="cat_train/GT", lr="cat_train/BIx8_down", val="cat_test/GT",
                     url="https://www.yf.io/p/lsun (LSUN cat)"),
    ("cat", 16): dict(out_size=256, bank="stylegan2_cat_256", batch=16, lr_period=0, percep_norm_img=False,
                      hr="cat_train/GT", lr="cat_train/BIx16_down", val="cat_test/GT",
                      url="https://www.yf.io/p/lsun (LSUN cat)"),
}
PRESET_TRAINING = ("batch", "lr_period", "percep_norm_img")   # preset values that a flag overrides


class UserError(Exception):
    """A problem the user can fix (missing data or weights, bad flags): reported in one line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss stopped the run (its debug state is saved): reported in one line, exit code 1."""


def preset_folder(name: str, scale: int, data_root: str) -> tuple:
    """(preset dict, data root, HR folder) of a preset name; a one-line error for a wrong scale or missing data."""
    if (name, scale) not in PRESETS:
        scales = sorted(s for n, s in PRESETS if n == name)
        raise UserError(f"preset '{name}' has scales {scales}; pass --scale with one of them")
    p = PRESETS[(name, scale)]
    root = Path(data_root or os.environ.get("GLEAN_DATA", "data"))
    hr = root / p["hr"]
    if not hr.is_dir():
        raise UserError(f"dataset '{name}' not found: expected HR images in {hr} (download from {p['url']}), "
                        f"or point --data-root / GLEAN_DATA at the folder that holds '{p['hr']}'")
    return p, root, hr


def resolve(cfg: TrainConfig, given: dict | None = None) -> TrainConfig:
    """Fill in a preset (its values yield to flags in `given`) and check that data and weights exist, with a
    one-line hint where they do not."""
    names = {name for name, _ in PRESETS}
    if not cfg.data:
        raise UserError(f"pass --data: a preset ({', '.join(sorted(names))}) or a folder of images "
                        f"(only --resume takes it from the run)")
    if cfg.data in names:
        p, root, hr = preset_folder(cfg.data, cfg.scale, cfg.data_root)
        cfg.data = str(hr)
        cfg.out_size = cfg.out_size or p["out_size"]
        cfg.bank = cfg.bank or p["bank"]
        cfg.degrade = cfg.degrade or p.get("degrade", "")
        if cfg.stage == "glean":
            for name in PRESET_TRAINING:
                if name not in (given or {}):
                    setattr(cfg, name, p[name])
        if not cfg.lr_dir and p.get("lr") and (root / p["lr"]).is_dir():
            cfg.lr_dir = str(root / p["lr"])
        if not cfg.val_data and (root / p["val"]).is_dir():
            cfg.val_data = str(root / p["val"])
    elif not cfg.data or not Path(cfg.data).is_dir():
        raise UserError(f"--data must be a preset ({', '.join(sorted(names))}) or a folder of images, "
                        f"got '{cfg.data}'")
    if cfg.crop and not (cfg.crop[0] >= 0 and cfg.crop[1] >= 0 and cfg.crop[2] > 0):
        raise UserError(f"--crop LEFT TOP SIZE needs LEFT, TOP >= 0 and SIZE > 0, got {' '.join(map(str, cfg.crop))}")
    if not 0 <= cfg.crop_jitter < 0.5:
        raise UserError(f"--crop-jitter is a fraction of the box, 0 <= it < 0.5 (e.g. 0.05), got {cfg.crop_jitter}")
    if cfg.init and cfg.stage == "bank":
        take_init_bank_config(cfg)
    elif cfg.init:
        if cfg.model or cfg.bank:
            raise UserError("--init takes the model config and the latent bank from its file; "
                            "drop --model / --fig7 / --bank")
        mcfg = load_init(cfg.init).cfg
        scale = mcfg.out_size // mcfg.in_size
        if (cfg.out_size and cfg.out_size != mcfg.out_size) or (cfg.scale and cfg.scale != scale):
            raise UserError(f"--init {cfg.init} is a {scale}x model to {mcfg.out_size} px; "
                            f"drop --scale / --out-size or pass {scale} / {mcfg.out_size}")
        cfg.out_size, cfg.scale = mcfg.out_size, scale
        cfg.model = {k: v for k, v in asdict(mcfg).items() if k not in ("in_size", "out_size")}
    if cfg.stage == "glean" and cfg.bank and not cfg.init:
        take_bank_config(cfg)
    if not cfg.out_size:
        raise UserError("pass --out-size (the HR / bank resolution) for a custom data folder")
    if cfg.stage == "glean" and not cfg.scale:
        raise UserError("pass --scale (out_size / in_size: 4, 8, 16, 32 or 64)")
    return cfg


BANK_FIELDS = ("style_channels", "num_mlps", "channel_multiplier", "channel_base", "lr_mlp", "blur_kernel")


def take_init_bank_config(cfg: TrainConfig) -> None:
    """Bank stage --init: the widths come from the generator to start from; its out_size may be smaller (the bank
    grows: its layers are copied, the new, finer ones start from scratch), never larger."""
    try:
        src = zoo.load_bank(cfg.init, progress=False).cfg
    except (CheckpointError, ValueError) as e:
        raise UserError(f"--init {cfg.init}: {e}") from e
    widths = {k: getattr(src, k) for k in BANK_FIELDS}
    clash = {k: v for k, v in cfg.model.items() if k in widths and v != widths[k]}
    if clash:
        raise UserError(f"--init {cfg.init} has {', '.join(f'{k}={widths[k]}' for k in clash)}; drop those from "
                        f"--model (the widths come from the generator it starts from)")
    if cfg.out_size and cfg.out_size < src.out_size:
        raise UserError(f"--init {cfg.init} makes {src.out_size} px images; --out-size {cfg.out_size} is smaller")
    cfg.out_size = cfg.out_size or src.out_size
    cfg.model = {**cfg.model, **{k: list(v) if isinstance(v, tuple) else v for k, v in widths.items()}}


def grow_from(G: stylegan2.Generator, init: str) -> str:
    """Copy the generator of file `init` into G, layer by layer (same names and shapes); G's layers beyond the
    source's resolution keep their fresh initialisation. Returns a line saying what was copied."""
    src = zoo.load_bank(init, progress=False).state_dict()
    dst = G.state_dict()
    wrong = [k for k, v in src.items() if k not in dst or dst[k].shape != v.shape]
    if wrong:
        raise UserError(f"--init {init}: its layer {wrong[0]} does not fit the bank being trained")
    G.load_state_dict({**dst, **src})
    return (f"bank: {len(src)} of {len(dst)} tensors from {init}; the {len(dst) - len(src)} others (the finer "
            f"resolutions) start from scratch")


def take_bank_config(cfg: TrainConfig) -> None:
    """GLEAN's bank fields (and out_size) from the --bank file itself: the registered entry's config, this project's
    bank file's, or read off the tensors of any other StyleGAN2 file. A --model value or --out-size that contradicts
    the file is a one-line error (it would only fail later, as a shape mismatch)."""
    if cfg.bank in zoo.WEIGHTS:
        bank = stylegan2.GeneratorConfig(**zoo.WEIGHTS[cfg.bank].config)
    elif not Path(cfg.bank).is_file():
        return                                  # reported when the bank is loaded, after the flags are checked
    else:
        sd, bank = weight_formats.generator_state(zoo.weights_file(cfg.bank))
        bank = bank or weight_formats.infer_generator_config(sd)
    if cfg.out_size and cfg.out_size != bank.out_size:
        raise UserError(f"--bank {cfg.bank} is a {bank.out_size} px StyleGAN2, but --out-size is {cfg.out_size}: "
                        f"pass --out-size {bank.out_size} (or drop it)")
    cfg.out_size = bank.out_size
    for name in BANK_FIELDS:
        value, given = getattr(bank, name), cfg.model.get(name)
        value = list(value) if isinstance(value, tuple) else value             # JSON-friendly, as --model gives it
        if given is not None and (list(given) if isinstance(value, list) else given) != value:
            raise UserError(f"--model {name}={cfg.model[name]} contradicts --bank {cfg.bank} ({name}={value}); "
                            f"drop it from --model (the bank's own value is taken)")
        cfg.model[name] = value


# ----------------------------------------------------------------------------------------------------------
# Data


def list_images(folder) -> list:
    files = images.list_images(folder)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found in {folder}")
    return files


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
    """HR images from a folder (any size and format Pillow reads): centre-cropped square, resized to out_size; the
    LR made on the fly with MATLAB bicubic (`images.imresize`), optionally degraded, or read from a paired folder.

    Items are addressed by (index, epoch): their random flip and degradation come from a generator seeded by
    (seed, epoch, index), so a run is reproducible whatever the number of workers and resumes exactly.

    Every file's header is read once here, in the main process (`report`: print what it finds): files that cannot
    be read are named once and skipped, a folder with none readable and a --crop that does not fit are one-line
    errors, and images smaller than out_size (upscaled, so blurry targets) are counted in one notice. A file that
    fails later, in a worker, is replaced by the next readable one and named in the item's "skipped" entry, for the
    training loop to report once.
    """

    def __init__(self, folder, out_size: int, in_size: int | None = None, lr_dir: str = "", flip: bool = True,
                 degrade: str = "", seed: int = 0, limit: int = 0, crop: tuple = (), crop_jitter: float = 0.0,
                 report: bool = True, lr_float: bool = False):
        self.files = list_images(folder)[:limit or None]
        self.out_size, self.in_size, self.flip, self.degrade, self.seed = out_size, in_size, flip, degrade, seed
        self.degrade = "strong" if degrade is True else degrade or ""          # older runs stored a bool
        self.lr_float = lr_float
        self.crop, self.crop_jitter = tuple(crop), crop_jitter
        if lr_dir and (crop or crop_jitter):
            raise UserError("--crop / --crop-jitter cannot be used with --lr-dir (the paired LR images are fixed)")
        sizes = {path: image_size(path) for path in self.files}               # (H, W), or None if unreadable
        self.bad = {path for path, hw in sizes.items() if hw is None}
        if len(self.bad) == len(self.files):
            raise UserError(f"none of the {len(self.files)} image files in {folder} can be read "
                            f"(e.g. {self.files[0].name}); check the folder and the files")
        for path in sorted(self.bad) if report else ():
            print(f"warning: skipping unreadable image {path}", file=sys.stderr)
        sizes = {path: hw for path, hw in sizes.items() if hw is not None}
        if crop:
            for path, (H, W) in sizes.items():
                if not box_fits(self.crop, H, W):
                    raise UserError(f"--crop {' '.join(map(str, crop))} (left top size) does not fit in {path.name} "
                                    f"({W}x{H}); pass a box inside every training image")
        small = [(path, hw) for path, hw in sizes.items() if (crop[2] if crop else min(hw)) < out_size]
        if small and report:
            (path, (H, W)) = small[0]
            print(f"notice: {len(small)} of {len(sizes)} images in {folder} have a {'crop box' if crop else 'square'} "
                  f"smaller than {out_size} px (e.g. {path.name}, {W}x{H}): they are upscaled, so the model learns "
                  f"blurry targets from them; remove them or use larger images", file=sys.stderr)
        self.fingerprint = fingerprint(folder, self.files)
        self.lr_files = {}
        if lr_dir:
            by_stem = {p.stem: p for p in list_images(lr_dir)}
            missing = [p.name for p in self.files if p.stem not in by_stem]
            if missing:
                raise UserError(f"{len(missing)} HR images have no LR image of the same name in {lr_dir} "
                                f"(e.g. {missing[0]}); remove --lr-dir to make LR images on the fly")
            self.lr_files = {p: by_stem[p.stem] for p in self.files}
        self.bad = set()

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
            if self.files[k] in self.bad:
                continue
            try:
                return {**self.load(k, epoch), "skipped": "\n".join(skipped)}
            except (InputError, OSError, ValueError, RuntimeError) as e:
                self.bad.add(self.files[k])
                skipped.append(str(e) if isinstance(e, InputError) else f"{self.files[k]} ({e})")  # InputError names it
        raise UserError(f"no readable image among the {len(self.files)} files in {self.files[0].parent}")


def fingerprint(folder, files: list) -> str:
    """The image files of a dataset in one short string (their count and a hash of their relative names): a moved
    dataset keeps it, another one does not."""
    import hashlib
    h = hashlib.sha256("\n".join(str(p.relative_to(folder)) for p in files).encode()).hexdigest()
    return f"{len(files)} files, names sha256 {h[:12]}"


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


# ----------------------------------------------------------------------------------------------------------
# Losses (Appendix A)


def pixel_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_mse = 1/N ||y_hat - y||^2."""
    return F.mse_loss(y_hat, y)                                              # Eq. (5)


class PerceptualLoss(nn.Module):
    """L_percep = 1/N ||f(y_hat) - f(y)||^2, f = VGG16 up to conv4_3 (before its ReLU), ImageNet weights, frozen.

    conv4_3 is `features[21]`, the official configs' layer '21'. Images arrive in the network's [-1, 1]; f sees them
    ImageNet-normalised ((t - mean) / std), after mapping them to [0, 1] only if norm_img (the official option of
    that name: False in the 8x/16x configs, True in the in128 -> 1024 one).
    """

    def __init__(self, weights: str = "", norm_img: bool = False):
        super().__init__()
        self.norm_img = norm_img
        vgg = torchvision.models.vgg16()
        if weights:
            sd = load_file(weights)
            sd = sd.get("state_dict", sd)
            feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
            vgg.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= 21},
                                         strict=False)
            missing = [k for k in vgg.features[:22].state_dict() if k not in feats]
            if missing:
                raise UserError(f"{weights} lacks VGG16 weights {missing[:2]}: pass torchvision's vgg16 state dict")
        else:
            try:
                vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
            except (OSError, RuntimeError) as e:  # urllib errors are OSErrors
                raise UserError(f"VGG16 ImageNet weights unavailable ({type(e).__name__}): pass --vgg-weights FILE "
                                f"(torchvision's vgg16-397923af.pth) or --percep-weight 0") from e
        self.f = vgg.features[:22].eval().requires_grad_(False)              # ... conv4_3
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        if self.norm_img:
            t = (t + 1) / 2                                                  # [-1, 1] -> [0, 1]
        return (t - self.mean) / self.std                                    # ImageNet statistics

    def forward(self, y_hat, y):
        return F.mse_loss(self.f(self.normalise(y_hat)), self.f(self.normalise(y)))   # Eq. (6)


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_gen of Eq. (7) is written log(1 - D(y_hat)); like the official code (and StyleGAN2) we minimise the
    non-saturating -log D(y_hat) = softplus(-logit), which has the same optimum and useful gradients early on."""
    return F.softplus(-fake_logits).mean()                                   # Eq. (7)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D maximises log(1 - D(y_hat)) + log D(y); we minimise the negation, softplus(fake) + softplus(-real)."""
    return (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()      # Eq. (9)


def glean_loss(l_mse, l_percep, l_gen, cfg: TrainConfig) -> torch.Tensor:
    """L_g = L_mse + alpha_percep L_percep + alpha_gen L_gen."""
    return cfg.pixel_weight * l_mse + cfg.percep_weight * l_percep + cfg.gan_weight * l_gen   # Eq. (8)


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_y D(y)||^2 on real images (StyleGAN2's regulariser of the bank stage)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------------------------------------
# Processes, checkpoints, progress


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """True on every process only if the flag is true on every process (always False when any is False)."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def mean(self, values: dict) -> dict:
        """Each number averaged over all processes: with equal shares, a loss over the whole global batch."""
        if self.world == 1:
            return values
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))


def setup(cfg: TrainConfig) -> Env:
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK): NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world, device)


def wrap(module: nn.Module, env: Env) -> nn.Module:
    """DistributedDataParallel with several processes (else the module itself). Buffers (fixed noise, FIR
    kernels) are identical on every process from the start, so they are not re-broadcast at every forward."""
    if env.world == 1:
        return module
    import inspect
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[env.device.index] if env.device.type == "cuda" else None, **sync)


def checkpoints(run: Path) -> list:
    return sorted(run.glob("checkpoints/step_*.pt"))


def save_checkpoint(run: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step_N.pt atomically (a killed write leaves the previous ones intact), keep the last few."""
    path = run / "checkpoints" / f"step_{step:08d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    for old in checkpoints(run)[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run: Path, report: bool = True) -> tuple:
    """The newest checkpoint that loads completely, newest first; an empty, truncated or corrupt one is reported
    and skipped. Returns (state, path) or (None, None)."""
    for path in reversed(checkpoints(run)):
        try:
            state = load_file(path)
        except CheckpointError as e:
            if report:
                print(f"warning: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        if state.get("format") == "glean-train":
            return state, path
    return None, None


def rng_states(env: Env) -> list:
    """Every process's torch RNG state (CPU and CUDA), as tensors."""
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    if env.world == 1:
        return [state]
    out = [None] * env.world
    dist.all_gather_object(out, {k: v.cpu() for k, v in state.items()})
    return out


def set_rng_states(states: list, env: Env) -> None:
    """Restore this process's RNG state; a process the checkpoint has none for (resumed with more processes than
    it was written by) keeps the fresh seed it was given."""
    if env.rank >= len(states):
        return
    state = states[env.rank]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)


class Stopper:
    """SIGTERM / SIGINT ask the loop to stop after the current step (then a checkpoint is written); a second
    SIGINT interrupts at once. The previous handlers come back with close().

    Schedulers and torchrun signal a whole process group, DataLoader workers included: the workers ignore both
    signals (`ignore_stop_signals`), so the main process can finish its step, save and exit 0. Install the Stopper
    before starting workers: a forked worker inherits it until it ignores the signals, and then it does nothing.
    """

    def __init__(self):
        self.requested, self.pid = False, os.getpid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() != self.pid:                 # a DataLoader worker just forked from us: not its business
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)


def checkpoint_or_stop(step: int, cfg: TrainConfig, env: Env, stop: "Stopper", save) -> bool:
    """End of a step: save every ckpt_every steps, at the last step, and when any process was asked to stop;
    True means stop now (all processes agree)."""
    stopping = not env.all_true(not stop.requested)
    if step % cfg.ckpt_every == 0 or step == cfg.iters or stopping:
        save(step)
    return stopping


class Logger:
    """metrics.jsonl, TensorBoard scalars and images, and progress (main process only): a tqdm bar on a terminal,
    else (batch jobs, nohup) a plain line every --log-every steps with the images per second, the ETA and the losses.

    A resumed run continues the same logs: rows and TensorBoard events after the checkpoint's step (logged before a
    kill) are dropped, and the wall time goes on from the checkpoint's `elapsed` seconds.
    """

    def __init__(self, run: Path, cfg: TrainConfig, env: Env, start: int, elapsed: float = 0.0):
        self.env, self.cfg, self.file, self.tb, self.bar = env, cfg, None, None, None
        self.t0 = time.perf_counter() - elapsed
        self.last = (start, time.perf_counter())                            # (step, time) of the last progress line
        if not env.main:
            return
        run.mkdir(parents=True, exist_ok=True)
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text().splitlines(keepends=True)
            kept = [line if line.endswith("\n") else line + "\n" for line in lines if logged_step(line) <= start]
            if kept != lines:
                with atomic_write(metrics, "w") as f:
                    f.writelines(kept)
        self.file = open(metrics, "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("TensorBoard is not installed: pip install tensorboard, or pass --no-tensorboard") \
                    from e
            self.tb = SummaryWriter(str(run / "tb"), purge_step=start + 1)  # readers hide events of steps > start
        self.plain = not sys.stderr.isatty()
        if not self.plain:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.iters, initial=start, unit="it", dynamic_ncols=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def scalars(self, step: int, values: dict, show: bool = True):
        if not self.env.main:
            return
        self.file.write(json.dumps({"step": step, **values, "time": round(self.elapsed(), 3)}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.add_scalar("time/seconds", self.elapsed(), step)
        if not show:
            return
        losses = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")}
        if self.bar is not None:
            self.bar.set_postfix(losses)
        elif self.plain:
            (step0, t0), now = self.last, time.perf_counter()
            per_step = (now - t0) / max(step - step0, 1)
            self.last = (step, now)
            eta = round(per_step * (self.cfg.iters - step))
            print(f"step {step}/{self.cfg.iters} ({100 * step / self.cfg.iters:.1f}%)  "
                  f"{self.cfg.batch / per_step:.3g} images/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}  "
                  + "  ".join(f"{k} {v}" for k, v in losses.items())
                  + (f"  lr {values['lr']:.3g}" if "lr" in values else ""), file=sys.stderr, flush=True)

    def images(self, step: int, tag: str, grid: torch.Tensor):
        """grid: [3, H, W] in [-1, 1]."""
        if self.env.main and self.tb:
            self.tb.add_image(tag, ((grid + 1) / 2).clamp(0, 1), step)

    def tick(self):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        for h in (self.bar, self.tb, self.file):
            if h is not None:
                h.close()


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a line cut short by a kill (so it is dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the main process (see Stopper): a signal to the whole process
    group must not kill them in the middle of a run."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batch(cfg: TrainConfig, env: Env) -> int:
    """Images per process and micro-batch: the global --batch split over processes and --accum micro-batches."""
    return cfg.batch // (env.world * cfg.accum)


def loader(dataset, cfg: TrainConfig, env: Env, start_micro: int):
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


def mbstd_group(n: int, largest: int = 4) -> int:
    """The discriminator's minibatch-stddev group for micro-batches of n: StyleGAN2's 4 (the official configs train
    with 8 images per GPU), or the largest size below it that divides n (e.g. 3 for 6 images, 1 for 5)."""
    return max(g for g in range(1, min(largest, n) + 1) if n % g == 0)


def precision(cfg: TrainConfig, env: Env):
    """autocast context and fp16 GradScaler (or None) for --amp."""
    if cfg.amp == "none":
        return contextlib.nullcontext, None
    if cfg.amp == "fp16" and env.device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    return (lambda: torch.autocast(env.device.type, dtype=dtype)), scaler


def cosine(opt, cfg: TrainConfig):
    """Cosine annealing (Appendix A) in the official form: lr(t) = min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2,
    T = --lr-period, or if 0 --iters (the released models' configs: one cosine over the whole run, to min_lr; with
    mmagic 1.x's T = 600k a 300k-step run ends half way down, at ~lr / 2)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.lr_period or cfg.iters, eta_min=cfg.min_lr)


def follow_schedule(sched, opt, cfg: TrainConfig) -> None:
    """On resume with a new --lr, --min-lr, --lr-period or (with period 0) --iters: continue on the cosine those
    values define, from the step the run has reached (the learning rate is set to that curve's value, so the
    scheduler's recursive update stays on it). Unchanged values leave the restored scheduler exactly as it was."""
    T, t, lr, min_lr = cfg.lr_period or cfg.iters, sched.last_epoch, cfg.lr, cfg.min_lr
    if (sched.T_max, sched.eta_min, sched.base_lrs) == (T, min_lr, [lr] * len(opt.param_groups)):
        return
    sched.T_max, sched.eta_min, sched.base_lrs = T, min_lr, [lr] * len(opt.param_groups)
    for g in opt.param_groups:
        g["initial_lr"] = lr
        g["lr"] = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t / T)) / 2
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def check_finite(losses: dict, env: Env, run: Path, step: int, debug) -> None:
    """Stop on a NaN/inf loss (on any process), after saving what is needed to reproduce it: debug() returns it
    (models, batch), called only then, so a normal step copies nothing to the host."""
    ok = all(math.isfinite(float(v)) for v in losses.values())
    if env.all_true(ok):
        return
    path = run / f"nonfinite_step_{step:08d}_rank{env.rank}.pt"
    if not ok:
        save_file({"step": step, "losses": {k: float(v) for k, v in losses.items()}, **debug()}, path)
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
    raise NonFiniteLoss(f"non-finite loss at step {step} ({values}); "
                        f"the models and the batch are saved in {run}/nonfinite_step_{step:08d}_rank*.pt. "
                        f"Resume from the last checkpoint with a lower learning rate (python train.py --out {run} "
                        f"--resume --lr LR), or check the data")


def same_everywhere(env: Env, *modules: nn.Module) -> None:
    """With several processes: check that every one holds bit-identical weights (a hash of all tensors)."""
    if env.world == 1:
        return
    import hashlib
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * env.world
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes ended with different weights: {digests}")
    if env.main:
        print(f"weights identical on all {env.world} processes (sha256 {digests[0][:16]})")


# ----------------------------------------------------------------------------------------------------------
# GLEAN (Appendix A)


@functools.lru_cache(maxsize=1)
def load_init(name: str) -> glean.GLEAN:
    """--init: the trained GLEAN to start from (a registered name, this project's model file or a training checkpoint
    of train.py). Cached: `resolve` reads its config, `train_glean` its weights (and then clears the cache)."""
    try:
        return zoo.load_pretrained(name)
    except (CheckpointError, ValueError) as e:
        raise UserError(f"--init {name}: {e}") from e


def build_glean(cfg: TrainConfig) -> glean.GLEAN:
    """The network to train: glean_fast.GLEANFast, the reference network (glean.GLEAN) computed faster."""
    mcfg = glean.GLEANConfig.from_dict({"out_size": cfg.out_size, "in_size": cfg.out_size // cfg.scale, **cfg.model})
    return glean_fast.GLEANFast(mcfg)


def init_discriminator(D: stylegan2.Discriminator, cfg: TrainConfig) -> str:
    """Start D (Eq. 7, 9) from pretrained weights, as the official configs do (from the StyleGAN2 release the bank
    comes from): --disc FILE; else the --init file's discriminator; else the bank file's. "none", or no such file
    having one, leaves D random. Returns one line saying where D came from."""
    if cfg.disc == "none":
        return "discriminator: random init (--disc none)"
    sources = [cfg.disc] if cfg.disc else [s for s in (cfg.init, cfg.bank) if s]
    for source in sources:
        path = zoo.weights_file(source)
        sd, names = weight_formats.discriminator_state(path)
        if sd is None:
            continue
        if names is None:
            weight_formats.load_official(D, sd, "discriminator.")
        else:
            load_state_strict(D, sd, names, str(path))
        return f"discriminator: from {source}"
    if cfg.disc:
        raise UserError(f"--disc {cfg.disc} has no discriminator weights (a bank file of --stage bank, a training "
                        f"checkpoint, or an official file with 'discriminator.*' keys)")
    return (f"discriminator: random init ({' and '.join(sources) or 'no file'} has none; pass --disc FILE, e.g. a "
            f"checkpoint of the run that trained it)")


def train_glean(cfg: TrainConfig, env: Env, state: dict | None) -> None:
    run = Path(cfg.out)
    bank_file = zoo.weights_file(cfg.bank) if cfg.bank and state is None else None   # fail before building
    torch.manual_seed(cfg.seed)                                             # the same initial weights everywhere
    G = build_glean(cfg)                                                    # glean.py's initialisation, kept as is
    if cfg.init and state is None:                  # fine-tune: every weight (bank included) from a trained GLEAN
        G.load_state_dict(load_init(cfg.init).state_dict())
        load_init.cache_clear()
    G = G.to(env.device)
    mcfg = G.cfg
    micro = micro_batch(cfg, env)
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(
        in_size=mcfg.out_size, channel_multiplier=mcfg.channel_multiplier, channel_base=mcfg.channel_base,
        mbstd_group_size=mbstd_group(micro)))
    D = D.to(env.device)
    if state is None and not cfg.init:
        if G.bank is not None:
            if not cfg.bank:
                raise UserError("GLEAN needs a pretrained StyleGAN2 latent bank at out_size: pass --bank "
                                "(a registered name or a file; train one with --stage bank)")
            G.load_bank(bank_file)
    if state is None and cfg.gan_weight > 0:
        where = init_discriminator(D, cfg)
        if env.main:
            print(where)
    percep = PerceptualLoss(cfg.vgg_weights, cfg.percep_norm_img).to(env.device) if cfg.percep_weight > 0 else None
    opt_g = torch.optim.Adam(G.trainable_parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    sched_g, sched_d = cosine(opt_g, cfg), cosine(opt_d, cfg)
    start, elapsed = 0, 0.0
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is not None:
        G.load_state_dict(state["model"])
        D.load_state_dict(state["discriminator"])
        for obj, key in ((opt_g, "opt_g"), (opt_d, "opt_d"), (sched_g, "sched_g"), (sched_d, "sched_d")):
            obj.load_state_dict(state[key])
        follow_schedule(sched_g, opt_g, cfg), follow_schedule(sched_d, opt_d, cfg)   # --resume --lr / --iters
        start, elapsed = state["step"], state.get("elapsed", 0.0)
        set_rng_states(state["rng"], env)
    bank_before = {k: v.detach().clone() for k, v in G.bank.state_dict().items()} if G.bank is not None else {}
    G_train, D_train = wrap(G, env), wrap(D, env)
    G_fwd, D_fwd = (torch.compile(G_train), torch.compile(D_train)) if cfg.compile else (G_train, D_train)
    autocast, scaler = precision(cfg, env)
    data = SRDataset(cfg.data, mcfg.out_size, mcfg.in_size, cfg.lr_dir, degrade=cfg.degrade, lr_float=cfg.lr_float, seed=cfg.seed,
                     crop=cfg.crop, crop_jitter=cfg.crop_jitter, report=env.main)
    same_data(state, data, env)
    val = SRDataset(cfg.val_data, mcfg.out_size, mcfg.in_size, flip=False, limit=cfg.val_count) \
        if cfg.val_data and env.main else None
    lpips = None
    if val is not None:
        lpips, why = LPIPS.load()
        if lpips is None:
            print(f"validation: PSNR only; {why}", file=sys.stderr)
        else:
            lpips = lpips.to(env.device)
    log, stop, seen, batches = None, Stopper(), set(), None  # the Stopper before the DataLoader starts its workers

    def save(step):
        st = {"format": "glean-train", "stage": "glean", "config": asdict(cfg), "model_config": asdict(mcfg),
              "step": step, "model": G.state_dict(), "discriminator": D.state_dict(), "opt_g": opt_g.state_dict(),
              "opt_d": opt_d.state_dict(), "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
              "rng": rng_states(env), "world": env.world, "elapsed": log.elapsed(), "data": data.fingerprint}
        if env.main:
            save_checkpoint(run, step, st, cfg.keep)

    G.train(), D.train()
    step = start
    try:
        batches = loader(data, cfg, env, start * cfg.accum)
        log = Logger(run, cfg, env, start, elapsed)
        for step in range(start + 1, cfg.iters + 1):
            # -- generator: Eq. (8), the discriminator fixed --------------------------------------------------
            D.requires_grad_(False)
            fakes, reals, totals = [], [], {"loss/mse": 0.0, "loss/percep": 0.0, "loss/gen": 0.0, "loss/g": 0.0}
            for m in range(cfg.accum):
                b = next(batches)
                report_skipped(b, seen)
                x, y = b["lr"].to(env.device, non_blocking=True), b["hr"].to(env.device, non_blocking=True)
                sync = m == cfg.accum - 1 or env.world == 1
                with (contextlib.nullcontext() if sync else G_train.no_sync()), autocast():
                    y_hat = G_fwd(x)
                    l_mse = pixel_loss(y_hat.float(), y)
                    l_percep = percep(y_hat.float(), y) if percep is not None else y.new_zeros(())
                    l_gen = generator_adv_loss(D(y_hat).float()) if cfg.gan_weight > 0 else y.new_zeros(())
                    loss = glean_loss(l_mse, l_percep, l_gen, cfg)
                (scaler.scale(loss / cfg.accum) if scaler else loss / cfg.accum).backward()
                fakes.append(y_hat.detach())
                reals.append(y)
                for k, v in zip(totals, (l_mse, l_percep, l_gen, loss)):
                    totals[k] += float(v.detach()) / cfg.accum
            check_finite(totals, env, run, step, lambda x=x, y=y: {"lr": x.cpu(), "hr": y.cpu(),
                                                                   "model": G.state_dict()})
            (scaler.step(opt_g) if scaler else opt_g.step())
            opt_g.zero_grad(set_to_none=True)
            # -- discriminator: Eq. (9) -----------------------------------------------------------------------
            if cfg.gan_weight > 0:
                D.requires_grad_(True)
                d_total = 0.0
                for m, (y_hat, y) in enumerate(zip(fakes, reals)):
                    sync = m == cfg.accum - 1 or env.world == 1
                    with (contextlib.nullcontext() if sync else D_train.no_sync()), autocast():
                        l_d = discriminator_loss(D_fwd(y).float(), D_fwd(y_hat).float())
                    (scaler.scale(l_d / cfg.accum) if scaler else l_d / cfg.accum).backward()
                    d_total += float(l_d.detach()) / cfg.accum
                totals["loss/d"] = d_total
                check_finite({"loss/d": d_total}, env, run, step,
                             lambda: {"model": G.state_dict(), "discriminator": D.state_dict()})
                (scaler.step(opt_d) if scaler else opt_d.step())
                opt_d.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            sched_g.step()
            if cfg.gan_weight > 0:
                sched_d.step()
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:              # losses over the whole global batch
                log.scalars(step, {**env.mean(totals), "lr": sched_g.get_last_lr()[0]})
            if val is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iters):
                validate(G, val, env, log, step, lpips)
            if checkpoint_or_stop(step, cfg, env, stop, save):
                break
    finally:
        close_loader(batches)
        stop.close()
        if log is not None:
            log.close()
    if G.bank is not None:
        for k, v in G.bank.state_dict().items():
            assert torch.equal(v, bank_before[k]), f"latent bank tensor {k} changed during training"
    same_everywhere(env, G, D)
    if env.main:
        if step == cfg.iters:                       # the trained model, ready for infer.py / torch.hub / demo.py
            G.save(run / "glean.safetensors")
            print(f"finished at step {step}; model in {run / 'glean.safetensors'}, checkpoints in "
                  f"{run / 'checkpoints'}")
        else:
            print(f"stopped at step {step}; checkpoints in {run / 'checkpoints'}")


def same_data(state: dict | None, data: SRDataset, env: Env) -> None:
    """On resume: say so when the images differ from those the run started with (a moved dataset is fine)."""
    if state is not None and env.main and state.get("data", data.fingerprint) != data.fingerprint:
        print(f"warning: the training images ({data.fingerprint}) are not those the run started with "
              f"({state['data']}): the data order differs from an uninterrupted run's", file=sys.stderr)


@torch.no_grad()
def validate(G: glean.GLEAN, val: SRDataset, env: Env, log: Logger, step: int, lpips=None) -> float:
    """PSNR (and LPIPS) on the held-out images, and a grid: LR upscaled by (MATLAB) bicubic | GLEAN | ground truth."""
    G.eval()
    scores, dists, rows = [], [], []
    for i in range(len(val)):
        item = val[i]
        x, y = item["lr"][None].to(env.device), item["hr"][None].to(env.device)
        y_hat = G(x)
        scores.append(float(psnr(y_hat, y)))
        if lpips is not None:
            dists.append(float(lpips(y_hat.clamp(-1, 1), y)))
        if len(rows) < 4:
            bicubic = imresize(x, size=y.shape[-1]).clamp(-1, 1)
            rows.append(torch.cat([bicubic, y_hat.clamp(-1, 1), y], dim=-1)[0])
    G.train()
    score = sum(scores) / len(scores)
    log.scalars(step, {"val/psnr": score, **({"val/lpips": sum(dists) / len(dists)} if dists else {})}, show=False)
    log.images(step, "val/bicubic_glean_gt", torch.cat(rows, dim=-2))
    return score


# ----------------------------------------------------------------------------------------------------------
# Latent bank: StyleGAN2 pretraining (non-saturating loss, lazy R1, EMA, style mixing)


def train_bank(cfg: TrainConfig, env: Env, state: dict | None) -> None:
    run = Path(cfg.out)
    torch.manual_seed(cfg.seed)                                             # the same initial weights everywhere
    gcfg = stylegan2.GeneratorConfig(**{"out_size": cfg.out_size, **cfg.model})
    G = glean_fast.GeneratorFast(gcfg).to(env.device)                     # stylegan2.Generator, faster
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(
        in_size=cfg.out_size, channel_multiplier=gcfg.channel_multiplier, channel_base=gcfg.channel_base,
        mbstd_group_size=mbstd_group(micro_batch(cfg, env)))).to(env.device)
    G_ema = stylegan2.Generator(gcfg).to(env.device).eval().requires_grad_(False)
    if cfg.init and state is None:                   # start from a trained generator, maybe of fewer resolutions
        note = grow_from(G, cfg.init)
        if env.main:
            print(note)
    G_ema.load_state_dict(G.state_dict())
    c = cfg.reg_every / (cfg.reg_every + 1)  # lazy regularisation: rescale D's optimiser (StyleGAN2, App. B)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr * c, betas=tuple(b ** c for b in cfg.betas))
    start, elapsed = 0, 0.0
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is not None:
        for obj, key in ((G, "g"), (D, "d"), (G_ema, "g_ema"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            obj.load_state_dict(state[key])
        for opt, scale in ((opt_g, 1.0), (opt_d, c)):                       # --resume --lr: constant, as it was
            for g in opt.param_groups:
                g["lr"] = cfg.lr * scale
        start, elapsed = state["step"], state.get("elapsed", 0.0)
        set_rng_states(state["rng"], env)
    G_train, D_train = wrap(G, env), wrap(D, env)
    autocast, scaler = precision(cfg, env)
    data = SRDataset(cfg.data, cfg.out_size, seed=cfg.seed, crop=cfg.crop, crop_jitter=cfg.crop_jitter,
                     report=env.main)
    same_data(state, data, env)
    log, stop, seen, batches = None, Stopper(), set(), None  # the Stopper before the DataLoader starts its workers
    beta = 0.5 ** (cfg.batch / (cfg.ema_kimg * 1000))                       # EMA decay per step (global batch)
    z_fixed = torch.randn(16, gcfg.style_channels, generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)

    def styles(B):
        z = torch.randn(2, B, gcfg.style_channels, device=env.device)
        return [z[0], z[1]] if torch.rand(()).item() < cfg.mixing else z[0]

    def save(step):
        st = {"format": "glean-train", "stage": "bank", "config": asdict(cfg), "generator_config": asdict(gcfg),
              "step": step, "g": G.state_dict(), "d": D.state_dict(), "g_ema": G_ema.state_dict(),
              "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": rng_states(env), "world": env.world,
              "elapsed": log.elapsed(), "data": data.fingerprint}
        if env.main:
            save_checkpoint(run, step, st, cfg.keep)

    step = start
    try:
        batches = loader(data, cfg, env, start)
        log = Logger(run, cfg, env, start, elapsed)
        for step in range(start + 1, cfg.iters + 1):
            b = next(batches)
            report_skipped(b, seen)
            y = b["hr"].to(env.device, non_blocking=True)
            B = y.shape[0]
            # -- discriminator: logistic loss (Eq. 9) --------------------------------------------------------
            G.requires_grad_(False), D.requires_grad_(True)
            with torch.no_grad(), autocast():
                fake = G(styles(B))
            with autocast():
                l_d = discriminator_loss(D_train(y).float(), D_train(fake).float())
            (scaler.scale(l_d) if scaler else l_d).backward()
            (scaler.step(opt_d) if scaler else opt_d.step())
            opt_d.zero_grad(set_to_none=True)
            losses = {"loss/d": l_d}
            # -- lazy R1 regularisation: every reg_every steps, scaled up by reg_every -------------------------
            if step % cfg.reg_every == 0:
                y_r = y.detach().requires_grad_(True)
                logits = D_train(y_r).float()
                r1 = r1_penalty(logits, y_r)
                # + 0 * logits: the output layer's bias does not affect the penalty, but every parameter must be
                # in the graph for DistributedDataParallel
                (cfg.r1_gamma / 2 * r1 * cfg.reg_every + 0 * logits.mean()).backward()
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                losses["loss/r1"] = r1
            # -- generator: non-saturating loss, through the (fixed) plain discriminator ------------------------
            G.requires_grad_(True), D.requires_grad_(False)
            with autocast():
                l_g = generator_adv_loss(D(G_train(styles(B))).float())
            (scaler.scale(l_g) if scaler else l_g).backward()
            (scaler.step(opt_g) if scaler else opt_g.step())
            opt_g.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            losses["loss/g"] = l_g
            losses = {k: float(v.detach()) for k, v in losses.items()}
            check_finite(losses, env, run, step, lambda y=y: {"real": y.cpu(), "g": G.state_dict(),
                                                              "d": D.state_dict()})
            with torch.no_grad():                                              # G_ema <- beta G_ema + (1 - beta) G
                for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                    p_ema.lerp_(p, 1 - beta)
                for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                    b_ema.copy_(b)
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:
                log.scalars(step, env.mean(losses))
            if cfg.val_every and env.main and (step % cfg.val_every == 0 or step == cfg.iters):
                with torch.no_grad():
                    img = G_ema(z_fixed, noise="const")
                log.images(step, "samples", torchvision.utils.make_grid(img.clamp(-1, 1), nrow=4, value_range=(-1, 1)))
            if checkpoint_or_stop(step, cfg, env, stop, save):
                break
    finally:
        close_loader(batches)
        stop.close()
        if log is not None:
            log.close()
    same_everywhere(env, G, D, G_ema)
    if env.main:
        if step == cfg.iters:                       # the bank, and the discriminator GLEAN training starts from
            weight_formats.save_generator(G_ema, run / "bank.safetensors", discriminator=D)
            print(f"finished at step {step}; latent bank (EMA generator, with its discriminator) in "
                  f"{run / 'bank.safetensors'}")
        else:
            print(f"stopped at step {step}; checkpoints in {run / 'checkpoints'}")


# ----------------------------------------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is one line (argparse prints the usage first)."""
        self.exit(2, f"error: {message} (python train.py --help lists the options)\n")


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"channel_base\": 128}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The options, each with its help and default. Unset options are absent from the parsed namespace
    (argparse.SUPPRESS), so that the caller knows what was given: presets and a resumed run's saved settings fill
    in the rest."""
    d = TrainConfig()
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                        argument_default=argparse.SUPPRESS)
    g = ap.add_argument_group("what to train")
    g.add_argument("--stage", choices=["glean", "bank"],
                   help="glean: train GLEAN (Appendix A); bank: pretrain a StyleGAN2 latent bank (default: glean)")
    g.add_argument("--data", help="a preset (ffhq, cat: with --scale) or a folder of HR images (no default: "
                                  "required, except with --resume, which takes the run's; there it points at a "
                                  "moved dataset)")
    g.add_argument("--data-root", help="folder holding the preset datasets (default: $GLEAN_DATA, else ./data)")
    g.add_argument("--lr-dir", help="folder of pre-made LR images with the HR images' file names (default: LR made "
                                    "on the fly with MATLAB bicubic)")
    g.add_argument("--val-data", help="folder of held-out HR images for validation (default: the preset's, else none)")
    g.add_argument("--scale", type=int, help="out_size / in_size: 4, 8, 16, 32 or 64 (no default: required for "
                                             "GLEAN)")
    g.add_argument("--out-size", type=int, help="HR size = the bank's resolution (default: the preset's; required "
                                                "for a folder)")
    g.add_argument("--model", type=json_object, metavar="JSON",
                   help='GLEANConfig (stage glean) or GeneratorConfig (stage bank) overrides, e.g. '
                        '\'{"channel_base": 128, "decoder_bank_up_to": 0}\' (default: {})')
    g.add_argument("--fig7", type=int, metavar="RES",
                   help="Section 5's Fig. 7 ablation as the paper ran it: no decoder (the bank's RGB output is the "
                        "result), encoder features fused into the bank up to RES px, 0 = latent vectors only "
                        "(default: off, the full GLEAN)")
    g.add_argument("--bank", help="latent bank: registered name or file (official, ours, rosinality .pt, "
                                  "stylegan2-ada .pkl) (default: the preset's)")
    g.add_argument("--disc", help='discriminator to start from: a file, or "none" for a random init (default: from '
                                  "--init's file, else the bank file, when they have one)")
    g.add_argument("--init", help="fine-tune: start from a trained GLEAN (file or registered name) with its config "
                                  "and bank; bank stage: from a StyleGAN2 generator with the same widths and the same "
                                  "or a smaller out_size (its layers copied, finer ones new) (default: none)")
    g.add_argument("--crop", type=int, nargs=3, metavar=("LEFT", "TOP", "SIZE"),
                   help="square box of the training images to use (default: the centre square)")
    g.add_argument("--crop-jitter", type=float,
                   help="random shift (fraction of the box) and scale (1 +- it) of the box per image (default: 0)")
    g.add_argument("--degrade", nargs="?", const="strong", choices=sorted(DEGRADE),
                   help="real-world degradations (blur, noise, JPEG) of the LR inputs: strong (the bare flag; the "
                        "ffhq 8x preset) or mild (each step on half of the images, narrower ranges; DEGRADE) "
                        "(default: none)")
    g.add_argument("--lr-float", action="store_true",
                   help="keep LR images made on the fly as floats (default: clipped and rounded to 8 bits, as real "
                        "files and the official pre-made LR PNGs are)")
    g = ap.add_argument_group("optimisation (Appendix A; presets follow the official configs)")
    g.add_argument("--iters", type=int, help=f"optimizer steps (default: {d.iters})")
    g.add_argument("--batch", type=int, help="global batch per optimizer step, split over all processes and --accum "
                                             "micro-batches (default: the preset's, 8 for faces, 16 for cats; else 8; "
                                             "bank stage 16)")
    g.add_argument("--accum", type=int, help=f"micro-batches per optimizer step (default: {d.accum})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate of both networks (default: {d.lr}; bank stage 2e-3)")
    g.add_argument("--min-lr", type=float, help=f"end of the cosine annealing, eta_min (default: {d.min_lr})")
    g.add_argument("--lr-period", type=int, help="cosine half-period T_max in steps, 0 = --iters, as in the released "
                                                 "models' configs; mmagic 1.x's base config: 600000 (default: 0)")
    g.add_argument("--betas", type=float, nargs=2, help=f"Adam betas (default: {' '.join(map(str, d.betas))}; "
                                                        f"bank stage 0 0.99)")
    g.add_argument("--pixel-weight", type=float, help=f"weight of L_mse, Eq. (5) (default: {d.pixel_weight})")
    g.add_argument("--percep-weight", type=float, help=f"alpha_percep, Eq. (8); 0 drops the VGG term "
                                                       f"(default: {d.percep_weight})")
    g.add_argument("--percep-norm-img", action=argparse.BooleanOptionalAction,
                   help="map images to [0, 1] before VGG's ImageNet normalisation (official norm_img) (default: "
                        "off as the official 8x/16x configs; ffhq 8x preset: on as the in128 config)")
    g.add_argument("--gan-weight", type=float, help=f"alpha_gen, Eq. (8); 0 drops the discriminator "
                                                    f"(default: {d.gan_weight})")
    g.add_argument("--vgg-weights", help="torchvision VGG16 ImageNet weights file (default: torchvision's cache or "
                                         "download)")
    g.add_argument("--r1-gamma", type=float, help=f"bank stage: R1 weight (default: {d.r1_gamma})")
    g.add_argument("--reg-every", type=int, help=f"bank stage: lazy regularisation interval (default: {d.reg_every})")
    g.add_argument("--ema-kimg", type=float, help=f"bank stage: generator EMA half-life in thousands of images "
                                                  f"(default: {d.ema_kimg})")
    g.add_argument("--mixing", type=float, help=f"bank stage: style-mixing probability (default: {d.mixing})")
    g.add_argument("--seed", type=int, help=f"initial weights, data order and augmentation (default: {d.seed})")
    g = ap.add_argument_group("hardware")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision; fp16 on CUDA only "
                                                                   "(default: none)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (default: off)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--workers", type=int, help=f"DataLoader workers per process (default: {d.workers})")
    g = ap.add_argument_group("run directory, logs and checkpoints")
    g.add_argument("--out", help=f"run directory (default: {d.out})")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest readable checkpoint, with its saved settings; "
                        f"only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OVERRIDES))} may change "
                        f"(default: off)")
    g.add_argument("--ckpt-every", type=int, help=f"steps between checkpoints (default: {d.ckpt_every})")
    g.add_argument("--keep", type=int, help=f"checkpoints kept (default: {d.keep})")
    g.add_argument("--log-every", type=int, help=f"steps between logged losses and, without a terminal, progress "
                                                 f"lines (default: {d.log_every})")
    g.add_argument("--val-every", type=int, help=f"steps between validations, 0 = never (default: {d.val_every})")
    g.add_argument("--val-count", type=int, help=f"validation images (default: {d.val_count})")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard logs (default: written to OUT/tb)")
    return ap


STAGE_DEFAULTS = {"bank": {"lr": 2e-3, "betas": (0.0, 0.99), "batch": 16}}   # StyleGAN2's (rosinality's defaults)


def parse_args(argv=None) -> tuple:
    """(TrainConfig, the fields given on the command line)."""
    given = vars(build_parser().parse_args(argv))
    given = {k: tuple(v) if k in ("betas", "crop") else v for k, v in given.items()}
    fig7 = given.pop("fig7", None)
    if fig7 is not None:                         # Fig. 7 as in the paper: "the generator directly produces the output"
        model = given.get("model", {})
        clash = {k: model[k] for k in ("use_decoder", "fuse_encoder_up_to") if k in model}
        if clash:
            raise UserError(f"--fig7 sets use_decoder and fuse_encoder_up_to; drop {clash} from --model")
        given["model"] = {**model, "fuse_encoder_up_to": fig7, "use_decoder": False}
    defaults = {**asdict(TrainConfig()), **STAGE_DEFAULTS.get(given.get("stage", "glean"), {})}
    return TrainConfig(**{**defaults, **given}), given


def check_values(cfg: TrainConfig, world: int) -> None:
    """Every value in range before anything is built or read: a UserError naming the flag otherwise."""
    def need(ok: bool, name: str, rule: str):
        if not ok:
            value = getattr(cfg, name)
            value = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise UserError(f"--{name.replace('_', '-')} {rule}, got {value}")

    for name, low in (("iters", 1), ("batch", 1), ("accum", 1), ("ckpt_every", 1), ("keep", 1), ("log_every", 1),
                      ("val_count", 1), ("reg_every", 1), ("workers", 0), ("val_every", 0), ("seed", 0),
                      ("lr_period", 0)):
        need(getattr(cfg, name) >= low, name, f"must be at least {low}")
    for name in ("lr", "min_lr", "pixel_weight", "percep_weight", "gan_weight", "r1_gamma"):
        need(math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "must be a number >= 0")
    need(cfg.ema_kimg > 0, "ema_kimg", "must be > 0")
    need(0 <= cfg.mixing <= 1, "mixing", "is a probability, from 0 to 1")
    need(all(0 <= b < 1 for b in cfg.betas), "betas", "must lie in [0, 1)")
    need(cfg.lr_period == 0 or cfg.lr_period >= cfg.iters, "lr_period",
         f"must be 0 (= --iters) or at least --iters ({cfg.iters}): past it the cosine would climb again")
    if cfg.stage == "bank":
        need(cfg.accum == 1, "accum", "is for the GLEAN stage; the bank stage takes whole batches (1)")
    shares = world * cfg.accum
    need(cfg.batch % shares == 0, "batch", f"is the global batch: it must split evenly over {world} process(es) x "
                                           f"--accum {cfg.accum} micro-batches (a multiple of {shares})")
    need(cfg.out_size in (16, 32, 64, 128, 256, 512, 1024), "out_size", "must be a power of two from 16 to 1024")
    if cfg.stage == "glean":
        need(cfg.scale in (4, 8, 16, 32, 64), "scale", "must be 4, 8, 16, 32 or 64 (out_size / in_size)")
        need(cfg.out_size // cfg.scale >= 8, "scale", f"leaves inputs of {cfg.out_size // cfg.scale} px at "
                                                      f"--out-size {cfg.out_size}; GLEAN needs at least 8")
        try:
            glean.GLEANConfig.from_dict({"out_size": cfg.out_size, "in_size": cfg.out_size // cfg.scale, **cfg.model})
        except (ValueError, TypeError) as e:
            raise UserError(f"--model: {e}") from e
    else:
        try:
            stylegan2.GeneratorConfig(**{"out_size": cfg.out_size, **cfg.model})
        except (ValueError, TypeError) as e:
            raise UserError(f"--model: {e}") from e


# what a resumed run may change (with a notice): where things are, how it is logged and run, and the schedule
# (the learning rate follows the new cosine from the step reached); everything else comes from its checkpoint
RESUME_OVERRIDES = {"iters", "lr", "min_lr", "lr_period", "data", "data_root", "lr_dir", "val_data", "val_count",
                    "vgg_weights", "accum", "workers", "device", "amp", "compile", "log_every", "ckpt_every",
                    "val_every", "keep", "tensorboard"}


def resume_config(state: dict, given: dict, out: str, world: int) -> tuple:
    """The config to continue a run with: the checkpoint's, with the allowed flags in `given` applied.
    Returns (config, notices); a flag that may not change is a UserError."""
    raw = dict(state["config"])
    world_before = state.get("world", len(state["rng"]))
    if "world" not in state:   # written when --batch was per process and micro-batch, and VGG saw [0, 1] images
        raw["batch"] = raw["batch"] * world_before * raw.get("accum", 1)
        raw.setdefault("percep_norm_img", True)
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in raw.items() if k in known})
    cfg.betas, cfg.crop, cfg.resume, cfg.out = tuple(cfg.betas), tuple(cfg.crop), True, out
    notes, refused = [], []
    for name, value in given.items():
        if name in ("resume", "out"):
            continue
        if name == "data" and (value, cfg.scale) in PRESETS:
            value = str(preset_folder(value, cfg.scale, given.get("data_root", cfg.data_root))[2])
        old = getattr(cfg, name)
        if value == old:
            continue
        if name not in RESUME_OVERRIDES:
            refused.append(f"--{name.replace('_', '-')}")
            continue
        setattr(cfg, name, value)
        notes.append(f"--{name.replace('_', '-')} {value} (was {old})")
    if refused:
        raise UserError(f"--resume continues {out} with the settings it was started with: {', '.join(refused)} cannot "
                        f"change (only the data location, the schedule, logging and hardware can); drop "
                        f"{'it' if len(refused) == 1 else 'them'}, or start a new run with another --out")
    if cfg.iters <= state["step"]:
        raise UserError(f"--iters {cfg.iters}: the run is already at step {state['step']}; pass a larger --iters")
    for name in ("data", "lr_dir", "val_data"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_dir():
            raise UserError(f"the run's {name.replace('_', ' ')} folder {getattr(cfg, name)} is missing: if it moved, "
                            f"pass --{name.replace('_', '-')} NEW_FOLDER")
    if world != world_before:
        notes.append(f"{world} process(es) instead of {world_before}: the same global batch ({cfg.batch}) and data "
                     f"order, but the processes' random streams differ from an uninterrupted run's")
    return cfg, notes


def clean_run_dir(run: Path) -> None:
    """Remove the partial files that writes killed mid-way left in the run directory (checkpoints can be GBs)."""
    removed = remove_stale_temp(run / "checkpoints") + remove_stale_temp(run)
    if removed:
        print(f"removed {len(removed)} partial file(s) left by an interrupted write: "
              f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}", file=sys.stderr)


def one_line(e: BaseException) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return re.sub(r"^[\w.]*(UserError|CheckpointError): ", "", lines[-1])
    return " ".join(lines)


def main(argv=None) -> int:
    try:
        cfg, given = parse_args(argv)
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        state = None
        if cfg.resume:
            state, path = latest_checkpoint(Path(cfg.out), report=rank == 0)
            if state is None:
                raise UserError(f"--resume: no readable checkpoint in {cfg.out}/checkpoints")
            cfg, notes = resume_config(state, given, cfg.out, world)
            if rank == 0:
                print(f"resuming from {path} (step {state['step']})" + "".join(f"\n  resume: {n}" for n in notes))
        else:
            cfg = resolve(cfg, given)
            if checkpoints(Path(cfg.out)):
                raise UserError(f"{cfg.out} already has checkpoints: pass --resume to continue, or another --out")
        check_values(cfg, world)
        if rank == 0:
            clean_run_dir(Path(cfg.out))
        env = setup(cfg)
        (train_bank if cfg.stage == "bank" else train_glean)(cfg, env, state)
        return 0
    except (UserError, CheckpointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:                      # every process stops; the message covers all their files
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
