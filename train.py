"""Train GLEAN (Appendix A, eq. (5)-(9)); `--stage bank` pretrains the StyleGAN2 latent bank it needs.

    python train.py --data ffhq --scale 16                 # preset: FFHQ 64 -> 1024 on the official FFHQ bank
    python train.py --data DIR --out-size 256 --scale 8 --bank runs/bank/bank.safetensors
    torchrun --nproc_per_node=4 train.py --data ffhq --scale 16     # the same run on 4 GPUs
    python train.py --stage bank --data DIR --out-size 64   # bring your own latent bank (StyleGAN2)
    python train.py --out runs/x --resume                    # continue exactly where runs/x stopped

This file is the recipe: the configuration and its presets, the losses of eq. (5)-(9), and the training loop, whose
every step is a GLEAN update (`glean_step`, eq. 8) and a discriminator update (`discriminator_step`, eq. 9). The
rest has rooms of its own: train_data.py (images in, LR images made, batch order), train_run.py (processes,
checkpoints, resume, signals, logs), train_bank.py (StyleGAN2 pretraining), train_cli.py (the flags). For the
same loop in one screenful, with nothing but the equations, read course/train_minimal.py.

Symbols: x the LR input, y the HR ground truth, y_hat = G(x) the GLEAN output, D the StyleGAN2 discriminator,
D(.) = sigmoid(logit). The bank's weights stay fixed throughout (Sec. 3.4).

--batch is the global batch of one optimizer step: it is split evenly over the processes and the --accum
micro-batches, so a command trains the same model on one GPU or several (the discriminator's minibatch-stddev
groups stay inside a micro-batch, and floating-point sums may round differently).

A run directory holds checkpoints (plain data with a checksum, written atomically; the newest intact one is resumed
from), metrics.jsonl, TensorBoard logs and, when a run finishes, the trained model (glean.safetensors, or
bank.safetensors for the bank stage: the EMA generator).
"""
import contextlib
import functools
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import glean
import glean_fast
import images
import stylegan2
import train_bank
import train_cli
import train_data
import train_run
import weight_formats
import zoo
from evaluate import LPIPS, psnr
from glean_io import CheckpointError, load_file, load_state_strict
from train_run import Env, Progress, UserError

# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    stage: str = "glean"             # "glean" (Appendix A) or "bank" (StyleGAN2 pretraining)
    data: str = ""                   # a preset dataset name (see PRESETS) or a folder of HR images
    more_data: tuple = ()            # further folders of HR images (--data DIR DIR ...; the ffhq 8x preset's)
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
    resume: bool = False             # continue from the newest intact checkpoint in `out`


STAGE_DEFAULTS = {"bank": {"lr": 2e-3, "betas": (0.0, 0.99), "batch": 16}}   # StyleGAN2's (rosinality's defaults)

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
# as the bank ('discriminator' weights). The in128 -> 1024 model trains on FFHQ and CelebA-HQ together (one
# folder, FFHQ_CelebAHQ/GT, there; here the two folders) and validates on 100 CelebA-HQ images; here the
# validation images are held out of training (train_data.scan's `exclude`).
# Where they differ:
# - schedule: (a) CosineRestart, periods [300000], min_lr 1e-7: one cosine over the whole run, down to 1e-7;
#   (b) CosineAnnealingLR, T_max 600k, eta_min 1e-7 over 300k iterations: the run ends half way, at ~5e-5;
# - images per step: (a) 2 GPUs x 4 = 8 for ffhq 16x, 2 x 8 = 16 for cats, 4 x 2 = 8 for in128 -> 1024, as in
#   Appendix A; (b) "2xb8" = 16 for ffhq 16x as well.
# The presets follow Appendix A and (a): --lr-period 0 (the whole run) and 8 / 16 images per step.
# `--lr-period 600000 --batch 16` gives (b)'s ffhq 16x.
FFHQ_URL, CAT_URL = "https://github.com/NVlabs/ffhq-dataset", "https://www.yf.io/p/lsun (LSUN cat)"
PRESETS = {
    ("ffhq", 16): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, lr_period=0, percep_norm_img=False,
                       hr=("ffhq/images",), lr="ffhq/BIx16_down", val="CelebA-HQ/GT", url=FFHQ_URL),
    ("ffhq", 8): dict(out_size=1024, bank="stylegan2_ffhq_1024", batch=8, lr_period=0, percep_norm_img=True,
                      hr=("ffhq/images", "CelebA-HQ/GT"), degrade="strong", val="CelebA-HQ/GT",
                      url=f"{FFHQ_URL} and https://github.com/tkarras/progressive_growing_of_gans (CelebA-HQ)"),
    ("cat", 8): dict(out_size=256, bank="stylegan2_cat_256", batch=16, lr_period=0, percep_norm_img=False,
                     hr=("cat_train/GT",), lr="cat_train/BIx8_down", val="cat_test/GT", url=CAT_URL),
    ("cat", 16): dict(out_size=256, bank="stylegan2_cat_256", batch=16, lr_period=0, percep_norm_img=False,
                      hr=("cat_train/GT",), lr="cat_train/BIx16_down", val="cat_test/GT", url=CAT_URL),
}
PRESET_TRAINING = ("batch", "lr_period", "percep_norm_img")   # preset values that a flag overrides


