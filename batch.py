"""Upscale whole collections with GLEAN on Ray Data: a laptop, or a cluster of machines, with the same command.

    python batch.py -i photos/ -o out/                           # a local Ray instance sized to this machine
    python batch.py -i list.txt -o out/ -m glean_face_16x --batch 8
    ray start --head                                             # on one machine; on the others:
    ray start --address HEAD:6379                                #   (each with this package installed)
    python batch.py -i /shared/photos -o /shared/out --address HEAD:6379 --workers 8

Inputs: a folder (searched recursively) or a text file listing image paths, one a line (relative paths are taken
from the list's folder). Each image gets the output `python infer.py -i SRC -o DST` would write for it: the same
name (the folder structure kept, `_glean` appended), the same handling of its size, faces, alpha, greyscale and
16 bits, the same bytes (in bf16, up to bf16 rounding, 1-2/255, where a worker's batch groups images differently
from infer.py's `--batch`). `--precision` is infer.py's (auto: bf16 where the driver's CPU has bf16 instructions,
else fp32), resolved once by the driver so that every worker runs the same. Each worker (a Ray actor) loads the
model once and runs one forward per batch of `--batch` images; outputs are written atomically where every worker
can reach them (a shared folder on a cluster).

The manifest (DST/batch_manifest.jsonl, one JSON object a line) records each input: path, size, mtime, output
path, the model's sha256, the precision, the status and the worker (host:pid, Ray node id). A second run skips what
is done (same size, mtime, model and precision, output still there), so a killed run resumes where it stopped. A
file that cannot be read or written is one line naming it and a manifest row, never a failed job; the exit code is 1
if any file failed.

Ray Data's own tasks (feeding the workers, collecting results) need CPU besides the workers: one CPU per machine
is kept free of model workers, so a 2-core machine does not stall.
"""
import argparse
import itertools
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from PIL import Image

import glean_fast
import infer
import zoo
from glean_io import CheckpointError, one_line, remove_killed_temp, sha256_of
from images import IMAGE_EXTS, InputError

MANIFEST = "batch_manifest.jsonl"
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------
# A worker: infer.py's Run over one batch, reporting what happened to each file


class FileReport(infer.Run):
    """infer.Run for one batch on a worker: the same reading, model calls and writing, with each file's outcome
    and notes recorded (for the manifest) instead of only printed."""

    def __init__(self, args, model, names: dict):
        super().__init__(args, model, None, NamedOutputs(names), round(args.max_megapixels * 1e6), 0)
        self.rows, self.lines = {}, []

    def say(self, kind: str, message: str) -> None:
        self.lines.append(f"{kind}: {one_line(message)}")

    def failure(self, src, message: str) -> None:
        super().failure(src, message)
        self.rows[str(src)] = {"status": "failed", "output": "", "error": one_line(message)}

    def success(self, src, dst) -> None:
        super().success(src, dst)
        self.rows[str(src)] = {"status": "done", "output": str(dst), "error": ""}


class NamedOutputs(infer.Outputs):
    """The output names the driver gave out (as infer.Outputs gives them over the whole run), with the extension
    the image itself needs (infer.output_ext: a JPEG with alpha becomes a PNG, ...)."""

    def __init__(self, names: dict):
        super().__init__(Path(), "")
        self.names = names                                   # input path -> output path without its extension

    def path(self, src, root, ext, notes, suffix=None) -> Path:
        return Path(self.names[str(src)] + ext)


class Upscaler:
    """A Ray actor: loads the model once, then upscales batches {"input", "root", "name"} -> manifest rows."""

    def __init__(self, model: str, argv: list, threads: int, precision: str = "fp32"):
        import torch
        torch.set_num_threads(threads)
        self.args = infer.build_parser().parse_args(argv)
        self.model = infer.load_model(model, "cpu", precision, notes=[])  # the driver says if it runs emulated
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        import ray
        self.node = ray.get_runtime_context().get_node_id()   # Ray's id of the machine (hostnames can repeat)

    def __call__(self, batch: dict) -> dict:
        srcs = [str(s) for s in batch["input"]]
        names = dict(zip(srcs, (str(n) for n in batch["name"])))
        roots = [Path(str(r)) if str(r) else None for r in batch["root"]]
        self.args.batch = len(srcs)                          # one forward for the whole batch
        run = FileReport(self.args, self.model, names)
        try:
            for src, root in zip(srcs, roots):
                run.read(Path(src), root)
            run.flush()
        except Exception as e:   # an unexpected failure of the batch: each file's row says so, the job goes on
            message = f"{type(e).__name__}: {one_line(str(e))}"
            for src in srcs:
                run.rows.setdefault(src, {"status": "failed", "output": "", "error": f"{src}: {message}"})
        rows = [run.rows.get(s, {"status": "failed", "output": "", "error": f"{s}: not processed"}) for s in srcs]
        return {"input": srcs, "status": [r["status"] for r in rows], "output": [r["output"] for r in rows],
                "error": [r["error"] for r in rows], "worker": [self.worker] * len(srcs),
                "node": [self.node] * len(srcs), "lines": ["\n".join(run.lines)] + [""] * (len(srcs) - 1)}


