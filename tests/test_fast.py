"""The fast path (glean_fast) against the reference (glean.py): same results on whole images and strips, every
ablation, gradients, the golden case, float32 error measured against float64; and the reference file itself."""
import ast
import subprocess
import sys

import pytest
import torch

import glean
import glean_fast
import stylegan2
import weight_formats
from bench import large_activation_weights_
from conftest import ROOT, tiny_cfg


def position_dependent_noise_(model):
    """Random fixed noise and non-zero noise strengths: a wrongly cut strip of noise would show."""
    for name, buf in model.named_buffers():
        if "injected_noise" in name:
            buf.normal_()
    for m in model.modules():
        if isinstance(m, stylegan2.NoiseInjection):
            m.weight.data.fill_(0.5)
    return model


ABLATIONS = {"full": {}, "no_bank_features": dict(decoder_bank_up_to=0), "latent_only": dict(fuse_encoder_up_to=0),
             "half_bank_features": lambda out: dict(decoder_bank_up_to=out // 2), "no_decoder": dict(use_decoder=False)}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
@pytest.mark.parametrize("in_size,out_size,batch", [(8, 32, 2), (8, 64, 1), (16, 64, 2)])
def test_fast_equals_reference(in_size, out_size, batch, ablation):
    """GLEANFast on whole images and on strips of rows (one base row per strip, and a few rows) = glean.GLEAN."""
    torch.manual_seed(0)
    kw = ABLATIONS[ablation]
    kw = kw(out_size) if callable(kw) else kw
    ref = position_dependent_noise_(glean.GLEAN(tiny_cfg(in_size, out_size, **kw)).eval())
    fast = glean_fast.fast(ref)
    x = torch.rand(batch, 3, in_size, in_size) * 2 - 1
    with torch.no_grad():
        expected = ref(x)
        for elems in (0, 1, 3000):
            fast.strip_elems = elems
            torch.testing.assert_close(fast(x), expected, atol=2e-5, rtol=1e-5)


def test_fast_model_shares_the_reference_weights_and_leaves_it_alone():
    ref = glean.GLEAN(tiny_cfg()).train()
    layouts = {k: v.stride() for k, v in ref.state_dict().items()}
    fast = glean_fast.fast(ref)
    assert isinstance(fast, glean.GLEAN) and fast.training and fast.cfg == ref.cfg
    assert [n for n, p in fast.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    ours = fast.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours[k], v) and v.stride() == layouts[k]       # same values, reference layout untouched
        if not k.endswith(".weight") or v.ndim < 4:                       # not re-laid out: the very same memory
            assert ours[k].data_ptr() == v.data_ptr()
    conv = fast.decoder[0].upsample_conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_training_gradients_equal_reference():
    """With gradients (training), the fast path runs whole images: loss and every gradient equal the reference's."""
    torch.manual_seed(0)
    ref = position_dependent_noise_(glean.GLEAN(tiny_cfg(8, 32)).train())
    fast = glean_fast.fast(ref)
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_fp32_error_against_float64():
    """The reference path run in float64 is the yardstick: on a reduced configuration with large activations
    (outputs with std ~10), the fast path's float32 error (NHWC kernels sum in another order, strips) stays within
    3x of the reference path's own float32 error."""
    cfg = glean.GLEANConfig(in_size=16, out_size=128, channel_base=128, style_channels=64, num_mlps=2,
                            rrdb_channels=32, num_rrdbs=2, rrdb_growth_channels=16, decoder_channels=32)
    ref = large_activation_weights_(glean.GLEAN(cfg).eval())
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        truth = glean.GLEAN(cfg).double().eval()
        truth.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
        y64 = truth(x.double())
        err_ref = (ref(x).double() - y64).abs().max().item()
        fast = glean_fast.fast(ref)
        err_fast = (fast(x).double() - y64).abs().max().item()
        fast.strip_elems = 3000
        err_strips = (fast(x).double() - y64).abs().max().item()
    assert 5 < y64.std().item() < 30, "the configuration should produce large activations"
    assert 0 < err_ref < 1e-3
    assert err_fast <= 3 * err_ref and err_strips <= 3 * err_ref, (err_ref, err_fast, err_strips)


# -- the fast style layers against stylegan2.py's plain modulate / demodulate / grouped conv ------------------


@pytest.mark.parametrize("batch,size", [(1, 8), (1, 2), (3, 8)])
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_fast_style_layers_match_plain(batch, size, upsample, grad, rng):
    """One sample on large maps (modulated weight, NHWC), one on small maps and several (modulated activations)
    against the official grouped conv; folded gain/bias/in-place activation against the three modules in turn."""
    torch.manual_seed(0)
    layer = stylegan2.StyleConv(6, 5, 3, 7, upsample=upsample).double()
    layer.noise_injector.weight.data.fill_(0.3)
    layer.activate.bias.data.normal_()
    glean_fast.nhwc_weights_(layer)
    x = torch.randn(batch, 6, size, size, generator=rng, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(batch, 7, generator=rng, dtype=torch.float64)
    side = 2 * size if upsample else size
    noise = torch.randn(1, 1, side, side, generator=rng, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(glean_fast.modulated_conv(layer.conv, x, w), layer.conv(x, w),
                                   atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(glean_fast.style_conv(layer, x, w, noise), layer(x, w, noise),
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("noise", ["const", "random"])
def test_fast_generator_equals_plain(noise):
    """GeneratorFast (the bank stage's generator): same images and gradients as stylegan2.Generator."""
    torch.manual_seed(0)
    cfg = stylegan2.GeneratorConfig(out_size=32, style_channels=16, num_mlps=2, channel_multiplier=1, channel_base=16)
    plain = position_dependent_noise_(stylegan2.Generator(cfg))
    fast = glean_fast.GeneratorFast(cfg)
    fast.load_state_dict(plain.state_dict())
    z = torch.randn(3, 16)
    out = []
    for G in (plain, fast):
        torch.manual_seed(1)                                   # the same random noise for both
        G.zero_grad()
        y = G([z, z.flip(0)], inject_index=3, noise=noise)
        y.square().mean().backward()
        out.append((y, {n: p.grad for n, p in G.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_demodulation_norms_cached_until_the_weight_changes():
    torch.manual_seed(0)
    conv = stylegan2.ModulatedConv2d(4, 3, 3, 5)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(1, 5)
    with torch.no_grad():
        a = glean_fast.modulated_conv(conv, x, w)
        conv.weight.mul_(2)                       # demodulation makes the output scale-free...
        conv.weight[0, 0, 0].mul_(3)              # ...but not to one input channel of one output channel
        b = glean_fast.modulated_conv(conv, x, w)
    torch.testing.assert_close(b, conv(x, w).detach())
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bias", [True, False])
def test_wide_conv_in_output_chunks_equals_one_conv(bias):
    """A conv with >= 1024 input channels over >= 64x64 pixels runs as 128-output-channel convs at CPU inference:
    same result, output in the input's (NHWC) layout; with gradients enabled it is the plain conv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1024, 272, 3, 1, 1, bias=bias)       # chunks of 128, 128 and 16 output channels
    x = torch.randn(1, 1024, 64, 65).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    with torch.no_grad():
        y = glean_fast.conv2d(conv, x)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert glean_fast.conv2d(conv, x[:, :, :8]).grad_fn is not None     # training: one autograd conv as usual


def test_heap_is_trimmed_only_before_large_streamed_stages(monkeypatch):
    """run_in_strips hands free heap memory back to the OS only before stages whose inputs exceed 3 * max_elems
    values (re-faulting trimmed pages costs time); the result does not depend on it."""
    calls = []
    monkeypatch.setattr(glean_fast, "release_free_memory", lambda: calls.append(1))
    x = torch.randn(1, 4, 16, 16)
    fn = lambda s, x_s: s.crop(x_s * 2, 1)  # noqa: E731
    small = glean_fast.run_in_strips(fn, [x], [1], halo=0, out_scale=1, width=4, max_elems=400)   # 1024 <= 1200
    assert calls == []
    large = glean_fast.run_in_strips(fn, [x], [1], halo=0, out_scale=1, width=4, max_elems=300)   # 1024 > 900
    assert calls == [1]
    torch.testing.assert_close(small, 2 * x)
    torch.testing.assert_close(large, 2 * x)


def test_strips_default_to_cpu_only():
    """strip_elems None (the default): strips of 2^22 values on a CPU, whole images on a GPU; a set value holds on
    every device."""
    model = glean_fast.GLEANFast(tiny_cfg(8, 32))
    assert model.strip_elems is None
    assert model.strip_size(torch.device("cpu")) == 1 << 22
    assert model.strip_size(torch.device("cuda")) == 0
    model.strip_elems = 3000
    assert model.strip_size(torch.device("cuda")) == model.strip_size(torch.device("cpu")) == 3000


def test_loading_lays_out_weights_for_the_fast_path(tmp_path):
    """GLEANFast.load / from_official / load_bank give NHWC conv weights; the reference keeps the file's layout."""
    torch.manual_seed(0)
    glean.GLEAN(tiny_cfg()).save(tmp_path / "m.safetensors")
    fast, ref = glean_fast.GLEANFast.load(tmp_path / "m.safetensors"), glean.GLEAN.load(tmp_path / "m.safetensors")
    assert fast.encoder[0][1].weight.is_contiguous(memory_format=torch.channels_last)
    assert ref.encoder[0][1].weight.is_contiguous()
    weight_formats.save_generator(stylegan2.Generator(fast.cfg.bank_config()), tmp_path / "bank.pt")
    fast.load_bank(tmp_path / "bank.pt")
    assert fast.bank.convs[1].conv.weight[0].is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref.load_bank(tmp_path / "bank.pt")(x), atol=2e-5, rtol=1e-5)


# -- the reference file reads as the paper --------------------------------------------------------------------


def test_reference_file_reads_as_the_paper():
    """glean.py: at most 500 lines, no streaming code, nothing imported from the fast path; GLEAN.forward at most
    45 lines, citing each of eq. (1)-(4)."""
    src = (ROOT / "glean.py").read_text()
    assert len(src.splitlines()) <= 500
    tree = ast.parse(src)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "glean_fast" not in imported
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for word in ("strip", "channels_last", "malloc", "shuffle", "chunk"):
        found = [n for n in names if word in n and n != "pixel_shuffle"]
        assert not found, f"glean.py uses {found}: streaming code belongs in glean_fast.py"
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GLEAN")
    forward = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "forward")
    body = "\n".join(src.splitlines()[forward.lineno - 1:forward.end_lineno])
    assert forward.end_lineno - forward.lineno + 1 <= 45
    for n in (1, 2, 3, 4):
        assert f"Eq. ({n})" in body
    assert "torch.cat" in body
    out = subprocess.run([sys.executable, "-c", "import sys, glean; print('glean_fast' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
