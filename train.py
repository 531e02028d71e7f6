"""Train GLEAN (Appendix A, Eq. 5-9), or pretrain the StyleGAN2 latent bank it needs; one process or many (torchrun).

    python train.py --data ffhq --scale 16                 # preset: FFHQ 64 -> 1024 on the official FFHQ bank
    python train.py --data DIR --out-size 256 --scale 8 --bank runs/bank/bank.safetensors
    torchrun --nproc_per_node=4 train.py --data ffhq --scale 16
    python train.py --stage bank --data DIR --out-size 64   # bring your own latent bank (StyleGAN2)
    python train.py ... --out runs/x --resume                # continue exactly where runs/x stopped

Symbols: x the LR input, y the HR ground truth, y_hat = G(x) the GLEAN output, D the StyleGAN2 discriminator,
D(.) = sigmoid(logit). The bank's weights stay fixed throughout (Sec. 3.4).

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
import zoo
from evaluate import LPIPS, psnr
from glean_io import CheckpointError, load_file, save_file
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
    init: str = ""                   # GLEAN: start from a trained GLEAN (registered name or file; its config + bank)
    crop: tuple = ()                 # (left, top, size): square box of the training images (default: centre square)
    crop_jitter: float = 0.0         # random shift (fraction of size) and scale (1 +- it) of that box per image
    disc: str = ""                   # discriminator init: "" = from the bank file if it has one, "none", or a file
    degrade: bool = False            # real-world degradations (blur, noise, JPEG) on top of bicubic LR
    iters: int = 300_000             # optimizer steps (Appendix A: 300k)
    batch: int = 8                   # per-process batch (Appendix A: 8 for faces, 16 otherwise, over all GPUs)
    accum: int = 1                   # micro-batches per optimizer step
    lr: float = 1e-4                 # Adam learning rate (Appendix A); bank stage: 2e-3
    betas: tuple = (0.9, 0.99)       # Adam betas; bank stage: (0, 0.99)
    min_lr: float = 1e-7             # end of the cosine annealing over the whole run
    pixel_weight: float = 1.0        # MSE, Eq. (5)
    percep_weight: float = 1e-2      # alpha_percep, Eq. (8)
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


# Official categories and scales: sizes, latent bank and batch size of the released models (Appendix A).
PRESETS = {
    ("ffhq", 16): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, hr="ffhq/images",
                       lr="ffhq/BIx16_down", val="CelebA-HQ/GT", url="https://github.com/NVlabs/ffhq-dataset"),
    ("ffhq", 8): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, hr="ffhq/images", degrade=True,
                      val="CelebA-HQ/GT", url="https://github.com/NVlabs/ffhq-dataset"),
    ("cat", 8): dict(out_size=256, bank="stylegan2_cat_256", batch=16, hr="cat_train/GT", lr="cat_train/BIx8_down",
                     val="cat_test/GT", url="https://www.yf.io/p/lsun (LSUN cat)"),
    ("cat", 16): dict(out_size=256, bank="stylegan2_cat_256", batch=16, hr="cat_train/GT",
                      lr="cat_train/BIx16_down", val="cat_test/GT", url="https://www.yf.io/p/lsun (LSUN cat)"),
}


class UserError(Exception):
    """A problem the user can fix (missing data or weights, bad flags): reported in one line, exit code 2."""


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in a preset and check that data and weights exist, with a one-line hint where they do not."""
    names = {name for name, _ in PRESETS}
    if cfg.data in names:
        if (cfg.data, cfg.scale) not in PRESETS:
            scales = sorted(s for n, s in PRESETS if n == cfg.data)
            raise UserError(f"preset '{cfg.data}' has scales {scales}; pass --scale with one of them")
        p = PRESETS[(cfg.data, cfg.scale)]
        root = Path(cfg.data_root or os.environ.get("GLEAN_DATA", "data"))
        hr = root / p["hr"]
        if not hr.is_dir():
            raise UserError(f"dataset '{cfg.data}' not found: expected HR images in {hr} (download from {p['url']}), "
                            f"or point --data-root / GLEAN_DATA at the folder that holds '{p['hr']}'")
        cfg.data = str(hr)
        cfg.out_size = cfg.out_size or p["out_size"]
        cfg.bank = cfg.bank or p["bank"]
        cfg.degrade = cfg.degrade or p.get("degrade", False)
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
    if cfg.init:
        if cfg.stage != "glean":
            raise UserError("--init starts GLEAN training from a trained GLEAN; the bank stage has no --init")
        if cfg.model or cfg.bank:
            raise UserError("--init takes the model config and the latent bank from its file; drop --model / --bank")
        mcfg = load_init(cfg.init).cfg
        scale = mcfg.out_size // mcfg.in_size
        if (cfg.out_size and cfg.out_size != mcfg.out_size) or (cfg.scale and cfg.scale != scale):
            raise UserError(f"--init {cfg.init} is a {scale}x model to {mcfg.out_size} px; "
                            f"drop --scale / --out-size or pass {scale} / {mcfg.out_size}")
        cfg.out_size, cfg.scale = mcfg.out_size, scale
        cfg.model = {k: v for k, v in asdict(mcfg).items() if k not in ("in_size", "out_size")}
    if not cfg.out_size:
        raise UserError("pass --out-size (the HR / bank resolution) for a custom data folder")
    if cfg.stage == "glean" and not cfg.scale:
        raise UserError("pass --scale (out_size / in_size: 4, 8, 16, 32 or 64)")
    return cfg


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