def config_from_flags(given: dict) -> TrainConfig:
    """The flags given (train_cli.parse_flags) over the defaults of their stage."""
    defaults = {**asdict(TrainConfig()), **STAGE_DEFAULTS.get(given.get("stage", "glean"), {})}
    return TrainConfig(**{**defaults, **given})


def preset_folders(name: str, scale: int, data_root: str) -> tuple:
    """(preset, data root, HR folders) of a preset name; a one-line error for a wrong scale or missing data."""
    if (name, scale) not in PRESETS:
        scales = sorted(s for n, s in PRESETS if n == name)
        raise UserError(f"preset '{name}' has scales {scales}; pass --scale with one of them")
    p = PRESETS[(name, scale)]
    root = Path(data_root or os.environ.get("GLEAN_DATA", "data"))
    for hr in p["hr"]:
        if not (root / hr).is_dir():
            raise UserError(f"dataset '{name}' not found: expected HR images in {root / hr} (download from "
                            f"{p['url']}), or point --data-root / GLEAN_DATA at the folder that holds '{hr}'")
    return p, root, [str(root / hr) for hr in p["hr"]]


def resolve_data(cfg: TrainConfig, given: dict) -> None:
    """A preset's folders and training values (flags in `given` win), or the --data folders, checked to exist."""
    names = {name for name, _ in PRESETS}
    if not cfg.data:
        raise UserError(f"pass --data: a preset ({', '.join(sorted(names))}) or a folder of images "
                        f"(only --resume takes it from the run)")
    if cfg.data in names:
        p, root, folders = preset_folders(cfg.data, cfg.scale, cfg.data_root)
        cfg.data, cfg.more_data = folders[0], tuple(folders[1:])
        cfg.out_size, cfg.bank = cfg.out_size or p["out_size"], cfg.bank or p["bank"]
        cfg.degrade = cfg.degrade or p.get("degrade", "")
        for name in PRESET_TRAINING if cfg.stage == "glean" else ():
            if name not in given:
                setattr(cfg, name, p[name])
        if not cfg.lr_dir and p.get("lr") and (root / p["lr"]).is_dir():
            cfg.lr_dir = str(root / p["lr"])
        if not cfg.val_data and (root / p["val"]).is_dir():
            cfg.val_data = str(root / p["val"])
    for folder in (cfg.data, *cfg.more_data):
        if not Path(folder).is_dir():
            raise UserError(f"--data must be a preset ({', '.join(sorted(names))}) or folders of images, "
                            f"got '{folder}'")


def scan_data(cfg: TrainConfig, report: bool) -> train_data.Scan:
    """The training images, read before any weights (their validation images held out)."""
    held_out = train_data.list_images(cfg.val_data)[:cfg.val_count] if cfg.val_data else []
    return train_data.scan([cfg.data, *cfg.more_data], exclude=held_out, report=report)


