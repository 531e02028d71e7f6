"""Inference benchmark: seconds per image, FLOPs, achieved GFLOP/s against a conv peak measured in the same run,
and peak memory, for the official configurations with random weights, on the fast path (glean_fast.GLEANFast, what
infer.py, demo.py and torch.hub use) and on the reference path (glean.GLEAN, the paper written out), so the gain of
the fast path's machinery is visible. With --train: training iterations per second.

    python bench.py                       # CPU: cat 8x (32->256), ffhq 16x (64->1024), the shipped 8 -> 64 model
    python bench.py --device cuda --amp   # also on a GPU, in fp16/bf16 autocast
    python bench.py --train               # train.py's loop: the small built-in face config and official cat 8x
    python bench.py --precision fp32 bf16 # the fast path in both precisions, interleaved (default: fp32 auto)
    python bench.py --precision-report    # fidelity of bf16 and fp16 against fp32 (README, "Precision")
    python bench.py --onnx                # the fast path (fp32, bf16) and onnxruntime (export.py's file), interleaved

Each configuration runs in a fresh subprocess, so peak RSS is that of one model and one image. Before timing, the
golden case (tests/data) is checked against the official output. FLOPs are counted by torch's FlopCounterMode
(2 per multiply-add, as in the official timing files) on one forward without the strip recomputation.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
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


def build(name: str, dev: torch.device, path: str, precision: str = "fp32"):
    """A configuration's model on the device, its convolutions in `precision` (the fast path; the reference path is
    float32 code): random weights from seed 0, the same for every precision, or the shipped model's."""
    import glean
    import glean_fast
    import zoo
    torch.manual_seed(0)
    if CONFIGS[name] is None:       # the model that ships with the code, loaded from disk like infer.py does
        model = zoo.load_pretrained(zoo.DEFAULT_MODEL, fast=path == "fast")
    else:
        model = (glean_fast.GLEANFast if path == "fast" else glean.GLEAN)(glean.GLEANConfig(**CONFIGS[name])).eval()
    if precision != "fp32":
        glean_fast.to_precision_(model, glean_fast.PRECISIONS[precision])
    return model.to(dev)


def time_interleaved(fns: dict, repeats: int, dev: torch.device) -> dict:
    """{label: seconds of each call} for callables run in turn (A, B, A, B, ...) after one warm-up call each, so
    that a busy or throttling machine slows them alike. Any callable compares: a precision of the fast path, another
    runtime's session."""
    for fn in fns.values():
        fn()
    times = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            times[label].append(time.perf_counter() - t)
    return times


