"""Inference benchmark: seconds per image, FLOPs, achieved GFLOP/s against a conv peak measured in the same run,
and peak memory, for the official configurations with random weights, on the fast path (glean_fast.GLEANFast, what
infer.py, demo.py and torch.hub use) and on the reference path (glean.GLEAN, the paper written out), so the gain of
the fast path's machinery is visible. With --train: training iterations per second.

    python bench.py                       # CPU: cat 8x (32->256), ffhq 16x (64->1024), the shipped 8 -> 64 model
    python bench.py --device cuda --amp   # also on a GPU, in fp16/bf16 autocast
    python bench.py --train               # train.py's loop: the small built-in face config and official cat 8x
    python bench.py --onnx                # the fast path and onnxruntime (export.py's file), interleaved

Each configuration runs in a fresh subprocess, so peak RSS is that of one model and one image. Before timing, the
golden case (tests/data) is checked against the official output. FLOPs are counted by torch's FlopCounterMode
(2 per multiply-add, as in the official timing files) on one forward without the strip recomputation.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
CONFIGS = {  # official constructor kwargs (tests/data/manifest_*.json); "shipped": the default model, its weights;
    "cat_8x": dict(in_size=32, out_size=256),           # "faces": infer.py --faces (the offline models, 4x) on a
    "ffhq_16x": dict(in_size=64, out_size=1024),        # 640x480 scene with faces of 12-46 px; "faces_4mp": 8x of a
    "shipped": None,                                    # 2304x1728 photo (4 megapixels in, 255 out): peak memory
    "faces": None,
    "faces_4mp": None,
}
FACE_SCENES = {"faces": ((24, 28, 40, 48, 52, 96), 640, 480, 4),            # head sides (face box ~0.48 x), size,
               "faces_4mp": ((24, 32, 48, 64, 96, 192, 384), 2304, 1728, 8)}  # scale
OFFICIAL = {"cat_8x": "timing_glean_cat_8x.json", "ffhq_16x": "timing_glean_ffhq_16x.json"}


def max_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM). Unlike getrusage's ru_maxrss it does not inherit the
    parent's peak across fork + exec, and it falls back to ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def conv_peak(device, dtype=torch.float32, repeats=5) -> tuple:
    """Best GFLOP/s of large 3x3 convolutions (NHWC): the machine's practical conv peak."""
    best = (0.0, None)
    for c, hw in [(512, 64), (512, 32), (256, 128), (1024, 32)]:
        x = torch.randn(1, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, device=device, dtype=dtype)
        F.conv2d(x, w, padding=1)
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            F.conv2d(x, w, padding=1)
            sync(device)
            gflops = 2 * c * c * 9 * hw * hw / (time.perf_counter() - t) / 1e9
            best = max(best, (gflops, f"conv3x3 {c}->{c} at {hw}x{hw}"), key=lambda b: b[0])
    return best


def golden_error(path: str = "fast") -> float:
    import glean
    import glean_fast
    meta = json.loads((ROOT / "tests/data/golden_in16_out64.json").read_text())
    cfg = glean.GLEANConfig(**meta["constructor_kwargs"], channel_base=64)
    cls = glean_fast.GLEANFast if path == "fast" else glean.GLEAN
    model = cls.from_official(ROOT / "tests/data/golden_in16_out64_ckpt.pth", cfg)
    io = torch.load(ROOT / "tests/data/golden_in16_out64_io.pt", weights_only=True)
    with torch.no_grad():
        return (model(io["input"]) - io["output"]).abs().max().item()


def run_faces(name: str, repeats: int) -> dict:
    """infer.py --faces (the offline face models, each face to the one that fits it) on faces.face_scene: the
    public-domain astronaut's head at several sizes on scikit-image's rocket picture, 8-bit output as the command
    line writes it; seconds per stage, median over the repeats after a warm-up, and the process's peak memory."""
    import numpy as np
    import faces
    import infer
    sizes, width, height, scale = FACE_SCENES[name]
    scene, placed = faces.face_scene(sizes, width, height)
    rss_scene = max_rss_mib()
    run = lambda times: infer.restore_faces(None, scene, outscale=scale, notes=[], times=times, reports=reports,  # noqa
                                            dtype=np.uint8)
    reports = []
    run({})                                                    # warm-up (and the models' weights loaded)
    runs = []
    for _ in range(repeats):
        times, reports = {}, []
        t = time.perf_counter()
        run(times)
        runs.append({**times, "total": time.perf_counter() - t})
    return {"config": name, "path": "fast", "device": "cpu", "faces": len(placed), "size": [width, height],
            "scale": scale, "restored": sum(r.restored for r in reports),
            "median_s": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
            "times_s": [round(r["total"], 4) for r in runs],
            "maxrss_MiB": {"scene": rss_scene, "after_forward": max_rss_mib()}}


