"""The model on a CUDA GPU: the golden case, agreement with the CPU (whole image and strips), autocast, and a
training step. Skipped where torch sees no CUDA device (CI runs on CPUs only)."""
import subprocess
import sys

import pytest
import torch

import glean_fast
from conftest import DATA, ROOT, tiny_cfg
from test_golden import golden_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """Plain fp32 convolutions and matmuls (no TF32), so CUDA can be held to the CPU's tolerances."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def golden_io():
    return torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_golden_output_matches_official_on_cuda(fast):
    model = golden_model(fast)[0].cuda()
    io = golden_io()
    with torch.no_grad():
        out = model(io["input"].cuda()).cpu()
    err = (out - io["output"]).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g} vs official output"


@pytest.mark.parametrize("strip_elems", [0, 3000])
def test_cuda_equals_cpu(strip_elems):
    """Random weights, 8 -> 64: the CUDA forward (whole image or on strips of rows) equals the CPU forward."""
    torch.manual_seed(0)
    model = glean_fast.GLEANFast(tiny_cfg(8, 64)).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        expected = model(x)
        model.cuda().strip_elems = strip_elems
        out = model(x.cuda()).cpu()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,max_err,mean_err", [(torch.float16, 0.05, 0.005), (torch.bfloat16, 0.15, 0.02)])
def test_autocast_close_to_fp32(dtype, max_err, mean_err):
    """Mixed precision (as bench.py --amp runs it) stays close to the fp32 output: fp16 keeps ~3
    decimal digits per value, bf16 ~2."""
    model = golden_model(fast=True)[0].cuda()
    x = golden_io()["input"].cuda()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    diff = (out.float() - ref).abs()
    assert diff.max().item() <= max_err and diff.mean().item() <= mean_err, (diff.max().item(), diff.mean().item())


def test_training_step_on_cuda_updates_only_trainable_weights():
    torch.manual_seed(0)
    model = glean_fast.GLEANFast(tiny_cfg(8, 32)).cuda().train()
    bank_before = {k: v.clone() for k, v in model.bank.state_dict().items()}
    trainable = model.trainable_parameters()
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    x, y = torch.rand(2, 3, 8, 8, device="cuda") * 2 - 1, torch.rand(2, 3, 32, 32, device="cuda") * 2 - 1
    loss = torch.nn.functional.mse_loss(model(x), y)                    # Eq. (5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in model.bank.parameters())
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))
    assert all(torch.equal(v, bank_before[k]) for k, v in model.bank.state_dict().items())


def test_infer_cli_on_cuda_matches_cpu(tmp_path):
    """infer.py --device cuda writes the same picture as on the CPU (8-bit PNG, at most 1 level apart)."""
    import numpy as np
    from PIL import Image
    lr = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(lr)
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        subprocess.run([sys.executable, str(ROOT / "infer.py"), "-i", str(lr), "-o", str(out), "--device", device],
                       check=True, capture_output=True)
        (png,) = out.glob("*.png")
        outs[device] = np.asarray(Image.open(png), dtype=np.int16)
    assert outs["cuda"].shape == outs["cpu"].shape == (64, 64, 3)
    assert np.abs(outs["cuda"] - outs["cpu"]).max() <= 1