def run_one(name: str, device: str, repeats: int, amp: bool, batch: int = 1, path: str = "fast",
            precisions=("fp32",), measure: bool = True) -> list:
    """Runs in its own process: build the model in each precision, warm up, time them interleaved, count FLOPs and
    measure each precision's conv peak (measure=False: peak memory only). One result per precision."""
    if name in FACE_SCENES:
        return [run_faces(name, 2 if name == "faces_4mp" else repeats)]
    import glean_fast
    rss_import = max_rss_mib()
    dev = torch.device(device)
    models, load_s = {}, {}
    for p in precisions:
        t = time.perf_counter()
        models[p] = build(name, dev, path, p)
        load_s[p] = time.perf_counter() - t
    cfg, rss_build = models[precisions[0]].cfg, max_rss_mib()
    x = torch.rand(batch, 3, cfg.in_size, cfg.in_size, device=dev, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dtype = torch.bfloat16 if dev.type == "cpu" else torch.float16
    ctx = (lambda: torch.autocast(dev.type, dtype=dtype)) if amp else torch.no_grad
    with torch.no_grad(), ctx():
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_interleaved({p: partial(m, x) for p, m in models.items()}, repeats, dev)
        y = models[precisions[-1]](x)
    assert y.shape == (batch, 3, cfg.out_size, cfg.out_size) and y.dtype == torch.float32 and torch.isfinite(y).all()
    rss = {"after_import": rss_import, "after_build": rss_build, "after_forward": max_rss_mib()}
    out = {"config": name, "path": path, "device": device, "amp": amp, "batch": batch, "maxrss_MiB": rss}
    if dev.type == "cuda":
        out["cuda_peak_allocated_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if measure:
        from torch.utils.flop_counter import FlopCounterMode
        model = models[precisions[0]]
        model.strip_elems = 0  # count the network's FLOPs, not the strips' halo recomputation (fast path)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        out["flops"] = counter.get_total_flops()
    results = []
    for p in precisions:
        r = dict(out, precision=p, load_s=load_s[p], times_s=[round(t, 4) for t in times[p]],
                 median_s=statistics.median(times[p]))
        if measure:
            r["conv_peak_gflops"], r["conv_peak_op"] = conv_peak(dev, dtype if amp else glean_fast.PRECISIONS[p])
        results.append(r)
    return results


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


def float64_error(name: str) -> dict:
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
    if glean_fast.choose_precision("auto", torch.device("cpu"))[0] == "bf16":     # the CPU has bf16 instructions
        runs["fast_bf16"] = glean_fast.to_precision_(copy.deepcopy(model), glean_fast.PRECISIONS["bf16"])
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
            "bf16_max_abs_diff": (out["fast"] - out["fast_bf16"]).abs().max().item() if "fast_bf16" in out else None,
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
        if r["bf16_max_abs_diff"] is not None:
            print(f"{'':9s} fast_bf16 vs fast path max abs difference {r['bf16_max_abs_diff']:.1e}")
        for k in (k for k in ("fast", "fast_bf16", "onnxruntime") if k in r):
            m = r[k]["median_s"]
            gflops = r["flops"] / m / 1e9
            share = (f"{m / r['fast']['median_s']:.2f}x the fp32 fast path's time" if k == "fast_bf16" else
                     f"{100 * gflops / r['conv_peak_gflops']:.0f}% of conv peak {r['conv_peak_gflops']:.1f} GFLOP/s")
            print(f"{'':9s} {k:11s} {m:.4f} s/image (runs {r[k]['times_s']}), {gflops:.1f} GFLOP/s = {share}; "
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


# ----------------------------------------------------------------------------------------------------------
# Fidelity of bf16 and fp16 against fp32 (--precision-report)

LFW_FACES = ROOT.parent / "shared/data/lfw_val_128/images"   # the project's validation faces (research data)
REPORT_ARCHS = {  # the official architectures (tests/data/manifest_*.json) with seeded random weights: images
    "cat_8x": (dict(in_size=32, out_size=256), 4), "cat_16x": (dict(in_size=16, out_size=256), 4),
    "ffhq_16x": (dict(in_size=64, out_size=1024), 2), "ffhq_in128_8x": (dict(in_size=128, out_size=1024), 1)}


def report_faces(size: int, n: int, folder=LFW_FACES) -> tuple:
    """n real faces [n, 3, size, size] in [-1, 1] and where they come from: the first n LFW validation faces
    (centre square, MATLAB bicubic) if the folder is there, else crops of scikit-image's public-domain astronaut
    (Eileen Collins, NASA) around her face, shifted and scaled a little."""
    from images import imresize
    if Path(folder).is_dir():
        import evaluate
        return evaluate.load_folder(folder, size, limit=n)[0], f"{n} LFW validation faces"
    from skimage import data
    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255          # [3, 512, 512]
    crops = []
    for k in range(n):
        d, side = 6 * (k % 3 - 1), 140 + 10 * (k // 3 % 3)                            # face box (45, 155, 140)
        top, left = 45 + d - (side - 140) // 2, 155 - d - (side - 140) // 2
        crops.append(imresize(photo[:, top:top + side, left:left + side], size=size))
    return torch.stack(crops).clamp(0, 1) * 2 - 1, f"{n} crops of the public-domain astronaut"


@torch.no_grad()
def outputs(model, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The model's float32 outputs for x [N, 3, in, in], `batch` images per forward."""
    return torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def fidelity(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """How far outputs y are from ref ([N, 3, H, W] in [-1, 1]) as 8-bit images: PSNR (mean and lowest over the
    images; evaluate.psnr) and the largest difference of one 8-bit value."""
    import evaluate
    p = evaluate.psnr(y, ref)
    diff = (evaluate.to_uint8_range(y) - evaluate.to_uint8_range(ref)).abs().max().item()
    return {"psnr_mean": p.mean().item(), "psnr_min": p.min().item(), "max_diff": int(diff),
            "finite": bool(torch.isfinite(y).all())}


def precision_fidelity(make, x: torch.Tensor, precisions=("bf16", "fp16")) -> dict:
    """{precision: fidelity of its outputs to fp32's} for a model builder make() -> float32 GLEANFast (each
    precision on a fresh copy of the same weights); a precision torch cannot run is reported with its error."""
    import glean_fast
    ref, out = outputs(make(), x), {}
    for p in precisions:
        try:
            out[p] = fidelity(outputs(glean_fast.to_precision_(make(), glean_fast.PRECISIONS[p]), x), ref)
        except (RuntimeError, NotImplementedError) as e:        # e.g. an op without a kernel for this dtype
            out[p] = {"error": str(e).splitlines()[0]}
    return out


def report_models(n: int, folder) -> list:
    """(name, weights, inputs, builder, x) for the precision report: every registered GLEAN available offline on
    real faces, the golden case (the official code's seeded weights) on its own inputs and faces, and the official
    architectures with seeded random weights."""
    import json as json_
    import glean
    import glean_fast
    import zoo
    rows = []
    for name, w in zoo.WEIGHTS.items():
        if w.kind.startswith("glean") and zoo.local_file(name) is not None:
            x, src = report_faces(w.config["in_size"], n, folder)
            rows.append((name, "trained", src, partial(zoo.load_pretrained, name), x))
    meta = json_.loads((ROOT / "tests/data/golden_in16_out64.json").read_text())
    cfg = glean.GLEANConfig(**meta["constructor_kwargs"], channel_base=64)
    faces, src = report_faces(cfg.in_size, n // 4, folder)
    golden = torch.load(ROOT / "tests/data/golden_in16_out64_io.pt", weights_only=True)["input"]
    rows.append(("golden in16_out64", "official code, seeded", f"its 2 inputs + {src}", partial(
        glean_fast.GLEANFast.from_official, ROOT / "tests/data/golden_in16_out64_ckpt.pth", cfg),
        torch.cat([golden, faces])))
    for name, (kwargs, count) in REPORT_ARCHS.items():
        cfg = glean.GLEANConfig(**kwargs)
        x, src = report_faces(cfg.in_size, count, folder)
        rows.append((f"{name} (official architecture)", "random, seed 0", src, partial(seeded, cfg), x))
    return rows


def seeded(cfg) -> "torch.nn.Module":
    import glean_fast
    torch.manual_seed(0)
    return glean_fast.GLEANFast(cfg).eval()


def precision_report(n: int, folder, precisions=("bf16", "fp16")) -> list:
    """Print and return the fidelity of each precision against fp32 for report_models (a markdown table)."""
    print("| model | weights | inputs | " + " | ".join(f"{p} vs fp32: PSNR mean (min), max diff" for p in precisions)
          + " |\n|" + " --- |" * (3 + len(precisions)))
    results = []
    for name, weights, src, make, x in report_models(n, folder):
        r = precision_fidelity(make, x, precisions)
        cells = [f"error: {v['error']}" if "error" in v else
                 f"{v['psnr_mean']:.1f} dB ({v['psnr_min']:.1f}), {v['max_diff']}/255" +
                 ("" if v["finite"] else ", not finite") for v in r.values()]
        print(f"| {name} | {weights} | {src} | " + " | ".join(cells) + " |", flush=True)
        results.append({"model": name, "weights": weights, "inputs": src, **r})
    return results


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="images per forward (seconds are reported per image)")
    ap.add_argument("--paths", nargs="+", default=["fast", "reference"], choices=["fast", "reference"],
                    help="fast: glean_fast.GLEANFast (the default everywhere); reference: glean.GLEAN")
    ap.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=["auto", "fp32", "bf16", "fp16"],
                    help="the fast path's precisions, timed interleaved in one process (the reference path runs fp32 "
                         "only); auto as infer.py picks it (default: fp32 auto)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--amp", action="store_true", help="autocast (bf16 on CPU, fp16 on CUDA)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--train", action="store_true", help="benchmark train.py's loop instead of inference")
    ap.add_argument("--float64-error", action="store_true", help="instead of timing: both paths' float32 error "
                                                                 "against the reference in float64 (large activations)")
    ap.add_argument("--precision-report", action="store_true",
                    help="instead of timing: 8-bit PSNR and largest difference of bf16 and fp16 against fp32, for "
                         "every offline registered model on real faces, the golden case and the official "
                         "architectures (seeded weights)")
    ap.add_argument("--report-images", type=int, default=64, help="faces per trained model in --precision-report")
    ap.add_argument("--faces-dir", type=Path, default=LFW_FACES,
                    help="--precision-report's faces (default: the LFW validation faces, if there; else crops of "
                         "the public-domain astronaut)")
    ap.add_argument("--onnx", action="store_true", help="the fast path (fp32, and bf16 where the CPU has it) against "
                                                        "onnxruntime (export.py's file, CPU), interleaved in one "
                                                        "process (default configs: cat_8x ffhq_16x)")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    ap.add_argument("--_onnx", help=argparse.SUPPRESS)
    ap.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    return ap


def main():
    args = build_parser().parse_args()
    if args.onnx or args._onnx:
        return onnx_cli(args)
    if args.train:
        bench_train(list(TRAIN_CONFIGS), "" if args.device == "cpu" else args.device, args.threads)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.float64_error:
        for name in (n for n in args.configs if CONFIGS[n] is not None):
            r = float64_error(name)
            print(f"{name:9s} max abs error vs float64 (output std {r['output_std']:.1f}): reference path (NCHW) "
                  f"{r['reference_fp32']:.2e}, fast path (NHWC, strips) {r['fast_fp32']:.2e} "
                  f"({r['fast_fp32'] / r['reference_fp32']:.1f}x)")
        return
    if args.precision_report:
        results = precision_report(args.report_images, args.faces_dir)
        auto_rule_check(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return
    if args._one:
        print(json.dumps(run_one(args._one, args.device, args.repeats, args.amp, args.batch, args.paths[0],
                                 args.precision, measure=not args._memory)))
        return
    bench_inference(args)


def auto_rule_check(results: list) -> None:
    """Whether the report supports --precision auto (glean_fast.AUTO_RULE): every trained model >= 50 dB."""
    trained = [r for r in results if r["weights"] == "trained"]
    for p in ("bf16", "fp16"):
        worst = min((r[p].get("psnr_mean", float("-inf")), r["model"]) for r in trained)
        print(f"auto rule: {p} keeps every trained model >= 50 dB from fp32: {'yes' if worst[0] >= 50 else 'NO'} "
              f"(lowest: {worst[1]}, {worst[0]:.1f} dB)")


def precisions_to_time(asked: list, device: str) -> list:
    """--precision resolved for the device (auto as infer.py picks it), each once, in order."""
    import glean_fast
    chosen = [glean_fast.choose_precision(p, torch.device(device))[0] for p in asked]
    return list(dict.fromkeys(chosen))


def bench_inference(args) -> None:
    """Each configuration and path in a fresh process (peak RSS of one model), its precisions timed interleaved;
    with several precisions, each one's peak RSS from a process of its own."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()}, cuDNN TF32 for fp32 convs: "
             f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'})" if args.device.startswith("cuda") else ""))
    print("golden case max abs error vs official: " + ", ".join(f"{p} path {golden_error(p):.2e}" for p in args.paths))
    precisions, results = precisions_to_time(args.precision, args.device), []
    for name, path in ((n, p) for n in args.configs for p in args.paths):
        ps = precisions if path == "fast" and name not in FACE_SCENES else ["fp32"]
        rs = run_subprocess(args, name, path, ps)
        if len(ps) > 1:
            for r in rs:
                r["maxrss_MiB"] = run_subprocess(args, name, path, [r["precision"]], memory=True)[0]["maxrss_MiB"]
        results += rs
        for r in rs:
            print_result(r, args, fp32=rs[0] if rs[0].get("precision") == "fp32" else None)
        if path == args.paths[-1] and name not in FACE_SCENES:
            print_official(name, rs[0])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def run_subprocess(args, name: str, path: str, precisions: list, memory: bool = False) -> list:
    cmd = [sys.executable, __file__, "--_one", name, "--device", args.device, "--repeats",
           "1" if memory else str(args.repeats), "--batch", str(args.batch), "--paths", path,
           "--precision", *precisions]
    cmd += ["--amp"] * args.amp + (["--threads", str(args.threads)] if args.threads else []) + ["--_memory"] * memory
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def print_result(r: dict, args, fp32: dict | None = None) -> None:
    """One line per configuration, path and precision: time, GFLOP/s as a share of that precision's conv peak, and
    peak memory; a bf16/fp16 line also its time as a fraction of fp32's (timed interleaved)."""
    name, path = r["config"], r["path"]
    if name in FACE_SCENES:
        m, (w, h) = r["median_s"], r["size"]
        print(f"{name:9s} {m['total']:.3f} s per {w}x{h} scene, {r['faces']} faces ({r['restored']} "
              f"restored), {r['scale']}x to {w * r['scale']}x{h * r['scale']} (runs {r['times_s']}): " +
              ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in m.items() if k != "total") +
              f"; peak RSS {r['maxrss_MiB']['after_forward']:.0f} MiB "
              f"(the scene made: {r['maxrss_MiB']['scene']:.0f})")
        return
    gflops, p = r["flops"] / r["median_s"] / 1e9, r["precision"]
    mem = (f"peak RSS {r['maxrss_MiB']['after_forward']:.0f} MiB (import {r['maxrss_MiB']['after_import']:.0f}, "
           f"built {r['maxrss_MiB']['after_build']:.0f})")
    if "cuda_peak_allocated_MiB" in r:
        mem += f", CUDA peak allocated {r['cuda_peak_allocated_MiB']:.0f} MiB"
    batch = f"batch {args.batch}, " if args.batch > 1 else ""
    ratio = f" = {r['median_s'] / fp32['median_s']:.2f} x fp32" if fp32 is not None and p != "fp32" else ""
    print(f"{name:9s} {path:9s} {p} {r['median_s'] / args.batch:.4f} s/image{ratio} ({batch}runs {r['times_s']}), "
          f"{r['flops'] / 1e9:.1f} GFLOPs, {gflops:.1f} GFLOP/s = {100 * gflops / r['conv_peak_gflops']:.0f}% of the "
          f"{p} conv peak {r['conv_peak_gflops']:.1f} GFLOP/s ({r['conv_peak_op']}); {mem}")


def print_official(name: str, r: dict) -> None:
    import zoo
    if name in OFFICIAL:
        official = json.loads((ROOT / "tests/data" / OFFICIAL[name]).read_text())
        print(f"{'':9s} official on its reference 2-core machine: {official['median_s']:.2f} s/image, "
              f"{official['flops_total_FlopCounterMode'] / 1e9:.1f} GFLOPs, peak RSS "
              f"{official['maxrss_MiB']['after_forward']:.0f} MiB")
    else:
        print(f"{'':9s} {zoo.DEFAULT_MODEL}: loaded from disk in {r['load_s']:.3f} s")


if __name__ == "__main__":
    main()
