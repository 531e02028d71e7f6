"""The command line of train.py: its flags, their help and defaults, and the checks of their values.

`parse_flags(argv, defaults)` returns only the flags given (presets and a resumed run's saved settings fill in the
rest, in train.py); `check_flags` and `check_model` turn a value out of range into one line naming the flag, before
anything is built or read. A bad flag type is one line too (exit code 2).
"""
import argparse
import json
import math

import glean
import stylegan2
from train_data import DEGRADE
from train_run import RESUME_OVERRIDES, UserError


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


def build_parser(d, description: str = "") -> argparse.ArgumentParser:
    """The options, each with its help and its default from `d` (a train.TrainConfig()). Unset options are absent
    from the parsed namespace (argparse.SUPPRESS), so that the caller knows what was given."""
    ap = ArgumentParser(prog="train.py", description=description, argument_default=argparse.SUPPRESS,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    data_flags(ap.add_argument_group("what to train"))
    optimisation_flags(ap.add_argument_group("optimisation (Appendix A; presets follow the official configs)"), d)
    g = ap.add_argument_group("hardware")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision; fp16 on CUDA only "
                                                                   "(default: none)")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (default: off)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    g.add_argument("--workers", type=int, help=f"DataLoader workers per process (default: {d.workers})")
    g = ap.add_argument_group("run directory, logs and checkpoints")
    g.add_argument("--out", help=f"run directory (default: {d.out})")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with its saved settings; "
                        f"only {', '.join('--' + k.replace('_', '-') for k in sorted(RESUME_OVERRIDES))} may change "
                        f"(default: off)")
    for name, what in (("ckpt_every", "steps between checkpoints"), ("keep", "checkpoints kept"),
                       ("log_every", "steps between logged losses and, without a terminal, progress lines"),
                       ("val_every", "steps between validations, 0 = never"), ("val_count", "validation images")):
        g.add_argument("--" + name.replace("_", "-"), type=int, help=f"{what} (default: {getattr(d, name)})")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard logs (default: written to OUT/tb)")
    return ap


def data_flags(g) -> None:
    g.add_argument("--stage", choices=["glean", "bank"],
                   help="glean: train GLEAN (Appendix A); bank: pretrain a StyleGAN2 latent bank (default: glean)")
    g.add_argument("--data", nargs="+", metavar="DATA",
                   help="a preset (ffhq, cat: with --scale) or one or more folders of HR images (no default: "
                        "required, except with --resume, which takes the run's; there it points at moved data)")
    g.add_argument("--data-root", help="folder holding the preset datasets (default: $GLEAN_DATA, else ./data)")
    g.add_argument("--lr-dir", help="folder of pre-made LR images with the HR images' file names (default: LR made "
                                    "on the fly with MATLAB bicubic)")
    g.add_argument("--val-data", help="folder of held-out HR images for validation; its images used for validation "
                                      "are never trained on (default: the preset's, else none)")
    g.add_argument("--scale", type=int, help="out_size / in_size: 4, 8, 16, 32 or 64 (no default: required for "
                                             "GLEAN)")
    g.add_argument("--out-size", type=int, help="HR size = the bank's resolution (default: the preset's, or the "
                                                "--bank file's; required for a folder otherwise)")
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


def optimisation_flags(g, d) -> None:
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


def parse_flags(argv, defaults, description: str = "") -> dict:
    """The flags given on the command line, as TrainConfig fields (--data's further folders in more_data, --fig7
    as its --model switches)."""
    given = vars(build_parser(defaults, description).parse_args(argv))
    given = {k: tuple(v) if k in ("betas", "crop") else v for k, v in given.items()}
    if "data" in given:
        given["data"], more = given["data"][0], tuple(given["data"][1:])
        if more:
            given["more_data"] = more
    fig7 = given.pop("fig7", None)
    if fig7 is not None:                         # Fig. 7 as in the paper: "the generator directly produces the output"
        model = given.get("model", {})
        clash = {k: model[k] for k in ("use_decoder", "fuse_encoder_up_to") if k in model}
        if clash:
            raise UserError(f"--fig7 sets use_decoder and fuse_encoder_up_to; drop {clash} from --model")
        given["model"] = {**model, "fuse_encoder_up_to": fig7, "use_decoder": False}
    return given


