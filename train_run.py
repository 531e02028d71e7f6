"""The machinery of a training run, for train.py and train_bank.py: what the paper does not describe.

- processes: one, or several started by torchrun (DistributedDataParallel, gloo on CPUs, NCCL on GPUs) - `Env`;
- the run directory: checked before anything is built (`check_out_dir`), cleaned of partial files;
- checkpoints: plain data written atomically with a checksum of their content; resuming takes the newest one that
  is complete and intact (`latest_checkpoint`), with the settings it was started with (`resume_config`);
- stopping: SIGTERM / SIGINT end the run after the current step with a checkpoint (`Stopper`); a process whose
  partner died saves its replica when its state is whole (`PartnerLost`); a NaN loss stops with its evidence;
- logging: metrics.jsonl, TensorBoard, progress lines (`Logger`).
"""
import contextlib
import hashlib
import inspect
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from glean_io import CheckpointError, atomic_write, load_file, remove_stale_temp, save_file


class UserError(Exception):
    """A problem the user can fix (missing data or weights, bad flags): reported in one line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss stopped the run (its debug state is saved): reported in one line, exit code 1."""


class PartnerLost(RuntimeError):
    """Another process of the run died: this one saved its replica, or says why it could not (exit code 1)."""


# ----------------------------------------------------------------------------------------------------------
# Processes


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


def world_and_rank() -> tuple:
    """(processes, this one's rank) as torchrun sets them (1, 0 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def setup(device_name: str) -> Env:
    """One process, or one of torchrun's (RANK / WORLD_SIZE / LOCAL_RANK): NCCL on GPUs, gloo on CPUs."""
    world, rank = world_and_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[env.device.index] if env.device.type == "cuda" else None, **sync)


def partner_lost(e: BaseException, env: Env) -> bool:
    """Whether an error means that another process of the run is gone: a failed collective (gloo's connection
    errors, torch.distributed's DistError, e.g. NCCL's)."""
    return env.world > 1 and (isinstance(e, dist.DistError) or "gloo" in str(e) and "onnection" in str(e))


def micro_batch(cfg, env: Env) -> int:
    """Images per process and micro-batch: the global --batch split over processes and --accum micro-batches."""
    return cfg.batch // (env.world * cfg.accum)


def mbstd_group(n: int, largest: int = 4) -> int:
    """The discriminator's minibatch-stddev group for micro-batches of n: StyleGAN2's 4 (the official configs train
    with 8 images per GPU), or the largest size below it that divides n (e.g. 3 for 6 images, 1 for 5)."""
    return max(g for g in range(1, min(largest, n) + 1) if n % g == 0)


def precision(cfg, env: Env):
    """autocast context and fp16 GradScaler (or None) for --amp."""
    if cfg.amp == "none":
        return contextlib.nullcontext, None
    if cfg.amp == "fp16" and env.device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    return (lambda: torch.autocast(env.device.type, dtype=dtype)), scaler


def same_everywhere(env: Env, *modules: nn.Module) -> None:
    """With several processes: check that every one holds bit-identical weights (a hash of all tensors)."""
    if env.world == 1:
        return
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
# The run directory and its checkpoints


