"""Export GLEAN to ONNX, and run an exported file with onnxruntime.

    python export.py -o glean_face_small_8x.onnx                  # the default model
    python export.py -m glean_cat_8x -o cat8x.onnx                # a registered model (downloaded once)
    python export.py -m runs/face/checkpoint.pt -o face.onnx      # a checkpoint file (any format infer.py takes)
    python infer.py -m face.onnx -i photos/ -o out/               # infer.py runs the file through onnxruntime

The file has one input `lr` [B, 3, in_size, in_size] and one output `sr` [B, 3, out_size, out_size], both float32
RGB in [-1, 1] (the output is not clamped), with a dynamic batch axis B. The fixed noise maps of the latent bank are
constants. Its metadata holds the model's name, configuration, face template and weights' sha256, the opset and the
exporter. Before it is written, the file is checked: onnxruntime on batches of 1 and 3 against the PyTorch
model (max abs error <= 1e-4 x the output's std); a file that fails is not written.

The modulated convolution. StyleGAN2's reference form (stylegan2.ModulatedConv2d) gives each sample its own weight

    W''_oik = s_i W_oik d_o,   d_o = 1 / sqrt(sum_{i,k} (s_i W_oik)^2 + eps)

and runs the batch as one grouped convolution with B groups. ONNX's Conv takes its group count as a constant, so that
form exports only for the batch size it was traced with. Convolution is linear, so the same output is

    (W'' * x)_o = d_o (W * (s x))_o,   d_o = 1 / sqrt(sum_i s_i^2 ||W_oi||^2 + eps)

one convolution whose weight W is shared by the whole batch, between a per-sample scaling of the input channels (by
the style s) and of the output channels (by the demodulation d); ||W_oi||^2 is a constant of the file. glean_fast
computes the same form for batches; here it is written without the fast path's speed tricks (strips of rows, cached
norms, in-place ops, branches on the batch size), which a traced graph must not contain.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import glean
import stylegan2
import zoo
from glean_io import CheckpointError, atomic_write, one_line, sha256_of

FORMAT = "glean-onnx"    # metadata["format"] of the files written here
OPSET = 18               # ai.onnx opset; onnxruntime >= 1.14 and TensorRT >= 8.6 run it
CHECK_BATCHES = (1, 3)   # the self-check's batch sizes: 1, and one other than the traced example's 2
TOLERANCE = 1e-4         # the self-check's max abs error, in units of the output's standard deviation

# ----------------------------------------------------------------------------------------------------------
# The graph: glean.GLEAN's own forward, its modulated convolutions in the shared-weight form


class SharedWeightModulatedConv(nn.Module):
    """stylegan2.ModulatedConv2d (same style map A, same result up to rounding) as one convolution with a weight
    shared by the batch: x [B, I, H, W], styles w [B, S] -> [B, O, H', W']."""

    def __init__(self, layer: stylegan2.ModulatedConv2d):
        super().__init__()
        self.style_modulation = layer.style_modulation                      # the affine map A, shared
        self.upsample, self.demodulate, self.eps = layer.upsample, layer.demodulate, layer.eps
        self.padding = layer.kernel_size // 2
        with torch.no_grad():
            W = (layer.scale * layer.weight[0]).float().contiguous()        # equalized lr folded in  [O, I, k, k]
            # ||W_oi||^2 over the kernel taps, the constant part of the demodulation  [O, I]
            self.register_buffer("norms", W.square().sum(dim=(2, 3)))
            # conv_transpose2d wants [I, O, k, k]
            self.register_buffer("weight", W.transpose(0, 1).contiguous() if self.upsample else W)
        if self.upsample:
            self.blur = layer.blur

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.style_modulation(w)                                        # s = A(w)   [B, I]
        # s_i x_i: the style scales the input channels
        x = x * s[:, :, None, None]                                         # [B, I, H, W]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, self.weight, stride=2))   # [B, O, 2H + 1, 2W + 1] -> [B, O, 2H, 2W]
        else:
            out = F.conv2d(x, self.weight, padding=self.padding)            # [B, O, H, W]
        if not self.demodulate:
            return out
        # d_o = 1 / sqrt(sum_i s_i^2 ||W_oi||^2 + eps)
        d = torch.rsqrt(s.square() @ self.norms.T + self.eps)               # [B, O]
        return out * d[:, :, None, None]


def exportable(model: glean.GLEAN) -> glean.GLEAN:
    """A glean.GLEAN (the reference forward, Eq. 1-4) over the model's weights, every modulated convolution in the
    shared-weight form. The model itself (reference or fast path) is left as it is."""
    with torch.device("meta"):
        out = glean.GLEAN(model.cfg)
    out.load_state_dict(model.state_dict(), assign=True)                    # the same tensors, no copy
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, stylegan2.ModulatedConv2d):
                setattr(module, name, SharedWeightModulatedConv(child))
    return out.eval().float()


# ----------------------------------------------------------------------------------------------------------
# Writing and checking a file


def metadata(model: glean.GLEAN, name: str, weights_sha256: str) -> dict:
    """What an exported file says about itself (ONNX metadata_props: strings)."""
    cfg = model.cfg
    return {"format": FORMAT, "model": name, "config": json.dumps(asdict(cfg)), "weights_sha256": weights_sha256,
            "face_template": json.dumps([list(p) for p in getattr(model, "face_template", ())]),
            "opset": str(OPSET), "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "input": f"lr: float32 [B, {cfg.img_channels}, {cfg.in_size}, {cfg.in_size}], RGB in [-1, 1]",
            "output": f"sr: float32 [B, {cfg.img_channels}, {cfg.out_size}, {cfg.out_size}], RGB in [-1, 1] "
                      f"(not clamped)"}


def to_onnx(model: glean.GLEAN, *, name: str, weights_sha256: str = "") -> bytes:
    """The model as an ONNX file's bytes (one file, the weights inside), with a dynamic batch axis and metadata."""
    import onnx
    cfg = model.cfg
    graph = exportable(model)
    x = torch.zeros(2, cfg.img_channels, cfg.in_size, cfg.in_size)          # batch 2: 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(graph, (x,), dynamo=True, opset_version=OPSET, input_names=["lr"],
                                    output_names=["sr"], dynamic_shapes={"x": {0: batch}}, external_data=False,
                                    verbose=False)
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "B"     # the exporter's symbol, named as here
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "B"
    del proto.metadata_props[:]
    for k, v in metadata(model, name, weights_sha256).items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def self_check(model: glean.GLEAN, runner: "OnnxGLEAN", batches=CHECK_BATCHES, seed: int = 0) -> dict:
    """onnxruntime (`runner`) against the PyTorch model on random inputs of each batch size:
    {batch: (max abs error, output std)}."""
    g = torch.Generator().manual_seed(seed)
    cfg, result = model.cfg, {}
    for b in batches:
        x = torch.rand(b, cfg.img_channels, cfg.in_size, cfg.in_size, generator=g) * 2 - 1
        with torch.no_grad():
            expected = model(x.to(next(model.parameters()).dtype)).float()
        y = runner(x)
        result[b] = ((y - expected).abs().max().item(), expected.std().item())
    return result