def degrade(hr: torch.Tensor, in_size: int, g: torch.Generator) -> torch.Tensor:
    """Real-world degradation of an HR image [3, H, W] in [0, 1] to an LR one [3, in_size, in_size]: random
    (an)isotropic Gaussian blur, MATLAB bicubic downscaling, Gaussian noise (sigma <= 25/255), JPEG (quality
    30-95), as for the official 128 -> 1024 face model (which samples wider ranges)."""
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()  # noqa: E731
    scale = hr.shape[-1] / in_size
    sx, sy, theta = u(0.2, 1.5) * scale / 2, u(0.2, 1.5) * scale / 2, u(-math.pi, math.pi)
    k = int(2 * math.ceil(3 * max(sx, sy)) + 1)
    ax = torch.arange(k, dtype=torch.float32) - k // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    xr, yr = c * xx + s * yy, -s * xx + c * yy
    kernel = torch.exp(-0.5 * ((xr / sx) ** 2 + (yr / sy) ** 2))
    kernel = (kernel / kernel.sum())[None, None].expand(3, 1, k, k)
    blurred = F.conv2d(F.pad(hr[None], [k // 2] * 4, mode="reflect"), kernel, groups=3)[0]
    lr = imresize(blurred, size=in_size)
    lr = lr + torch.randn(lr.shape, generator=g) * u(0, 25) / 255
    im = Image.fromarray((lr.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(u(30, 95)))
    with Image.open(buf) as jpg:
        t = torch.frombuffer(bytearray(jpg.convert("RGB").tobytes()), dtype=torch.uint8)
    return t.view(in_size, in_size, 3).permute(2, 0, 1).float() / 255


class SRDataset(torch.utils.data.Dataset):
    """HR images from a folder (any size and format Pillow reads): centre-cropped square, resized to out_size; the
    LR made on the fly with MATLAB bicubic (`images.imresize`), optionally degraded, or read from a paired folder.

    Items are addressed by (index, epoch): their random flip and degradation come from a generator seeded by
    (seed, epoch, index), so a run is reproducible whatever the number of workers and resumes exactly. A file that
    cannot be read is reported by name once and replaced by the next readable one.
    """

    def __init__(self, folder, out_size: int, in_size: int | None = None, lr_dir: str = "", flip: bool = True,
                 degrade: bool = False, seed: int = 0, limit: int = 0, crop: tuple = (), crop_jitter: float = 0.0):
        self.files = list_images(folder)[:limit or None]
        self.out_size, self.in_size, self.flip, self.degrade, self.seed = out_size, in_size, flip, degrade, seed
        self.crop, self.crop_jitter = tuple(crop), crop_jitter
        if lr_dir and (crop or crop_jitter):
            raise UserError("--crop / --crop-jitter cannot be used with --lr-dir (the paired LR images are fixed)")
        if crop:                                    # here, in the main process: a worker's error is a traceback
            for path in self.files:
                size = image_size(path)
                if size is not None and not box_fits(self.crop, *size):
                    raise UserError(f"--crop {' '.join(map(str, crop))} (left top size) does not fit in {path.name} "
                                    f"({size[1]}x{size[0]}); pass a box inside every training image")
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
                lr = degrade(hr, self.in_size, g)
            else:
                lr = imresize(hr, size=self.in_size)
            item["lr"] = lr
        if flip:
            item = {k: v.flip(-1) for k, v in item.items()}
        return {k: v * 2 - 1 for k, v in item.items()}                   # [-1, 1], as the network expects

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            if self.files[k] in self.bad:
                continue
            try:
                return self.load(k, epoch)
            except (InputError, OSError, ValueError, RuntimeError) as e:
                self.bad.add(self.files[k])
                print(f"warning: skipping unreadable image {self.files[k]} ({e})", file=sys.stderr, flush=True)
        raise UserError(f"no readable image among {len(self.files)} files")


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
    """L_percep = 1/N ||f(y_hat) - f(y)||^2, f = VGG16 up to conv4_3 (before its ReLU), ImageNet weights, frozen."""

    def __init__(self, weights: str = ""):
        super().__init__()
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

    def forward(self, y_hat, y):
        norm = lambda t: ((t + 1) / 2 - self.mean) / self.std  # noqa: E731   [-1, 1] -> ImageNet statistics
        return F.mse_loss(self.f(norm(y_hat)), self.f(norm(y)))              # Eq. (6)


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


def latest_checkpoint(run: Path) -> tuple:
    """The newest checkpoint that loads completely, newest first; a truncated or corrupt one is reported and
    skipped. Returns (state, path) or (None, None)."""
    for path in reversed(checkpoints(run)):
        try:
            state = load_file(path)
        except CheckpointError as e:
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
    state = states[env.rank]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)


class Stopper:
    """SIGTERM / SIGINT ask the loop to stop after the current step (then a checkpoint is written); a second
    SIGINT interrupts at once. The previous handlers come back with close()."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
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
    """metrics.jsonl, TensorBoard scalars and images, and a tqdm progress bar (main process only)."""

    def __init__(self, run: Path, cfg: TrainConfig, env: Env, start: int):
        self.env, self.file, self.tb, self.bar, self.t0 = env, None, None, None, time.perf_counter()
        if not env.main:
            return
        run.mkdir(parents=True, exist_ok=True)
        self.file = open(run / "metrics.jsonl", "a")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("TensorBoard is not installed: pip install tensorboard, or pass --no-tensorboard") \
                    from e
            self.tb = SummaryWriter(str(run / "tb"))
        from tqdm import tqdm
        self.bar = tqdm(total=cfg.iters, initial=start, unit="it", dynamic_ncols=True, disable=None)

    def scalars(self, step: int, values: dict, show: bool = True):
        if not self.env.main:
            return
        self.file.write(json.dumps({"step": step, **values, "time": round(time.perf_counter() - self.t0, 3)}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.add_scalar("time/seconds", time.perf_counter() - self.t0, step)
        if show and self.bar is not None:
            self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")})

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


def loader(dataset, cfg: TrainConfig, env: Env, start_micro: int):
    sampler = BatchStream(len(dataset), cfg.batch, env.rank, env.world, cfg.seed, start_micro)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone: resumes stay exact
        persistent_workers=cfg.workers > 0))


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
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=cfg.min_lr)


def stretch_schedule(sched, opt, cfg: TrainConfig) -> None:
    """After resuming with a new --iters: the cosine now anneals over the new length, from the point the run has
    reached (the learning rate is set to that curve's value, so the scheduler's recursive update stays on it)."""
    if sched.T_max == cfg.iters:
        return
    sched.T_max, t = cfg.iters, sched.last_epoch
    for g, base in zip(opt.param_groups, sched.base_lrs):
        g["lr"] = cfg.min_lr + (base - cfg.min_lr) * (1 + math.cos(math.pi * t / cfg.iters)) / 2
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def check_finite(losses: dict, env: Env, run: Path, step: int, debug: dict) -> None:
    """Stop on a NaN/inf loss (on any process), after saving what is needed to reproduce it."""
    ok = all(math.isfinite(float(v)) for v in losses.values())
    if env.all_true(ok):
        return
    path = run / f"nonfinite_step_{step:08d}_rank{env.rank}.pt"
    if not ok:
        save_file({"step": step, "losses": {k: float(v) for k, v in losses.items()}, **debug}, path)
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
    raise RuntimeError(f"non-finite loss at step {step} ({values}); "
                       f"the models and the batch are saved in {run}/nonfinite_step_{step:08d}_rank*.pt. "
                       f"Resume from the last checkpoint with a lower --lr, or check the data")


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
    """--init: the trained GLEAN to start from (this project's format, or a registered name). Cached: `resolve`
    reads its config, `train_glean` its weights (and then clears the cache)."""
    try:
        return glean_fast.GLEANFast.load(zoo.weights_file(name))
    except CheckpointError as e:
        raise UserError(f"--init {name}: {e}") from e


def build_glean(cfg: TrainConfig) -> glean.GLEAN:
    """The network to train: glean_fast.GLEANFast, the reference network (glean.GLEAN) computed faster."""
    mcfg = glean.GLEANConfig.from_dict({"out_size": cfg.out_size, "in_size": cfg.out_size // cfg.scale, **cfg.model})
    return glean_fast.GLEANFast(mcfg)


def load_discriminator(D: stylegan2.Discriminator, spec: str, bank: str) -> None:
    """--disc: a file with official `discriminator.*` keys, a bank-training checkpoint ('d'), or rosinality's
    ('d'); "" takes it from the bank file when that has one; "none" keeps the random init."""
    if spec == "none":
        return
    source = spec or bank
    if not source:
        return
    ckpt = load_file(zoo.weights_file(source))
    sd = ckpt.get("state_dict", ckpt)
    if any(k.startswith("discriminator.") for k in sd):
        stylegan2.load_official(D, sd, "discriminator.")
    elif isinstance(ckpt.get("d"), dict):                                   # ours (bank stage) or rosinality's
        from glean_io import load_state_strict
        load_state_strict(D, ckpt["d"], {k: k for k in D.state_dict()}, str(source))
    elif spec:
        raise UserError(f"{spec} has no discriminator weights ('discriminator.*' keys or 'd')")


def train_glean(cfg: TrainConfig, env: Env, state: dict | None) -> None:
    run = Path(cfg.out)
    bank_file = zoo.weights_file(cfg.bank) if cfg.bank and state is None else None   # fail before building
    torch.manual_seed(cfg.seed)                                             # the same initial weights everywhere
    G = build_glean(cfg)
    if cfg.init and state is None:                  # fine-tune: every weight (bank included) from a trained GLEAN
        G.load_state_dict(load_init(cfg.init).state_dict())
        load_init.cache_clear()
    G = G.to(env.device)
    mcfg = G.cfg
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(
        in_size=mcfg.out_size, channel_multiplier=mcfg.channel_multiplier, channel_base=mcfg.channel_base))
    D = D.to(env.device)
    if state is None and not cfg.init:
        if G.bank is not None:
            if not cfg.bank:
                raise UserError("GLEAN needs a pretrained StyleGAN2 latent bank at out_size: pass --bank "
                                "(a registered name or a file; train one with --stage bank)")
            G.load_bank(bank_file)
    if state is None and cfg.gan_weight > 0:
        load_discriminator(D, cfg.disc, cfg.bank)
    percep = PerceptualLoss(cfg.vgg_weights).to(env.device) if cfg.percep_weight > 0 else None
    opt_g = torch.optim.Adam(G.trainable_parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=cfg.betas)
    sched_g, sched_d = cosine(opt_g, cfg), cosine(opt_d, cfg)
    start = 0
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is not None:
        G.load_state_dict(state["model"])
        D.load_state_dict(state["discriminator"])
        for obj, key in ((opt_g, "opt_g"), (opt_d, "opt_d"), (sched_g, "sched_g"), (sched_d, "sched_d")):
            obj.load_state_dict(state[key])
        stretch_schedule(sched_g, opt_g, cfg), stretch_schedule(sched_d, opt_d, cfg)   # --resume --iters N
        start = state["step"]
        set_rng_states(state["rng"], env)
    bank_before = {k: v.detach().clone() for k, v in G.bank.state_dict().items()} if G.bank is not None else {}
    G_train, D_train = wrap(G, env), wrap(D, env)
    G_fwd, D_fwd = (torch.compile(G_train), torch.compile(D_train)) if cfg.compile else (G_train, D_train)
    autocast, scaler = precision(cfg, env)
    data = SRDataset(cfg.data, mcfg.out_size, mcfg.in_size, cfg.lr_dir, degrade=cfg.degrade, seed=cfg.seed,
                     crop=cfg.crop, crop_jitter=cfg.crop_jitter)
    batches = loader(data, cfg, env, start * cfg.accum)
    val = SRDataset(cfg.val_data, mcfg.out_size, mcfg.in_size, flip=False, limit=cfg.val_count) \
        if cfg.val_data and env.main else None
    lpips = None
    if val is not None:
        lpips, why = LPIPS.load()
        if lpips is None:
            print(f"validation: PSNR only; {why}", file=sys.stderr)
        else:
            lpips = lpips.to(env.device)
    log, stop = Logger(run, cfg, env, start), Stopper()

    def save(step):
        st = {"format": "glean-train", "stage": "glean", "config": asdict(cfg), "model_config": asdict(mcfg),
              "step": step, "model": G.state_dict(), "discriminator": D.state_dict(), "opt_g": opt_g.state_dict(),
              "opt_d": opt_d.state_dict(), "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
              "rng": rng_states(env)}
        if env.main:
            save_checkpoint(run, step, st, cfg.keep)

    G.train(), D.train()
    step = start
    try:
        for step in range(start + 1, cfg.iters + 1):
            # -- generator: Eq. (8), the discriminator fixed --------------------------------------------------
            D.requires_grad_(False)
            fakes, reals, totals = [], [], {"loss/mse": 0.0, "loss/percep": 0.0, "loss/gen": 0.0, "loss/g": 0.0}
            for m in range(cfg.accum):
                b = next(batches)
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
            check_finite(totals, env, run, step, {"lr": x.cpu(), "hr": y.cpu(), "model": G.state_dict()})
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
                check_finite({"loss/d": d_total}, env, run, step, {"model": G.state_dict(),
                                                                  "discriminator": D.state_dict()})
                (scaler.step(opt_d) if scaler else opt_d.step())
                opt_d.zero_grad(set_to_none=True)
            if scaler:
                scaler.update()
            sched_g.step()
            if cfg.gan_weight > 0:
                sched_d.step()
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:
                log.scalars(step, {**totals, "lr": sched_g.get_last_lr()[0]})
            if val is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iters):
                validate(G, val, env, log, step, lpips)
            if checkpoint_or_stop(step, cfg, env, stop, save):
                break
    finally:
        log.close(), stop.close()
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
        mbstd_group_size=min(4, cfg.batch))).to(env.device)
    G_ema = stylegan2.Generator(gcfg).to(env.device).eval().requires_grad_(False)
    G_ema.load_state_dict(G.state_dict())
    c = cfg.reg_every / (cfg.reg_every + 1)  # lazy regularisation: rescale D's optimiser (StyleGAN2, App. B)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr * c, betas=tuple(b ** c for b in cfg.betas))
    start = 0
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is not None:
        for obj, key in ((G, "g"), (D, "d"), (G_ema, "g_ema"), (opt_g, "opt_g"), (opt_d, "opt_d")):
            obj.load_state_dict(state[key])
        start = state["step"]
        set_rng_states(state["rng"], env)
    G_train, D_train = wrap(G, env), wrap(D, env)
    autocast, scaler = precision(cfg, env)
    data = SRDataset(cfg.data, cfg.out_size, seed=cfg.seed, crop=cfg.crop, crop_jitter=cfg.crop_jitter)
    batches = loader(data, cfg, env, start)
    log, stop = Logger(run, cfg, env, start), Stopper()
    beta = 0.5 ** (cfg.batch * env.world / (cfg.ema_kimg * 1000))           # EMA decay per step
    z_fixed = torch.randn(16, gcfg.style_channels, generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)

    def styles(B):
        z = torch.randn(2, B, gcfg.style_channels, device=env.device)
        return [z[0], z[1]] if torch.rand(()).item() < cfg.mixing else z[0]

    def save(step):
        st = {"format": "glean-train", "stage": "bank", "config": asdict(cfg), "generator_config": asdict(gcfg),
              "step": step, "g": G.state_dict(), "d": D.state_dict(), "g_ema": G_ema.state_dict(),
              "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": rng_states(env)}
        if env.main:
            save_checkpoint(run, step, st, cfg.keep)

    step = start
    try:
        for step in range(start + 1, cfg.iters + 1):
            y = next(batches)["hr"].to(env.device, non_blocking=True)
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
            check_finite(losses, env, run, step, {"real": y.cpu(), "g": G.state_dict(), "d": D.state_dict()})
            with torch.no_grad():                                              # G_ema <- beta G_ema + (1 - beta) G
                for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                    p_ema.lerp_(p, 1 - beta)
                for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                    b_ema.copy_(b)
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:
                log.scalars(step, losses)
            if cfg.val_every and env.main and (step % cfg.val_every == 0 or step == cfg.iters):
                with torch.no_grad():
                    img = G_ema(z_fixed, noise="const")
                log.images(step, "samples", torchvision.utils.make_grid(img.clamp(-1, 1), nrow=4, value_range=(-1, 1)))
            if checkpoint_or_stop(step, cfg, env, stop, save):
                break
    finally:
        log.close(), stop.close()
    same_everywhere(env, G, D, G_ema)
    if env.main:
        if step == cfg.iters:
            stylegan2.save_generator(G_ema, run / "bank.safetensors")
            print(f"finished at step {step}; latent bank (EMA generator) in {run / 'bank.safetensors'}; the "
                  f"discriminator for --disc is in the last checkpoint")
        else:
            print(f"stopped at step {step}; checkpoints in {run / 'checkpoints'}")


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> tuple:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["glean", "bank"], default=d.stage)
    ap.add_argument("--data", required=True, help="preset (ffhq, cat) or a folder of HR images")
    ap.add_argument("--data-root", default=d.data_root, help="folder with the preset datasets ($GLEAN_DATA)")
    ap.add_argument("--lr-dir", default=d.lr_dir, help="paired LR images (same file names)")
    ap.add_argument("--val-data", default=d.val_data, help="held-out HR images for validation")
    ap.add_argument("--scale", type=int, default=d.scale)
    ap.add_argument("--out-size", type=int, default=d.out_size)
    ap.add_argument("--model", type=json.loads, default={}, metavar="JSON",
                    help='GLEANConfig (stage glean) or GeneratorConfig (stage bank) overrides, e.g. '
                         '\'{"channel_base": 128, "decoder_bank_up_to": 0}\'')
    ap.add_argument("--bank", default=d.bank, help="latent bank: registered name or file (official, ours, "
                                                   "rosinality .pt, stylegan2-ada .pkl)")
    ap.add_argument("--disc", default=d.disc, help='discriminator init file, or "none"')
    ap.add_argument("--init", default=d.init, help="fine-tune: start from a trained GLEAN (file or registered name); "
                                                   "its config and bank are used")
    ap.add_argument("--crop", type=int, nargs=3, default=None, metavar=("LEFT", "TOP", "SIZE"),
                    help="square box of the training images to use (default: the centre square)")
    ap.add_argument("--crop-jitter", type=float, default=None,
                    help="random shift (fraction of the box) and scale (1 +- it) of the box per image")
    ap.add_argument("--degrade", action="store_true", help="real-world degradations (blur, noise, JPEG)")
    for name in ("iters", "batch", "accum", "workers", "seed", "ckpt_every", "keep", "log_every", "val_every",
                 "val_count", "reg_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "min_lr", "pixel_weight", "percep_weight", "gan_weight", "r1_gamma", "ema_kimg", "mixing"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    ap.add_argument("--betas", type=float, nargs=2, default=None)
    ap.add_argument("--vgg-weights", default=d.vgg_weights)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--out", default=d.out, help="run directory")
    ap.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    ap.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint in --out")
    a = vars(ap.parse_args(argv))
    explicit = {k for k, v in a.items() if v is not None and v != ap.get_default(k)}
    stage_defaults = {"lr": 2e-3, "betas": (0.0, 0.99), "batch": 16} if a["stage"] == "bank" else {}
    preset_batch = next((p["batch"] for (n, s), p in PRESETS.items() if n == a["data"] and s == a["scale"]), None)
    values = {}
    for f in fields(TrainConfig):
        v = a.get(f.name)
        if v is None:
            v = stage_defaults.get(f.name, preset_batch if f.name == "batch" and preset_batch else getattr(d, f.name))
        values[f.name] = tuple(v) if f.name in ("betas", "crop") else v
    return TrainConfig(**values), explicit


# what a resumed run may change: everything else comes from its checkpoint
RESUME_OVERRIDES = {"iters", "workers", "device", "log_every", "ckpt_every", "val_every", "keep", "tensorboard"}


def main(argv=None) -> int:
    cfg, explicit = parse_args(argv)
    try:
        env = setup(cfg)
        state = None
        if cfg.resume:
            state, path = latest_checkpoint(Path(cfg.out))
            if state is None:
                raise UserError(f"--resume: no readable checkpoint in {cfg.out}/checkpoints")
            saved = {**state["config"], "betas": tuple(state["config"]["betas"]),
                     "crop": tuple(state["config"].get("crop", ()))}
            given = {k: getattr(cfg, k) for k in explicit & RESUME_OVERRIDES}
            cfg = TrainConfig(**{**saved, **given, "resume": True, "out": cfg.out})
            if env.main:
                print(f"resuming from {path} (step {state['step']})")
        else:
            cfg = resolve(cfg)
            if checkpoints(Path(cfg.out)):
                raise UserError(f"{cfg.out} already has checkpoints: pass --resume to continue, or another --out")
        (train_bank if cfg.stage == "bank" else train_glean)(cfg, env, state)
        return 0
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
