"""Pretraining a StyleGAN2 latent bank (`python train.py --stage bank`): the prior GLEAN needs before it can train.

StyleGAN2's own recipe (Karras et al., CVPR 2020), as in its reference implementations: the logistic
(non-saturating) GAN loss, lazy R1 regularisation of the discriminator every `reg_every` steps, style mixing, and
an exponential moving average of the generator (G_ema), which is the bank GLEAN uses. The run machinery
(checkpoints, resume, signals, processes, logs) is train_run.py's; the data train_data.py's.

    L_D = softplus(D(G(z))) + softplus(-D(y))   = -log(1 - D(G(z))) - log D(y)     the form of GLEAN's eq. (9)
    L_G = softplus(-D(G(z)))                    = -log D(G(z))                     the form used for eq. (7)
    R1  = gamma / 2 * E ||grad_y D(y)||^2
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import glean_fast
import stylegan2
import weight_formats
import zoo
from glean_io import CheckpointError
from train_data import close_loader, loader, report_skipped
from train_run import (Logger, Progress, Stopper, UserError, check_finite, checkpoint_or_stop, mbstd_group,
                       micro_batch, partner_lost, precision, rng_states, same_everywhere, save_checkpoint,
                       save_replica, set_rng_states, wrap)

BANK_FIELDS = ("style_channels", "num_mlps", "channel_multiplier", "channel_base", "lr_mlp", "blur_kernel")


def d_logistic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """L_D = softplus(fake) + softplus(-real), averaged over the batch."""
    return (F.softplus(fake_logits) + F.softplus(-real_logits)).mean()


def g_nonsaturating_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """L_G = softplus(-fake) = -log D(G(z)), averaged over the batch."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 = E ||grad_y D(y)||^2 on real images (StyleGAN2's regulariser of the discriminator)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(dim=(1, 2, 3)).mean()


# ----------------------------------------------------------------------------------------------------------
# --init: a bank grows from a trained smaller one


def take_init_config(cfg) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# The networks, one step, the loop


@dataclass
class BankNets:
    G: nn.Module                     # the generator trained (glean_fast.GeneratorFast: stylegan2.Generator, faster)
    D: stylegan2.Discriminator
    G_ema: stylegan2.Generator       # its moving average: the bank
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


def build(cfg, env, state: dict | None) -> tuple:
    """The networks and optimizers, from the checkpoint `state` when resuming; (nets, start step, elapsed s)."""
    torch.manual_seed(cfg.seed)                                             # the same initial weights everywhere
    gcfg = stylegan2.GeneratorConfig(**{"out_size": cfg.out_size, **cfg.model})
    G = glean_fast.GeneratorFast(gcfg).to(env.device)
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
    nets = BankNets(G, D, G_ema, torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=cfg.betas),
                    torch.optim.Adam(D.parameters(), lr=cfg.lr * c, betas=tuple(b ** c for b in cfg.betas)))
    torch.manual_seed(cfg.seed * 1009 + env.rank)                           # training randomness, per process
    if state is None:
        return nets, 0, 0.0
    for key in ("g", "d", "g_ema", "opt_g", "opt_d"):
        getattr(nets, {"g": "G", "d": "D", "g_ema": "G_ema"}.get(key, key)).load_state_dict(state[key])
    for opt, scale in ((nets.opt_g, 1.0), (nets.opt_d, c)):                 # --resume --lr: constant, as it was
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
    set_rng_states(state["rng"], env)
    return nets, state["step"], state.get("elapsed", 0.0)


def bank_step(step: int, y: torch.Tensor, nets: BankNets, G_train, D_train, cfg, autocast, scaler,
              progress: Progress) -> dict:
    """One step of StyleGAN2 training on real images y: D (logistic loss, lazy R1), then G (non-saturating)."""
    G, D, B = nets.G, nets.D, y.shape[0]
    styles = lambda: style_codes(B, G.cfg.style_channels, cfg.mixing, y.device)   # noqa: E731
    G.requires_grad_(False), D.requires_grad_(True)
    with torch.no_grad(), autocast():
        fake = G(styles())
    with autocast():
        l_d = d_logistic_loss(D_train(y).float(), D_train(fake).float())
    (scaler.scale(l_d) if scaler else l_d).backward()
    progress.clean = False                           # from here to the end of the step: D and G of two steps
    (scaler.step(nets.opt_d) if scaler else nets.opt_d.step())
    nets.opt_d.zero_grad(set_to_none=True)
    losses = {"loss/d": l_d}
    if step % cfg.reg_every == 0:                    # lazy R1: every reg_every steps, scaled up by reg_every
        y_r = y.detach().requires_grad_(True)
        logits = D_train(y_r).float()
        r1 = r1_penalty(logits, y_r)
        # + 0 * logits: the output layer's bias does not affect the penalty, but every parameter must be in the
        # graph for DistributedDataParallel
        (cfg.r1_gamma / 2 * r1 * cfg.reg_every + 0 * logits.mean()).backward()
        nets.opt_d.step()
        nets.opt_d.zero_grad(set_to_none=True)
        losses["loss/r1"] = r1
    G.requires_grad_(True), D.requires_grad_(False)  # G through the fixed plain D
    with autocast():
        l_g = g_nonsaturating_loss(D(G_train(styles())).float())
    (scaler.scale(l_g) if scaler else l_g).backward()
    (scaler.step(nets.opt_g) if scaler else nets.opt_g.step())
    nets.opt_g.zero_grad(set_to_none=True)
    if scaler:
        scaler.update()
    losses["loss/g"] = l_g
    return {k: float(v.detach()) for k, v in losses.items()}