def write_checked(model: glean.GLEAN, out, *, name: str, weights_sha256: str = "", check: bool = True) -> dict:
    """Export the model, check the file in memory with onnxruntime (batches CHECK_BATCHES), and only then write it
    to `out` atomically: a file that fails its check is never written. Returns the check's result (see
    self_check; {} with check=False)."""
    data = to_onnx(model, name=name, weights_sha256=weights_sha256)
    result = self_check(model, OnnxGLEAN(data, "cpu")) if check else {}
    for b, (err, std) in result.items():
        if not err <= TOLERANCE * std:
            raise CheckpointError(f"self-check failed: at batch {b} onnxruntime differs from PyTorch by {err:.2e} "
                                  f"(limit {TOLERANCE:g} x output std {std:.3g}); no file written")
    with atomic_write(out) as f:
        f.write(data)
    return result


# ----------------------------------------------------------------------------------------------------------
# Running a file: onnxruntime behind the interface infer.py uses


class OnnxGLEAN(nn.Module):
    """An exported GLEAN run by onnxruntime, with what infer.py and photos.py use of a model: `cfg`, `face_template`,
    `name`, and forward on [B, 3, in_size, in_size] float32 in [-1, 1] -> [B, 3, out_size, out_size] (CPU tensors).

    device: "" (onnxruntime's CUDA provider where it has one, else the CPU), "cpu", "cuda" or "cuda:N". The file
    fixes the precision (float32). onnxruntime's intra-op threads follow torch's (torch.get_num_threads()) and do
    not spin while idle.
    """

    def __init__(self, file, device: str = "", *, threads: int = 0):
        super().__init__()
        ort = onnxruntime()
        source = "the exported model" if isinstance(file, bytes) else str(file)
        if not isinstance(file, bytes) and not Path(file).is_file():
            raise CheckpointError(f"{file}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle threads sleep instead of spinning: between forwards, torch (image preparation, the fast path in
        # bench.py --onnx) needs the cores that spinning threads would hold
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(file if isinstance(file, bytes) else str(file), options,
                                                providers=providers(ort, device))
        except (RuntimeError, ValueError, *ort_errors(ort)) as e:
            raise CheckpointError(f"{source}: not a usable ONNX file ({str(e).strip().splitlines()[0]})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{source}: an ONNX file, but not one export.py wrote (no format={FORMAT} in its "
                                  f"metadata); export the model with python export.py")
        try:
            self.cfg = glean.GLEANConfig.from_dict(json.loads(meta["config"]))
            self.face_template = tuple(tuple(float(v) for v in p) for p in json.loads(meta["face_template"]))
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: its metadata is damaged ({e}); export the model again") from e
        self.name, self.weights_sha256 = meta.get("model", Path(source).name), meta.get("weights_sha256")
        self.metadata = meta
        self.input_name = self.session.get_inputs()[0].name
        # infer.run_model and photos.run_faces send inputs to the device and dtype of a model's first parameter
        self.device_probe = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.img_channels, cfg.in_size, cfg.in_size):
            raise ValueError(f"GLEAN expects input [B, {cfg.img_channels}, {cfg.in_size}, {cfg.in_size}], "
                             f"got {list(x.shape)}")
        lr = x.detach().float().cpu().contiguous().numpy()
        (sr,) = self.session.run(None, {self.input_name: lr})
        return torch.from_numpy(sr)                                          # [B, 3, out_size, out_size]


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError("running an ONNX file needs onnxruntime: pip install 'glean-sr[onnx]' "
                              "(or pip install onnxruntime)") from None
    return ort