# ----------------------------------------------------------------------------------------------------------
# The driver: inputs, names, manifest


def list_inputs(src: str, outdir: Path) -> tuple:
    """(files as (path, root), problems, notes): a folder through infer.collect, or a text file of paths."""
    p = Path(src)
    if p.is_file() and p.suffix.lower() not in IMAGE_EXTS:
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            return [], [f"{p}: cannot read this list of images ({e})"], []
        paths = [str(p.parent / line.strip()) for line in lines if line.strip() and not line.startswith("#")]
        if not paths:
            return [], [f"{p}: lists no images (one path a line)"], []
        return infer.collect(paths, outdir)
    return infer.collect([src], outdir)


def output_names(files: list, args) -> dict:
    """Each input's output path without its extension, given out in input order by infer.Outputs as infer.py
    does, so that inputs of the same name get the same distinct names as there."""
    outputs, names = infer.Outputs(Path(args.output), args.suffix), {}
    for src, root in files:
        ext = infer.output_ext(src, args.ext, 8, 3, [])
        dst = str(outputs.path(src, root, ext, []))
        names[str(src)] = dst[:-len(ext)]
    return names


def stat_of(path) -> dict:
    """Size and mtime of a file ({} if it is gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_manifest(path: Path) -> dict:
    """input path -> its last row (a damaged line, e.g. cut by a kill, is skipped)."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["input"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def is_done(row: dict | None, src: str, model_sha256: str, precision: str = "fp32") -> bool:
    """Whether the manifest says src was done by this model in this precision, and neither it nor its output
    changed since."""
    if not row or row.get("status") != "done" or row.get("model_sha256") != model_sha256:
        return False
    if row.get("precision", "fp32") != precision:
        return False
    same = {k: row.get(k) for k in ("size", "mtime_ns")} == stat_of(src)
    return same and Path(row.get("output", "")).is_file()


def model_sha256(name: str) -> str:
    return sha256_of(zoo.weights_file(name) if name in zoo.WEIGHTS else Path(name))


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", required=True, help="a folder of images (recursive) or a text file of paths")
    ap.add_argument("-o", "--output", required=True, help="output folder (shared by all machines on a cluster)")
    ap.add_argument("-m", "--model", default="", help=f"registered model ({', '.join(zoo.WEIGHTS)}), a checkpoint "
                                                       f"file or an ONNX file of export.py (default: "
                                                       f"{zoo.DEFAULT_MODEL})")
    ap.add_argument("--address", help="join this Ray cluster (HOST:PORT, or auto); default: a local Ray instance")
    ap.add_argument("--batch", type=int, default=8, help="images per forward pass (default: 8)")
    ap.add_argument("--workers", type=int, default=0,
                    help="model workers (each loads the model once; default: one per machine)")
    ap.add_argument("--start-timeout", type=int, default=600, metavar="S",
                    help="seconds the workers may take to start (each loads the model) before the run stops in "
                         "one line; work begins once all have started, so every machine takes a share "
                         "(default: 600)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (default: the cluster's CPUs / workers)")
    ap.add_argument("--precision", choices=["auto", *glean_fast.PRECISIONS], default="auto",
                    help="the convolutions' precision, as infer.py's (default: auto, resolved on this machine)")
    ap.add_argument("--suffix", default="_glean", help="appended to each output name (default: _glean)")
    ap.add_argument("--ext", default="auto", help="output format: auto (as the input), png, jpg, ... (default: auto)")
    return ap


def check_args(args) -> str:
    name = args.model or zoo.DEFAULT_MODEL
    return (f"unknown model '{name}': choose one of {', '.join(zoo.WEIGHTS)}, or give a checkpoint or ONNX file"
            if name not in zoo.WEIGHTS and not Path(name).is_file() else
            f"--batch must be at least 1, got {args.batch}" if args.batch < 1 else
            f"--workers must be >= 0, got {args.workers}" if args.workers < 0 else
            f"--threads must be >= 0, got {args.threads}" if args.threads < 0 else
            f"--start-timeout must be at least 1 s, got {args.start_timeout}" if args.start_timeout < 1 else
            f"-i {args.input}: no such file or folder" if not Path(args.input).exists() else "")