def run_one(name: str, device: str, repeats: int, amp: bool, batch: int = 1, path: str = "fast") -> dict:
    """Runs in its own process: build, warm up, time, count FLOPs."""
    if name in FACE_SCENES:
        return run_faces(name, 2 if name == "faces_4mp" else repeats)
    rss_import = max_rss_mib()
    import glean
    import glean_fast
    import zoo
    dev = torch.device(device)
    torch.manual_seed(0)
    t = time.perf_counter()
    cls = glean_fast.GLEANFast if path == "fast" else glean.GLEAN
    if CONFIGS[name] is None:       # the model that ships with the code, loaded from disk like infer.py does
        model = zoo.load_pretrained(zoo.DEFAULT_MODEL, fast=path == "fast").to(dev)
    else:
        model = cls(glean.GLEANConfig(**CONFIGS[name])).eval().to(dev)
    load_s, cfg = time.perf_counter() - t, model.cfg
    rss_build = max_rss_mib()
    x = torch.rand(batch, 3, cfg.in_size, cfg.in_size, device=dev) * 2 - 1
    dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if amp else torch.no_grad
    with torch.no_grad(), ctx():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            sync(dev)
            t = time.perf_counter()
            y = model(x)
            sync(dev)
            times.append(time.perf_counter() - t)
    assert y.shape == (batch, 3, cfg.out_size, cfg.out_size) and torch.isfinite(y).all()
    rss = {"after_import": rss_import, "after_build": rss_build, "after_forward": max_rss_mib()}
    out = {"config": name, "path": path, "device": device, "amp": amp, "batch": batch, "load_s": load_s,
           "times_s": [round(t, 4) for t in times],
           "median_s": statistics.median(times), "maxrss_MiB": rss}
    if dev.type == "cuda":
        out["cuda_peak_allocated_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    from torch.utils.flop_counter import FlopCounterMode
    model.strip_elems = 0  # count the network's FLOPs, not the strips' halo recomputation (fast path)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    out["flops"] = counter.get_total_flops()
    out["conv_peak_gflops"], out["conv_peak_op"] = conv_peak(dev, dtype if amp else torch.float32)
    return out


def large_activation_weights_(model, gain: float = 1.6, seed: int = 1):
    """Random weights that make large activations (outputs with std ~10): N(0, 1) gain / sqrt(fan_in) for the
    encoder and decoder, N(0, 1) for the bank's (equalized-lr) weights, 0.1 N(0, 1) for biases and noise strengths,
    N(0, 1) noise maps. Rounding errors grow with the activations: a hard case for float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                std = 1.0 if n.startswith("bank.") else gain / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if "injected_noise" in n:
                b.copy_(torch.randn(b.shape, generator=g))
    return model


def precision(name: str) -> dict:
    """Both paths' float32 error against the reference path run in float64, with large-activation weights."""
    import glean
    import glean_fast
    cfg = glean.GLEANConfig(**CONFIGS[name])
    ref = large_activation_weights_(glean.GLEAN(cfg).eval())
    x = torch.rand(1, 3, cfg.in_size, cfg.in_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        y32 = ref(x).double()
        fast = glean_fast.fast(ref)
        yf = fast(x).double()
        del fast
        ref = ref.double()
        y64 = ref(x.double())
    return {"config": name, "output_std": y64.std().item(), "reference_fp32": (y32 - y64).abs().max().item(),
            "fast_fp32": (yf - y64).abs().max().item()}


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement (VmHWM) in this process (Linux: 5 to /proc/self/clear_refs); False where
    it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_onnx(name: str, repeats: int) -> dict:
    """Runs in its own process: the fast path and onnxruntime (the model exported by export.py, CPU execution
    provider, all graph optimisations, as many intra-op threads as torch has) on the same weights and input,
    interleaved forward by forward. Peak RSS is measured per forward (reset before each), so it holds both models'
    weights; `rise` is the peak above the resident memory just before the forward: the forward's working memory."""
    import export
    import glean
    import glean_fast
    import zoo
    torch.manual_seed(0)
    model = (zoo.load_pretrained(zoo.DEFAULT_MODEL) if CONFIGS[name] is None else
             glean_fast.GLEANFast(glean.GLEANConfig(**CONFIGS[name])).eval())
    cfg = model.cfg
    t = time.perf_counter()
    runner = export.OnnxGLEAN(export.to_onnx(model, name=name), "cpu")
    export_s = time.perf_counter() - t
    x = torch.rand(1, 3, cfg.in_size, cfg.in_size) * 2 - 1
    runs = {"fast": model, "onnxruntime": runner}
    times, peaks, rises = ({k: [] for k in runs} for _ in range(3))
    with torch.no_grad():
        out = {k: f(x) for k, f in runs.items()}                              # warm-up
        for _ in range(repeats):
            for k, f in runs.items():
                before = max_rss_mib() if reset_peak_rss() else float("nan")  # VmHWM = VmRSS right after a reset
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
                peaks[k].append(max_rss_mib())
                rises[k].append(peaks[k][-1] - before)
    from torch.utils.flop_counter import FlopCounterMode
    model.strip_elems = 0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    peak, op = conv_peak(torch.device("cpu"))
    return {"config": name, "export_s": export_s, "flops": counter.get_total_flops(), "conv_peak_gflops": peak,
            "conv_peak_op": op, "max_abs_diff": (out["fast"] - out["onnxruntime"]).abs().max().item(),
            "output_std": out["fast"].std().item(),
            **{k: {"times_s": [round(v, 4) for v in times[k]], "median_s": statistics.median(times[k]),
                   "peak_rss_MiB": max(peaks[k]), "rise_MiB": max(rises[k])} for k in runs}}


def bench_onnx(names, repeats: int, threads, results: list) -> None:
    """--onnx: run_onnx for each configuration in a fresh process; one line per runtime."""
    for name in names:
        cmd = [sys.executable, __file__, "--_onnx", name, "--repeats", str(repeats)]
        cmd += ["--threads", str(threads)] if threads else []
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results.append(r)
        print(f"{name:9s} exported in {r['export_s']:.1f} s; onnxruntime vs fast path max abs difference "
              f"{r['max_abs_diff']:.1e} (output std {r['output_std']:.2f})")
        for k in ("fast", "onnxruntime"):
            m = r[k]["median_s"]
            gflops = r["flops"] / m / 1e9
            print(f"{'':9s} {k:11s} {m:.4f} s/image (runs {r[k]['times_s']}), {gflops:.1f} GFLOP/s = "
                  f"{100 * gflops / r['conv_peak_gflops']:.0f}% of conv peak {r['conv_peak_gflops']:.1f} GFLOP/s; "
                  f"peak RSS {r[k]['peak_rss_MiB']:.0f} MiB (both models loaded; the forward's rise "
                  f"{r[k]['rise_MiB']:.0f} MiB)")


def onnx_cli(args) -> None:
    """--onnx (each configuration in a fresh process: --_onnx)."""
    if args._onnx:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_onnx(args._onnx, args.repeats)))
        return
    names = [n for n in args.configs if n not in FACE_SCENES]
    names = ["cat_8x", "ffhq_16x"] if names == [n for n in CONFIGS if n not in FACE_SCENES] else names
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, CPU; fast path vs "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    results = []
    bench_onnx(names, args.repeats, args.threads, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


TRAIN_CONFIGS = {  # name: (GLEANConfig kwargs, batch, steps)
    "small_8x": (dict(in_size=8, out_size=64, style_channels=96, channel_multiplier=1, channel_base=96,
                      rrdb_channels=32, num_rrdbs=3, rrdb_growth_channels=16), 16, 12),
    "cat_8x": (dict(in_size=32, out_size=256), 2, 4),
}


def bench_train(names, device: str, threads) -> None:
    """Time train.py's real loop (data, G and D steps, Eq. 5-9 with a VGG16 perceptual term) on synthetic images
    with random bank and VGG weights; the first two steps are warm-up."""
    import tempfile
    import numpy as np
    from PIL import Image
    import glean
    import stylegan2
    import torchvision
    import weight_formats
    for name in names:
        kwargs, batch, steps = TRAIN_CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "data").mkdir()
            rng = np.random.default_rng(0)
            for i in range(max(8, batch)):
                Image.fromarray(rng.integers(0, 255, (kwargs["out_size"],) * 2 + (3,), dtype=np.uint8)).save(
                    tmp / "data" / f"{i}.png")
            cfg = glean.GLEANConfig(**kwargs)
            weight_formats.save_generator(stylegan2.Generator(cfg.bank_config()), tmp / "bank.pt")
            torch.save({f"features.{k}": v for k, v in torchvision.models.vgg16().features[:22].state_dict().items()},
                       tmp / "vgg.pt")
            model = {k: v for k, v in kwargs.items() if k not in ("in_size", "out_size")}
            cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(tmp / "data"), "--out-size",
                   str(cfg.out_size), "--scale", str(cfg.scale), "--model", json.dumps(model), "--bank",
                   str(tmp / "bank.pt"), "--vgg-weights", str(tmp / "vgg.pt"), "--batch", str(batch), "--iters",
                   str(steps), "--log-every", "1", "--workers", "1", "--out", str(tmp / "run"), "--no-tensorboard",
                   "--ckpt-every", "100000"] + (["--device", device] if device else [])
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            rows = [json.loads(line) for line in (tmp / "run/metrics.jsonl").read_text().splitlines()]
            t = [r["time"] for r in rows if "loss/g" in r]
            per_step = (t[-1] - t[1]) / (len(t) - 2)
            print(f"train {name:9s} {kwargs['in_size']}->{kwargs['out_size']}, batch {batch}: "
                  f"{1 / per_step:.3f} it/s ({per_step:.2f} s/it, {batch / per_step:.1f} images/s) "
                  f"on {device or 'cpu'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="images per forward (seconds are reported per image)")
    ap.add_argument("--paths", nargs="+", default=["fast", "reference"], choices=["fast", "reference"],
                    help="fast: glean_fast.GLEANFast (the default everywhere); reference: glean.GLEAN")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--train", action="store_true", help="benchmark train.py's loop instead of inference")
    ap.add_argument("--precision", action="store_true", help="instead of timing: both paths' float32 error against "
                                                             "the reference in float64 (large activations)")
    ap.add_argument("--onnx", action="store_true", help="the fast path against onnxruntime (export.py's file, CPU), "
                                                        "interleaved in one process (default configs: cat_8x "
                                                        "ffhq_16x)")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    ap.add_argument("--_onnx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.onnx or args._onnx:
        return onnx_cli(args)
    if args.train:
        bench_train(list(TRAIN_CONFIGS), "" if args.device == "cpu" else args.device, args.threads)
        return
    if args.precision:
        for name in (n for n in args.configs if CONFIGS[n] is not None):
            r = precision(name)
            print(f"{name:9s} max abs error vs float64 (output std {r['output_std']:.1f}): reference path (NCHW) "
                  f"{r['reference_fp32']:.2e}, fast path (NHWC, strips) {r['fast_fp32']:.2e} "
                  f"({r['fast_fp32'] / r['reference_fp32']:.1f}x)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._one:
        print(json.dumps(run_one(args._one, args.device, args.repeats, args.amp, args.batch, args.paths[0])))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, cuDNN TF32 for fp32 convs: "
             f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'})" if args.device.startswith("cuda") else ""))
    print("golden case max abs error vs official: " + ", ".join(f"{p} path {golden_error(p):.2e}" for p in args.paths))
    import zoo
    results = []
    for name, path in ((n, p) for n in args.configs for p in args.paths):
        cmd = [sys.executable, __file__, "--_one", name, "--device", args.device, "--repeats", str(args.repeats),
               "--batch", str(args.batch), "--paths", path]
        cmd += ["--amp"] * args.amp + (["--threads", str(args.threads)] if args.threads else [])
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results.append(r)
        if name in FACE_SCENES:
            if path == args.paths[0]:
                m, (w, h) = r["median_s"], r["size"]
                print(f"{name:9s} {m['total']:.3f} s per {w}x{h} scene, {r['faces']} faces ({r['restored']} "
                      f"restored), {r['scale']}x to {w * r['scale']}x{h * r['scale']} (runs {r['times_s']}): " +
                      ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in m.items() if k != "total") +
                      f"; peak RSS {r['maxrss_MiB']['after_forward']:.0f} MiB "
                      f"(the scene made: {r['maxrss_MiB']['scene']:.0f})")
            continue
        gflops = r["flops"] / r["median_s"] / 1e9
        mem = (f"peak RSS {r['maxrss_MiB']['after_forward']:.0f} MiB (import {r['maxrss_MiB']['after_import']:.0f}, "
               f"built {r['maxrss_MiB']['after_build']:.0f})")
        if "cuda_peak_allocated_MiB" in r:
            mem += f", CUDA peak allocated {r['cuda_peak_allocated_MiB']:.0f} MiB"
        batch = f"batch {args.batch}, " if args.batch > 1 else ""
        print(f"{name:9s} {path:9s} {r['median_s'] / args.batch:.4f} s/image ({batch}runs {r['times_s']}), "
              f"{r['flops'] / 1e9:.1f} GFLOPs, {gflops:.1f} GFLOP/s = "
              f"{100 * gflops / r['conv_peak_gflops']:.0f}% of conv peak "
              f"{r['conv_peak_gflops']:.1f} GFLOP/s ({r['conv_peak_op']}); {mem}")
        if path != args.paths[-1]:
            continue
        if name in OFFICIAL:
            official = json.loads((ROOT / "tests/data" / OFFICIAL[name]).read_text())
            print(f"{'':9s} official on its reference 2-core machine: {official['median_s']:.2f} s/image, "
                  f"{official['flops_total_FlopCounterMode'] / 1e9:.1f} GFLOPs, peak RSS "
                  f"{official['maxrss_MiB']['after_forward']:.0f} MiB")
        else:
            print(f"{'':9s} {zoo.DEFAULT_MODEL}: loaded from disk in {r['load_s']:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