def need(cfg, ok: bool, name: str, rule: str) -> None:
    """A UserError naming the flag of field `name` and its value unless ok."""
    if not ok:
        value = getattr(cfg, name)
        value = " ".join(map(str, value)) if isinstance(value, tuple) else value
        raise UserError(f"--{name.replace('_', '-')} {rule}, got {value}")


def check_flags(cfg, world: int) -> None:
    """Every number in range, before anything is built or read: a UserError naming the flag otherwise."""
    for name, low in (("iters", 1), ("batch", 1), ("accum", 1), ("ckpt_every", 1), ("keep", 1), ("log_every", 1),
                      ("val_count", 1), ("reg_every", 1), ("workers", 0), ("val_every", 0), ("seed", 0),
                      ("lr_period", 0)):
        need(cfg, getattr(cfg, name) >= low, name, f"must be at least {low}")
    for name in ("lr", "min_lr", "pixel_weight", "percep_weight", "gan_weight", "r1_gamma"):
        need(cfg, math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "must be a number >= 0")
    need(cfg, cfg.ema_kimg > 0, "ema_kimg", "must be > 0")
    need(cfg, 0 <= cfg.mixing <= 1, "mixing", "is a probability, from 0 to 1")
    need(cfg, all(0 <= b < 1 for b in cfg.betas), "betas", "must lie in [0, 1)")
    need(cfg, cfg.lr_period == 0 or cfg.lr_period >= cfg.iters, "lr_period",
         f"must be 0 (= --iters) or at least --iters ({cfg.iters}): past it the cosine would climb again")
    if cfg.stage == "bank":
        need(cfg, cfg.accum == 1, "accum", "is for the GLEAN stage; the bank stage takes whole batches (1)")
    shares = world * cfg.accum
    need(cfg, cfg.batch % shares == 0, "batch", f"is the global batch: it must split evenly over {world} "
                                                f"process(es) x --accum {cfg.accum} micro-batches (a multiple of "
                                                f"{shares})")
    if cfg.crop and not (cfg.crop[0] >= 0 and cfg.crop[1] >= 0 and cfg.crop[2] > 0):
        raise UserError(f"--crop LEFT TOP SIZE needs LEFT, TOP >= 0 and SIZE > 0, got {' '.join(map(str, cfg.crop))}")
    if not 0 <= cfg.crop_jitter < 0.5:
        raise UserError(f"--crop-jitter is a fraction of the box, 0 <= it < 0.5 (e.g. 0.05), got {cfg.crop_jitter}")


def check_model(cfg) -> None:
    """The sizes and the --model overrides build a valid GLEANConfig (or GeneratorConfig for the bank stage)."""
    need(cfg, cfg.out_size in (16, 32, 64, 128, 256, 512, 1024), "out_size", "must be a power of two from 16 to 1024")
    if cfg.stage == "glean":
        need(cfg, cfg.scale in (4, 8, 16, 32, 64), "scale", "must be 4, 8, 16, 32 or 64 (out_size / in_size)")
        need(cfg, cfg.out_size // cfg.scale >= 8, "scale", f"leaves inputs of {cfg.out_size // cfg.scale} px at "
                                                           f"--out-size {cfg.out_size}; GLEAN needs at least 8")
    try:
        if cfg.stage == "glean":
            glean.GLEANConfig.from_dict({"out_size": cfg.out_size, "in_size": cfg.out_size // cfg.scale, **cfg.model})
        else:
            stylegan2.GeneratorConfig(**{"out_size": cfg.out_size, **cfg.model})
    except (ValueError, TypeError) as e:
        raise UserError(f"--model: {e}") from e