def start_ray(address: str | None, start_timeout: int = 600):
    """Join a cluster, or start a local instance sized to this machine; workers import this checkout's modules."""
    import ray
    env = {} if (ROOT / "glean_sr" / "infer.py").is_file() else {
        "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}}
    ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="ERROR",
             **({} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False                                    # batch.py prints its own progress
    ctx.wait_for_min_actors_s = start_timeout     # work starts once every worker has its model: all share it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)   # not "Progress bars disabled"
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)  # a stack trace the exception repeats
    return ray


def plan(ray, args) -> tuple:
    """(workers, CPUs reserved per worker, torch threads per worker): one CPU per machine is left to Ray Data."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    total = sum(n["Resources"]["CPU"] for n in nodes)
    workers = args.workers or len(nodes)
    cpus = max(0.5, (total - len(nodes)) / workers)
    threads = args.threads or max(1, round(total / workers))
    return workers, cpus, threads


def worker_batches(ray, ds, args, workers: int, cpus: float):
    """The batches of ds as they come, once all its workers have started (Ray Data waits for them at the first
    batch, start_ray); workers that do not start within --start-timeout are a one-line InputError."""
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        first = next(batches, None)
    except ray.exceptions.GetTimeoutError:
        raise InputError(f"the cluster did not start {workers} worker(s) of {cpus:g} CPU(s) each within "
                         f"{args.start_timeout} s (--start-timeout); lower --workers or add machines") from None
    return itertools.chain([] if first is None else [first], batches)


def run_batch(args, files: list, todo: list, sha: str, manifest: Path, precision: str = "fp32") -> int:
    """Upscale `todo` on Ray Data, append a manifest row per file as results come in; returns the failures."""
    ray = start_ray(args.address, args.start_timeout)
    workers, cpus, threads = plan(ray, args)
    argv = ["-i", "-", "-o", args.output, "--suffix", args.suffix, "--ext", args.ext]
    names = output_names(files, args)
    stats = {str(s): stat_of(s) for s, _ in todo}            # as read, before the run: a later change is redone
    items = [{"input": str(s), "root": str(r) if r is not None else "", "name": names[str(s)]} for s, r in todo]
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // args.batch))   # a block per batch
    ds = ds.map_batches(Upscaler, batch_size=args.batch, batch_format="numpy", num_cpus=cpus,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_kwargs={"model": args.model or zoo.DEFAULT_MODEL, "argv": argv,
                                               "threads": threads, "precision": precision})
    print(f"{len(todo)} image(s) to do on {workers} worker(s) ({threads} threads each)", file=sys.stderr)
    done = failed = 0
    started = time.time()
    with open(manifest, "a") as log:
        for out in worker_batches(ray, ds, args, workers, cpus):
            for text in out["lines"]:
                for line in filter(None, str(text).splitlines()):
                    print(line, file=sys.stderr)
            for src, status, dst, error, worker, node in zip(out["input"], out["status"], out["output"],
                                                             out["error"], out["worker"], out["node"]):
                row = {"input": str(src), **stats[str(src)], "output": str(dst), "model_sha256": sha,
                       "precision": precision, "status": str(status), "error": str(error), "worker": str(worker),
                       "node": str(node), "time": time.time()}
                log.write(json.dumps(row) + "\n")
                failed += status != "done"
                done += 1
            log.flush()
            os.fsync(log.fileno())
            rate = done / max(time.time() - started, 1e-9)
            print(f"{done}/{len(todo)} files, {rate:.2f} images/s", file=sys.stderr)
    ray.shutdown()
    # the partial files of workers killed during this run (a retried batch has written its own since)
    remove_killed_temp(Path(args.output), time.time(), tuple(Image.registered_extensions()))
    return failed


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if check_args(args):
        print(f"error: {check_args(args)}", file=sys.stderr)
        return 2
    outdir, started = Path(args.output), time.time()
    try:
        notes = infer.prepare_output(outdir, started)
    except OSError as e:
        print(f"error: cannot write to output folder {outdir} ({e.strerror or e}); choose another with -o",
              file=sys.stderr)
        return 2
    files, problems, found = list_inputs(args.input, outdir)
    for line in [f"error: {one_line(p)}" for p in problems] + [f"note: {one_line(n)}" for n in notes + found]:
        print(line, file=sys.stderr)
    manifest = outdir / MANIFEST
    name, cpu = args.model or zoo.DEFAULT_MODEL, infer.torch.device("cpu")
    onnx = name.lower().endswith(".onnx")                    # runs as exported (fp32), whatever auto would pick
    precision, note = ("fp32", "") if onnx and args.precision == "auto" else glean_fast.choose_precision(
        args.precision, cpu)
    try:              # loaded here once: a bad model is one line, and a registered one is downloaded only once
        infer.load_model(name, "cpu", precision, notes=[])
        sha = model_sha256(name)
    except (CheckpointError, InputError, ValueError, OSError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(glean_fast.precision_line(args.precision, precision, cpu) + (f"; note: {note}" if note else ""),
          file=sys.stderr)
    rows = read_manifest(manifest)
    todo = [(s, r) for s, r in files if not is_done(rows.get(str(s)), str(s), sha, precision)]
    if len(todo) < len(files):
        print(f"note: {len(files) - len(todo)} of {len(files)} image(s) done by an earlier run (see {manifest})",
              file=sys.stderr)
    try:
        failed = run_batch(args, files, todo, sha, manifest, precision) if todo else 0
    except InputError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    bad = failed + len(problems)
    print(one_line(f"{len(files) - failed} of {len(files)} image(s) done in {outdir}" +
                   (f"; {bad} problem(s), see above and {manifest}" if bad else "")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