def style_codes(B: int, S: int, mixing: float, device):
    """Random z for a batch: two codes (style mixing) with probability `mixing`, else one."""
    z = torch.randn(2, B, S, device=device)
    return [z[0], z[1]] if torch.rand(()).item() < mixing else z[0]


@torch.no_grad()
def ema_update(nets: BankNets, beta: float) -> None:
    """G_ema <- beta G_ema + (1 - beta) G (its buffers copied)."""
    for p_ema, p in zip(nets.G_ema.parameters(), nets.G.parameters()):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(nets.G_ema.buffers(), nets.G.buffers()):
        b_ema.copy_(b)


def train_bank(cfg, env, state: dict | None, data) -> None:
    """The bank stage's loop over `data` (a train_data.SRDataset of HR images), from `state` when resuming."""
    run = Path(cfg.out)
    nets, start, elapsed = build(cfg, env, state)
    G_train, D_train = wrap(nets.G, env), wrap(nets.D, env)
    autocast, scaler = precision(cfg, env)
    log, stop, seen, batches = None, Stopper(), set(), None  # the Stopper before the DataLoader starts its workers
    beta = 0.5 ** (cfg.batch / (cfg.ema_kimg * 1000))                       # EMA decay per step (global batch)
    S = nets.G.cfg.style_channels
    z_fixed = torch.randn(16, S, generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)

    def save(step, solo=False):
        st = {"format": "glean-train", "stage": "bank", "config": asdict(cfg),
              "generator_config": asdict(nets.G.cfg), "step": step, "g": nets.G.state_dict(),
              "d": nets.D.state_dict(), "g_ema": nets.G_ema.state_dict(), "opt_g": nets.opt_g.state_dict(),
              "opt_d": nets.opt_d.state_dict(), "rng": rng_states(env, solo), "world": env.world,
              "elapsed": log.elapsed(), "data": data.fingerprint}
        return save_checkpoint(run, step, st, cfg.keep) if env.main or solo else None

    step, progress = start, Progress(start)
    try:
        batches = loader(data, cfg, env, start)
        log = Logger(run, cfg, env, start, elapsed)
        for step in range(start + 1, cfg.iters + 1):
            b = next(batches)
            report_skipped(b, seen)
            y = b["hr"].to(env.device, non_blocking=True)
            losses = bank_step(step, y, nets, G_train, D_train, cfg, autocast, scaler, progress)
            check_finite(losses, env, run, step, lambda y=y: {"real": y.cpu(), "g": nets.G.state_dict(),
                                                              "d": nets.D.state_dict()})
            ema_update(nets, beta)
            progress.done, progress.clean = step, True
            log.tick()
            if step % cfg.log_every == 0 or step == cfg.iters:
                log.scalars(step, env.mean(losses))
            if cfg.val_every and env.main and (step % cfg.val_every == 0 or step == cfg.iters):
                with torch.no_grad():
                    img = nets.G_ema(z_fixed, noise="const")
                log.images(step, "samples", torchvision.utils.make_grid(img.clamp(-1, 1), nrow=4,
                                                                        value_range=(-1, 1)))
            if checkpoint_or_stop(step, cfg, env, stop, save):
                break
    except RuntimeError as e:
        if not partner_lost(e, env):
            raise
        save_replica(e, run, progress, env, save)
    finally:
        close_loader(batches)
        stop.close()
        if log is not None:
            log.close()
    finish(cfg, env, nets, step, run)


def finish(cfg, env, nets: BankNets, step: int, run: Path) -> None:
    """The bank file (the EMA generator, with the discriminator GLEAN training starts from) when the run is done."""
    same_everywhere(env, nets.G, nets.D, nets.G_ema)
    if not env.main:
        return
    if step == cfg.iters:
        weight_formats.save_generator(nets.G_ema, run / "bank.safetensors", discriminator=nets.D)
        print(f"finished at step {step}; latent bank (EMA generator, with its discriminator) in "
              f"{run / 'bank.safetensors'}")
    else:
        print(f"stopped at step {step}; checkpoints in {run / 'checkpoints'}")