def ort_errors(ort) -> tuple:
    """onnxruntime's own exception classes (InvalidProtobuf, Fail, NoSuchFile, ...: subclasses of Exception only)."""
    state = ort.capi.onnxruntime_pybind11_state
    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def providers(ort, device: str) -> list:
    """onnxruntime's execution providers for a device name: "" = CUDA if this onnxruntime has it, else the CPU."""
    available = ort.get_available_providers()
    if device in ("", "cuda") or device.startswith("cuda:"):
        if "CUDAExecutionProvider" in available:
            index = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        if device:
            raise CheckpointError(f"--device {device}: this onnxruntime has no CUDA provider ({', '.join(available)})"
                                  f"; pip install onnxruntime-gpu, or use --device cpu")
    elif device != "cpu":
        raise CheckpointError(f"--device {device}: ONNX files run on cpu or cuda")
    return ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------------------------------------
# Command line


def export(name_or_path: str, out, *, check: bool = True) -> dict:
    """Load a model as infer.py does (a registered name or a checkpoint file), write it to `out` as ONNX and check
    the file (write_checked); returns the check's result."""
    model = zoo.load_pretrained(name_or_path)
    weights = zoo.weights_file(name_or_path)
    name = name_or_path if name_or_path in zoo.WEIGHTS else Path(name_or_path).name
    return write_checked(model, out, name=name, weights_sha256=sha256_of(weights), check=check)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="", help=f"registered model ({', '.join(zoo.WEIGHTS)}) or a checkpoint "
                                                       f"file (default: {zoo.DEFAULT_MODEL})")
    ap.add_argument("-o", "--output", required=True, help="the ONNX file to write (e.g. model.onnx)")
    ap.add_argument("--no-check", action="store_true", help="skip the self-check with onnxruntime")
    args = ap.parse_args(argv)
    name, out = args.model or zoo.DEFAULT_MODEL, Path(args.output)
    if out.suffix.lower() != ".onnx":
        print(f"error: -o {out}: give a file name ending in .onnx", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"error: -o {out}: the folder {out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        result = export(name, out, check=not args.no_check)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    size = out.stat().st_size / 2 ** 20
    checks = ", ".join(f"batch {b}: {err:.1e} = {err / std:.1e} x output std" for b, (err, std) in result.items())
    print(f"{out} written ({size:.0f} MiB); " + (f"onnxruntime = PyTorch, max abs error {checks}" if result else
                                                  "not checked"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