def check_out_dir(out: str, must_exist: bool = False) -> None:
    """--out must be a folder this process can write into, or one it can create: checked (with a temporary file,
    which also finds read-only file systems) before any data, weights or model is touched. Nothing is created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder for the run (it is created if missing)")
    if must_exist and not path.is_dir():
        raise UserError(f"--resume: {out} is not a run folder (it does not exist)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, so the run folder cannot be made there")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: cannot write in {parent} ({e.strerror or e}); pass a writable folder") from e


def clean_run_dir(run: Path) -> None:
    """Remove the partial files that writes killed mid-way left in the run directory (checkpoints can be GBs)."""
    removed = remove_stale_temp(run / "checkpoints") + remove_stale_temp(run)
    if removed:
        print(f"removed {len(removed)} partial file(s) left by an interrupted write: "
              f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}", file=sys.stderr)


def checkpoints(run: Path) -> list:
    return sorted(Path(run).glob("checkpoints/step_*.pt"))


def content_digest(obj) -> str:
    """sha256 of a checkpoint's content (tensors' dtypes, shapes and bytes, numbers, strings, in a fixed order), so
    that bytes changed inside a file that still loads are found. `checksum` entries are left out."""
    h = hashlib.sha256()

    def feed(o):
        if torch.is_tensor(o):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(o, dict):
            keys = sorted((k for k in o if k != "checksum"), key=repr)
            h.update(f"D{len(keys)}".encode())
            for k in keys:
                h.update(repr(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}".encode())
            for item in o:
                feed(item)
        else:
            h.update(f"{type(o).__name__}:{o!r}".encode())
    feed(obj)
    return h.hexdigest()


def save_checkpoint(run: Path, step: int, state: dict, keep: int) -> Path:
    """Write checkpoints/step_N.pt atomically, with the checksum of its content, and keep the last `keep`. A full
    disk (or any failed write) leaves no partial file and the earlier checkpoints intact: a one-line UserError."""
    path = Path(run) / "checkpoints" / f"step_{step:08d}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({**state, "checksum": content_digest(state)}, path)
    except OSError as e:
        before = [p.name for p in checkpoints(run) if p != path]
        kept = f"the last checkpoint, {before[-1]}, is kept" if before else "no earlier checkpoint exists"
        raise UserError(f"could not write the checkpoint of step {step} to {path.parent} ({e.strerror or e}); "
                        f"{kept}: free some space and continue with --resume --out {run}") from e
    for old in checkpoints(run)[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run: Path, report: bool = True) -> tuple:
    """The newest checkpoint that loads completely and matches its checksum, newest first; an empty, truncated,
    corrupt or altered one is named and the previous one used. Older runs' checkpoints have no checksum and are
    taken as they load. Returns (state, path) or (None, None)."""
    found = list(reversed(checkpoints(run)))
    for i, path in enumerate(found):
        try:
            state = load_file(path)
            if "checksum" in state and state["checksum"] != content_digest(state):
                raise CheckpointError(f"{path}: its content does not match its checksum (the file was damaged "
                                      f"after it was written)")
        except CheckpointError as e:
            if report:
                previous = f"using {found[i + 1].name}" if i + 1 < len(found) else "no earlier checkpoint"
                print(f"warning: {e}; {previous}", file=sys.stderr)
            continue
        if state.get("format") == "glean-train":
            return state, path
    return None, None


def rng_states(env: Env, solo: bool = False) -> list:
    """Every process's torch RNG state (CPU and CUDA), as tensors; solo: this process's only (None for the others),
    without a collective (when partners are gone)."""
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    if env.world == 1 or solo:
        return [state if r == env.rank else None for r in range(env.world)]
    out = [None] * env.world
    dist.all_gather_object(out, {k: v.cpu() for k, v in state.items()})
    return out


def set_rng_states(states: list, env: Env) -> None:
    """Restore this process's RNG state; a process the checkpoint has none for (resumed with more processes than
    it was written by, or saved by a partner alone) keeps the fresh seed it was given."""
    if env.rank >= len(states) or states[env.rank] is None:
        return
    state = states[env.rank]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and env.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], env.device)


# what a resumed run may change (with a notice): where things are, how it is logged and run, and the schedule
# (the learning rate follows the new cosine from the step reached); everything else comes from its checkpoint
RESUME_OVERRIDES = {"iters", "lr", "min_lr", "lr_period", "data", "more_data", "data_root", "lr_dir", "val_data",
                    "val_count", "vgg_weights", "accum", "workers", "device", "amp", "compile", "log_every",
                    "ckpt_every", "val_every", "keep", "tensorboard"}


def resume_config(state: dict, given: dict, out: str, world: int, config_cls) -> tuple:
    """The config to continue a run with: the checkpoint's (a `config_cls`), with the allowed flags in `given`
    applied (a preset name in --data already resolved to its folder). Returns (config, notices); a flag that may
    not change is a UserError."""
    raw = dict(state["config"])
    world_before = state.get("world", len(state["rng"]))
    if "world" not in state:   # written when --batch was per process and micro-batch, and VGG saw [0, 1] images
        raw["batch"] = raw["batch"] * world_before * raw.get("accum", 1)
        raw.setdefault("percep_norm_img", True)
    known = {f.name for f in fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in raw.items() if k in known})
    cfg.betas, cfg.crop, cfg.more_data = tuple(cfg.betas), tuple(cfg.crop), tuple(cfg.more_data)
    cfg.resume, cfg.out = True, out
    notes, refused = [], []
    for name, value in given.items():
        old = getattr(cfg, name)
        if name in ("resume", "out") or value == old:
            continue
        if name not in RESUME_OVERRIDES:
            refused.append(f"--{name.replace('_', '-')}")
            continue
        setattr(cfg, name, value)
        notes.append(f"--{name.replace('_', '-')} {value} (was {old})")
    if refused:
        raise UserError(f"--resume continues {out} with the settings it was started with: {', '.join(refused)} "
                        f"cannot change (only the data location, the schedule, logging and hardware can); drop "
                        f"{'it' if len(refused) == 1 else 'them'}, or start a new run with another --out")
    if cfg.iters <= state["step"]:
        raise UserError(f"--iters {cfg.iters}: the run is already at step {state['step']}; pass a larger --iters")
    for name in ("data", "lr_dir", "val_data"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_dir():
            raise UserError(f"the run's {name.replace('_', ' ')} folder {getattr(cfg, name)} is missing: if it "
                            f"moved, pass --{name.replace('_', '-')} NEW_FOLDER")
    if world != world_before:
        notes.append(f"{world} process(es) instead of {world_before}: the same global batch ({cfg.batch}) and "
                     f"data order, but the processes' random streams differ from an uninterrupted run's")
    return cfg, notes


# ----------------------------------------------------------------------------------------------------------
# Stopping: signals, checkpoints at the end of a step, a partner's death, NaN


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
        print(f"\nreceived {signal.Signals(signum).name}: stopping after this step, which is then saved if "
              f"this process can", file=sys.stderr)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the main process (see Stopper): a signal to the whole process
    group must not kill them in the middle of a run."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def checkpoint_or_stop(step: int, cfg, env: Env, stop: Stopper, save) -> bool:
    """End of a step: save every ckpt_every steps, at the last step, and when any process was asked to stop;
    True means stop now (all processes agree)."""
    stopping = not env.all_true(not stop.requested)
    if step % cfg.ckpt_every == 0 or step == cfg.iters or stopping:
        save(step)
    return stopping


@dataclass
class Progress:
    """Where the loop stands: `done` is the last step whose every update finished; `clean` is False between the
    first and the last optimizer update of a step, when the networks belong to two different steps."""
    done: int
    clean: bool = True


def save_replica(e: BaseException, run: Path, progress: Progress, env: Env, save) -> None:
    """A partner died (`e`, a failed collective): save this process's replica of the run at the last finished step
    if its state is whole and newer than the last checkpoint, without collectives; raise PartnerLost saying what
    was done."""
    last = checkpoints(run)
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    if not progress.clean:
        raise PartnerLost(f"process {env.rank} lost its partner(s) ({why}) between two updates of step "
                          f"{progress.done + 1}, so its replica is not one step's state and is not saved; the last "
                          f"checkpoint is {last[-1] if last else 'none'}") from e
    if last and last[-1].name == f"step_{progress.done:08d}.pt":
        where = f"the last checkpoint, {last[-1]}, already holds its state"
    else:
        where = f"saved its replica of step {progress.done} as {save(progress.done, solo=True)}"
    raise PartnerLost(f"process {env.rank} lost its partner(s) ({why}); {where}: continue with --resume "
                      f"--out {run}") from e


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
    last = checkpoints(run)
    what = (f"resume from the last checkpoint ({last[-1].name}) with a lower learning rate (python train.py --out "
            f"{run} --resume --lr LR)" if last else
            "no checkpoint was saved before it, so start again with a lower --lr (and another --out)")
    raise NonFiniteLoss(f"non-finite loss at step {step} ({values}); the models and the batch are saved in "
                        f"{run}/nonfinite_step_{step:08d}_rank*.pt. To go on: {what}, or check the data")


def follow_schedule(sched, opt, cfg) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """metrics.jsonl, TensorBoard scalars and images, and progress (main process only): a tqdm bar on a terminal,
    else (batch jobs, nohup) a plain line every --log-every steps with the images per second, the ETA and the losses.

    A resumed run continues the same logs: rows and TensorBoard events after the checkpoint's step (logged before a
    kill) are dropped, and the wall time goes on from the checkpoint's `elapsed` seconds.
    """

    def __init__(self, run: Path, cfg, env: Env, start: int, elapsed: float = 0.0):
        self.env, self.cfg, self.file, self.tb, self.bar = env, cfg, None, None, None
        self.t0 = time.perf_counter() - elapsed
        self.last = (start, time.perf_counter())                            # (step, time) of the last progress line
        if not env.main:
            return
        run.mkdir(parents=True, exist_ok=True)
        self.file = open(keep_rows_up_to(run / "metrics.jsonl", start), "a")
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
        if show:
            self.progress(step, values)

    def progress(self, step: int, values: dict) -> None:
        losses = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")}
        if self.bar is not None:
            self.bar.set_postfix(losses)
            return
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


def keep_rows_up_to(metrics: Path, start: int) -> Path:
    """Drop the rows of metrics.jsonl after step `start` (logged after the checkpoint a run resumes from, or cut
    short by a kill), rewriting the file atomically only if something goes."""
    if metrics.exists():
        lines = metrics.read_text().splitlines(keepends=True)
        kept = [line if line.endswith("\n") else line + "\n" for line in lines if logged_step(line) <= start]
        if kept != lines:
            with atomic_write(metrics, "w") as f:
                f.writelines(kept)
    return metrics


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl row; infinity for a line cut short by a kill (so it is dropped on resume)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def one_line(e: BaseException) -> str:
    """A UserError raised in a DataLoader worker arrives wrapped in the worker's traceback: keep its message."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return re.sub(r"^[\w.]*(UserError|CheckpointError): ", "", lines[-1])
    return " ".join(lines)