def resolve_weights(cfg: TrainConfig) -> None:
    """What --init and --bank say about the model: its config (GLEAN --init), or the bank's widths and size."""
    for flag in ("bank", "init", "disc"):
        weight_formats.check_weights_file(getattr(cfg, flag), f"--{flag}")
    if cfg.init and cfg.stage == "bank":
        train_bank.take_init_config(cfg)
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
    for name in train_bank.BANK_FIELDS:
        value, given = getattr(bank, name), cfg.model.get(name)
        value = list(value) if isinstance(value, tuple) else value             # JSON-friendly, as --model gives it
        if given is not None and (list(given) if isinstance(value, list) else given) != value:
            raise UserError(f"--model {name}={cfg.model[name]} contradicts --bank {cfg.bank} ({name}={value}); "
                            f"drop it from --model (the bank's own value is taken)")
        cfg.model[name] = value


# ----------------------------------------------------------------------------------------------------------
# Losses (Appendix A): eq. (5)-(9)


def pixel_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_mse = 1/N ||y_hat - y||^2, N the number of pixel values."""
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
        vgg = vgg16(weights)
        self.f = vgg.features[:22].eval().requires_grad_(False)              # ... conv4_3
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        if self.norm_img:
            t = (t + 1) / 2                                                  # [-1, 1] -> [0, 1]
        return (t - self.mean) / self.std                                    # ImageNet statistics

    def forward(self, y_hat, y):
        return F.mse_loss(self.f(self.normalise(y_hat)), self.f(self.normalise(y)))   # Eq. (6)


def vgg16(weights: str = "") -> nn.Module:
    """torchvision's VGG16 with ImageNet weights: from a file (its features up to conv4_3 are enough), else from
    torchvision's cache or download."""
    if not weights:
        try:
            return torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        except (OSError, RuntimeError) as e:  # urllib errors are OSErrors
            raise UserError(f"VGG16 ImageNet weights unavailable ({type(e).__name__}): pass --vgg-weights FILE "
                            f"(torchvision's vgg16-397923af.pth) or --percep-weight 0") from e
    vgg = torchvision.models.vgg16()
    sd = load_file(weights)
    sd = sd.get("state_dict", sd)
    feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    missing = [k for k in vgg.features[:22].state_dict() if k not in feats]
    if missing:
        raise UserError(f"{weights} lacks VGG16 weights {missing[:2]}: pass torchvision's vgg16 state dict")
    vgg.features.load_state_dict({k: v for k, v in feats.items() if int(k.split(".")[0]) <= 21}, strict=False)
    return vgg


def paper_generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_gen = log(1 - D(y_hat)) = -softplus(logit), as the paper writes it: what G would minimise in the minimax
    game. Not trained with (see generator_adv_loss); the course compares the two."""
    return -F.softplus(fake_logits).mean()                                   # Eq. (7)


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """What G minimises for eq. (7), as GLEAN's official code and StyleGAN2 do: the non-saturating form
    -log D(y_hat) = softplus(-logit). Both push D(y_hat) up, but log(1 - D(y_hat)) is flat where D is sure the
    image is fake (D(y_hat) -> 0, early in training), and -log D(y_hat) is steep there."""
    return F.softplus(-fake_logits).mean()                                   # the non-saturating form of eq. (7)


def glean_loss(l_mse, l_percep, l_gen, cfg: TrainConfig) -> torch.Tensor:
    """L_g = L_mse + alpha_percep L_percep + alpha_gen L_gen (alpha_percep = alpha_gen = 1e-2)."""
    return cfg.pixel_weight * l_mse + cfg.percep_weight * l_percep + cfg.gan_weight * l_gen   # Eq. (8)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D maximises L_d = log(1 - D(y_hat)) + log D(y); we minimise -L_d = softplus(fake) + softplus(-real)."""
    return (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()      # Eq. (9), negated


def cosine(opt, cfg: TrainConfig):
    """Cosine annealing (Appendix A) in the official form: lr(t) = min_lr + (lr - min_lr) (1 + cos(pi t / T)) / 2,
    T = --lr-period, or if 0 --iters (the released models' configs: one cosine over the whole run, to min_lr; with
    mmagic 1.x's T = 600k a 300k-step run ends half way down, at ~lr / 2)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.lr_period or cfg.iters, eta_min=cfg.min_lr)


# ----------------------------------------------------------------------------------------------------------
# The networks


@functools.lru_cache(maxsize=1)
def load_init(name: str) -> glean.GLEAN:
    """--init: the trained GLEAN to start from (a registered name, this project's model file or a training checkpoint
    of train.py). Cached: `resolve_weights` reads its config, `build` its weights (and then clears the cache)."""
    try:
        return zoo.load_pretrained(name)
    except (CheckpointError, ValueError) as e:
        raise UserError(f"--init {name}: {e}") from e


def build_glean(cfg: TrainConfig) -> glean.GLEAN:
    """The network to train: glean_fast.GLEANFast, the reference network (glean.GLEAN) computed faster."""
    mcfg = glean.GLEANConfig.from_dict({"out_size": cfg.out_size, "in_size": cfg.out_size // cfg.scale, **cfg.model})
    return glean_fast.GLEANFast(mcfg)


def init_discriminator(D: stylegan2.Discriminator, cfg: TrainConfig) -> str:
    """Start D (eq. 7, 9) from pretrained weights, as the official configs do (from the StyleGAN2 release the bank
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


@dataclass
class Nets:
    G: glean.GLEAN                   # GLEAN, trained but for its bank
    D: stylegan2.Discriminator       # the discriminator of eq. (7) and (9)
    opt_g: torch.optim.Optimizer     # Adam over G's trainable parameters
    opt_d: torch.optim.Optimizer
    sched_g: object                  # cosine annealing of each
    sched_d: object
    percep: PerceptualLoss | None    # VGG16 features of eq. (6), or None with --percep-weight 0


def build(cfg: TrainConfig, env: Env, state: dict | None) -> tuple:
    """G and D with their optimizers: from the bank (and D's file) for a new run, from --init to fine-tune, from
    the checkpoint `state` when resuming. Returns (nets, start step, elapsed seconds)."""
    bank_file = zoo.weights_file(cfg.bank) if cfg.bank and state is None and not cfg.init else None
    torch.manual_seed(cfg.seed)                                             # the same initial weights everywhere
    G = build_glean(cfg)                                                    # glean.py's initialisation, kept as is
    if cfg.init and state is None:                  # fine-tune: every weight (bank included) from a trained GLEAN
        G.load_state_dict(load_init(cfg.init).state_dict())
        load_init.cache_clear()
    G, mcfg = G.to(env.device), G.cfg
    D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(
        in_size=mcfg.out_size, channel_multiplier=mcfg.channel_multiplier, channel_base=mcfg.channel_base,
        mbstd_group_size=train_run.mbstd_group(train_run.micro_batch(cfg, env)))).to(env.device)
    if state is None and not cfg.init and G.bank is not None:
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
    nets = Nets(G, D, opt_g, opt_d, cosine(opt_g, cfg), cosine(opt_d, cfg), percep)
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is None:
        return nets, 0, 0.0
    G.load_state_dict(state["model"])
    D.load_state_dict(state["discriminator"])
    for key in ("opt_g", "opt_d", "sched_g", "sched_d"):
        getattr(nets, key).load_state_dict(state[key])
    train_run.follow_schedule(nets.sched_g, opt_g, cfg)                     # --resume --lr / --iters
    train_run.follow_schedule(nets.sched_d, opt_d, cfg)
    train_run.set_rng_states(state["rng"], env)
    return nets, state["step"], state.get("elapsed", 0.0)


# ----------------------------------------------------------------------------------------------------------
# One step: a GLEAN update (eq. 8), then a discriminator update (eq. 9)


@dataclass
class Step:
    """What one step needs besides the networks: G and D as they run (DistributedDataParallel, torch.compile),
    mixed precision, and the batches."""
    G_train: nn.Module               # G in DistributedDataParallel with several processes, else G
    D_train: nn.Module
    G_fwd: nn.Module                 # the same, compiled with --compile
    D_fwd: nn.Module
    autocast: object
    scaler: object
    batches: object
    seen: set = field(default_factory=set)          # unreadable files already named


def glean_step(cfg: TrainConfig, env: Env, nets: Nets, run: Step, step: int, progress: Progress) -> tuple:
    """Update G on eq. (8) over --accum micro-batches, D fixed. Returns (y_hat, y) pairs and the losses."""
    G, D, percep = nets.G, nets.D, nets.percep
    D.requires_grad_(False)                          # D's gradients would be thrown away
    pairs, totals = [], {"loss/mse": 0.0, "loss/percep": 0.0, "loss/gen": 0.0, "loss/g": 0.0}
    for m in range(cfg.accum):
        b = next(run.batches)
        train_data.report_skipped(b, run.seen)
        x, y = b["lr"].to(env.device, non_blocking=True), b["hr"].to(env.device, non_blocking=True)
        sync = m == cfg.accum - 1 or env.world == 1  # gradients averaged over processes at the last one
        with (contextlib.nullcontext() if sync else run.G_train.no_sync()), run.autocast():
            y_hat = run.G_fwd(x)                                             # Eq. (1)-(4)
            l_mse = pixel_loss(y_hat.float(), y)                             # Eq. (5)
            l_percep = percep(y_hat.float(), y) if percep is not None else y.new_zeros(())   # Eq. (6)
            l_gen = (generator_adv_loss(D(y_hat).float()) if cfg.gan_weight > 0   # eq. (7), non-saturating
                     else y.new_zeros(()))
            loss = glean_loss(l_mse, l_percep, l_gen, cfg)                   # Eq. (8)
        (run.scaler.scale(loss / cfg.accum) if run.scaler else loss / cfg.accum).backward()
        pairs.append((y_hat.detach(), y))
        for k, v in zip(totals, (l_mse, l_percep, l_gen, loss)):
            totals[k] += float(v.detach()) / cfg.accum
    train_run.check_finite(totals, env, Path(cfg.out), step, lambda x=x, y=y: {
        "lr": x.cpu(), "hr": y.cpu(), "model": G.state_dict()})
    progress.clean = False                           # from here to the end of the step: G and D of two steps
    (run.scaler.step(nets.opt_g) if run.scaler else nets.opt_g.step())
    nets.opt_g.zero_grad(set_to_none=True)
    return pairs, totals


def discriminator_step(cfg: TrainConfig, env: Env, nets: Nets, run: Step, step: int, pairs: list) -> float:
    """Update D on eq. (9) with the step's (y_hat, y) pairs. Returns L_d (minimised: -log(1 - D(y_hat)) - log D(y))."""
    D = nets.D
    D.requires_grad_(True)
    d_total = 0.0
    for m, (y_hat, y) in enumerate(pairs):
        sync = m == cfg.accum - 1 or env.world == 1
        with (contextlib.nullcontext() if sync else run.D_train.no_sync()), run.autocast():
            l_d = discriminator_loss(run.D_fwd(y).float(), run.D_fwd(y_hat).float())   # Eq. (9)
        (run.scaler.scale(l_d / cfg.accum) if run.scaler else l_d / cfg.accum).backward()
        d_total += float(l_d.detach()) / cfg.accum
    train_run.check_finite({"loss/d": d_total}, env, Path(cfg.out), step, lambda: {
        "model": nets.G.state_dict(), "discriminator": D.state_dict()})
    (run.scaler.step(nets.opt_d) if run.scaler else nets.opt_d.step())
    nets.opt_d.zero_grad(set_to_none=True)
    return d_total


# ----------------------------------------------------------------------------------------------------------
# The loop


def train_glean(cfg: TrainConfig, env: Env, state: dict | None, scanned: train_data.Scan) -> None:
    """GLEAN's training (Appendix A) on the `scanned` images, from `state` when resuming."""
    out = Path(cfg.out)
    nets, start, elapsed = build(cfg, env, state)
    G, D, mcfg = nets.G, nets.D, nets.G.cfg
    bank_before = {k: v.detach().clone() for k, v in G.bank.state_dict().items()} if G.bank is not None else {}
    data = train_data.SRDataset(cfg.data, mcfg.out_size, mcfg.in_size, cfg.lr_dir, degrade=cfg.degrade,
                                lr_float=cfg.lr_float, seed=cfg.seed, crop=cfg.crop, crop_jitter=cfg.crop_jitter,
                                report=env.main, scanned=scanned)
    same_data(state, data, env)
    val, lpips = validation_data(cfg, env, mcfg)
    G_train, D_train = train_run.wrap(G, env), train_run.wrap(D, env)
    compiled = (torch.compile(G_train), torch.compile(D_train)) if cfg.compile else (G_train, D_train)
    run = Step(G_train, D_train, *compiled, *train_run.precision(cfg, env), batches=None)
    log, stop = None, train_run.Stopper()            # the Stopper before the DataLoader starts its workers

    def save(step, solo=False):
        st = {"format": "glean-train", "stage": "glean", "config": asdict(cfg), "model_config": asdict(mcfg),
              "step": step, "model": G.state_dict(), "discriminator": D.state_dict(),
              "opt_g": nets.opt_g.state_dict(), "opt_d": nets.opt_d.state_dict(),
              "sched_g": nets.sched_g.state_dict(), "sched_d": nets.sched_d.state_dict(),
              "rng": train_run.rng_states(env, solo), "world": env.world, "elapsed": log.elapsed(),
              "data": data.fingerprint}
        return train_run.save_checkpoint(out, step, st, cfg.keep) if env.main or solo else None

    G.train(), D.train()
    step, progress = start, Progress(start)
    try:
        run.batches = train_data.loader(data, cfg, env, start * cfg.accum)
        log = train_run.Logger(out, cfg, env, start, elapsed)
        for step in range(start + 1, cfg.iters + 1):
            pairs, totals = glean_step(cfg, env, nets, run, step, progress)     # Eq. (8)
            if cfg.gan_weight > 0:
                totals["loss/d"] = discriminator_step(cfg, env, nets, run, step, pairs)   # Eq. (9)
            if run.scaler:
                run.scaler.update()
            nets.sched_g.step()
            if cfg.gan_weight > 0:
                nets.sched_d.step()
            progress.done, progress.clean = step, True
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:              # losses over the whole global batch
                log.scalars(step, {**env.mean(totals), "lr": nets.sched_g.get_last_lr()[0]})
            if val is not None and cfg.val_every and (step % cfg.val_every == 0 or step == cfg.iters):
                validate(G, val, env, log, step, lpips)
            if train_run.checkpoint_or_stop(step, cfg, env, stop, save):
                break
    except RuntimeError as e:
        if not train_run.partner_lost(e, env):
            raise
        train_run.save_replica(e, out, progress, env, save)
    finally:
        train_data.close_loader(run.batches)
        stop.close()
        if log is not None:
            log.close()
    for k, v in (G.bank.state_dict() if G.bank is not None else {}).items():
        assert torch.equal(v, bank_before[k]), f"latent bank tensor {k} changed during training"
    finish(cfg, env, nets, step, out)


def finish(cfg: TrainConfig, env: Env, nets: Nets, step: int, out: Path) -> None:
    """The trained model, ready for infer.py / torch.hub / demo.py, when the run is done."""
    train_run.same_everywhere(env, nets.G, nets.D)
    if not env.main:
        return
    if step == cfg.iters:
        nets.G.save(out / "glean.safetensors")
        print(f"finished at step {step}; model in {out / 'glean.safetensors'}, checkpoints in {out / 'checkpoints'}")
    else:
        print(f"stopped at step {step}; checkpoints in {out / 'checkpoints'}")


def same_data(state: dict | None, data: train_data.SRDataset, env: Env) -> None:
    """On resume: say so when the images differ from those the run started with (a moved dataset is fine)."""
    if state is not None and env.main and state.get("data", data.fingerprint) != data.fingerprint:
        print(f"warning: the training images ({data.fingerprint}) are not those the run started with "
              f"({state['data']}): the data order differs from an uninterrupted run's", file=sys.stderr)


def validation_data(cfg: TrainConfig, env: Env, mcfg: glean.GLEANConfig) -> tuple:
    """The held-out images (main process only) and LPIPS if its weights are at hand, or (None, None)."""
    if not cfg.val_data or not env.main:
        return None, None
    val = train_data.SRDataset(cfg.val_data, mcfg.out_size, mcfg.in_size, flip=False, limit=cfg.val_count)
    lpips, why = LPIPS.load()
    if lpips is None:
        print(f"validation: PSNR only; {why}", file=sys.stderr)
    return val, lpips.to(env.device) if lpips is not None else None


@torch.no_grad()
def validate(G: glean.GLEAN, val, env: Env, log, step: int, lpips=None) -> float:
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
            bicubic = images.imresize(x, size=y.shape[-1]).clamp(-1, 1)
            rows.append(torch.cat([bicubic, y_hat.clamp(-1, 1), y], dim=-1)[0])
    G.train()
    score = sum(scores) / len(scores)
    log.scalars(step, {"val/psnr": score, **({"val/lpips": sum(dists) / len(dists)} if dists else {})}, show=False)
    log.images(step, "val/bicubic_glean_gt", torch.cat(rows, dim=-2))
    return score


# ----------------------------------------------------------------------------------------------------------
# python train.py ...


def start_run(given: dict, world: int, rank: int) -> tuple:
    """A new run: the run folder, the numbers, the data, then the weights, each checked in that order, before
    anything is built. Returns (config, scanned data)."""
    cfg = config_from_flags(given)
    train_run.check_out_dir(cfg.out)
    train_cli.check_flags(cfg, world)
    resolve_data(cfg, given)
    if cfg.out_size and (cfg.scale or cfg.stage == "bank"):
        train_cli.check_model(cfg)                   # what is known before the weights are read
    scanned = scan_data(cfg, report=rank == 0)
    resolve_weights(cfg)
    train_cli.check_model(cfg)
    if train_run.checkpoints(Path(cfg.out)):
        raise UserError(f"{cfg.out} already has checkpoints: pass --resume to continue, or another --out")
    return cfg, scanned


def resume_run(given: dict, world: int, rank: int) -> tuple:
    """The run in --out continued from its newest intact checkpoint. Returns (config, state, scanned data)."""
    out = given.get("out", TrainConfig.out)
    train_run.check_out_dir(out, must_exist=True)
    state, path = train_run.latest_checkpoint(Path(out), report=rank == 0)
    if state is None:
        raise UserError(f"--resume: no intact checkpoint in {out}/checkpoints")
    if "data" in given and (given["data"], state["config"].get("scale")) in PRESETS:
        folders = preset_folders(given["data"], state["config"]["scale"], given.get("data_root", ""))[2]
        given = {**given, "data": folders[0], "more_data": tuple(folders[1:])}
    cfg, notes = train_run.resume_config(state, given, out, world, TrainConfig)
    train_cli.check_flags(cfg, world)
    train_cli.check_model(cfg)
    if rank == 0:
        print(f"resuming from {path} (step {state['step']})" + "".join(f"\n  resume: {n}" for n in notes))
    return cfg, state, scan_data(cfg, report=rank == 0)


def main(argv=None) -> int:
    """The command line: the flags (train_cli.py), a new run or a resumed one, then the stage's training loop."""
    world, rank = train_run.world_and_rank()
    try:
        given = train_cli.parse_flags(argv, TrainConfig(), __doc__)
        if given.get("resume"):
            cfg, state, scanned = resume_run(given, world, rank)
        else:
            (cfg, scanned), state = start_run(given, world, rank), None
        if rank == 0:
            train_run.clean_run_dir(Path(cfg.out))
        env = train_run.setup(cfg.device)
        if cfg.stage == "bank":
            data = train_data.SRDataset(cfg.data, cfg.out_size, seed=cfg.seed, crop=cfg.crop,
                                        crop_jitter=cfg.crop_jitter, report=env.main, scanned=scanned)
            same_data(state, data, env)
            train_bank.train_bank(cfg, env, state, data)
        else:
            train_glean(cfg, env, state, scanned)
        return 0
    except (UserError, CheckpointError) as e:
        print(f"error: {train_run.one_line(e)}", file=sys.stderr)
        return 2
    except (train_run.NonFiniteLoss, train_run.PartnerLost) as e:   # the message covers every process's files
        if rank == 0 or isinstance(e, train_run.PartnerLost):
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
