"""StyleGAN2 ops against straightforward reference computations (numpy loops, no torch conv)."""
import math

import numpy as np
import pytest
import torch

import stylegan2


def ref_conv2d(x, w, pad):
    """Cross-correlation by explicit loops. x [C, H, W], w [O, C, k, k] -> [O, H + 2 pad - k + 1, ...]."""
    C, H, W = x.shape
    Co, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((Co, H + 2 * pad - k + 1, W + 2 * pad - k + 1))
    for o in range(Co):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[o, i, j] = (xp[:, i:i + k, j:j + k] * w[o]).sum()
    return out


def ref_upfirdn(x, kernel, up, down, pad):
    """Definition of upfirdn2d on one channel [H, W]: zero insertion, padding, true convolution, decimation."""
    H, W = x.shape
    u = np.zeros((H * up, W * up))
    u[::up, ::up] = x
    p0, p1 = pad
    u = np.pad(u, ((max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    u = u[max(-p0, 0): u.shape[0] - max(-p1, 0), max(-p0, 0): u.shape[1] - max(-p1, 0)]
    kh, kw = kernel.shape
    out = np.zeros((u.shape[0] - kh + 1, u.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            # true convolution: the kernel is flipped relative to the window
            out[i, j] = (u[i:i + kh, j:j + kw] * kernel[::-1, ::-1]).sum()
    return out[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (2, 2)), (2, 1, (-1, 0))])
def test_upfirdn2d_matches_definition(up, down, pad, rng):
    x = torch.randn(2, 3, 7, 7, generator=rng, dtype=torch.float64)
    kernel = torch.rand(4, 4, generator=rng, dtype=torch.float64)  # asymmetric: checks the flip
    out = stylegan2.upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    for b in range(2):
        for c in range(3):
            ref = ref_upfirdn(x[b, c].numpy(), kernel.numpy(), up, down, pad)
            np.testing.assert_allclose(out[b, c].numpy(), ref, atol=1e-12)


def test_blur_kernel_is_normalised_separable():
    k = stylegan2.make_kernel([1, 3, 3, 1])
    np.testing.assert_allclose(k.numpy(), np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64)


def modulated_weight_by_hand(conv, w):
    """W''_{b,o,i} = s_bi W_oi / sqrt(sum_{i,k} (s_bi W_oi)^2 + eps), W = weight / sqrt(fan_in)."""
    A = conv.style_modulation
    s = (w.numpy() @ (A.weight.detach().numpy() / math.sqrt(A.weight.shape[1])).T) + A.bias.detach().numpy()
    W = conv.weight.detach().numpy()[0] / math.sqrt(conv.in_channels * conv.kernel_size ** 2)
    out = []
    for b in range(w.shape[0]):
        wb = W * s[b][None, :, None, None]
        if conv.demodulate:
            wb = wb / np.sqrt((wb ** 2).sum(axis=(1, 2, 3), keepdims=True) + 1e-8)
        out.append(wb)
    return out


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_reference(batch, demodulate, rng):
    torch.manual_seed(0)
    conv = stylegan2.ModulatedConv2d(4, 5, 3, 6, demodulate=demodulate).double()
    x = torch.randn(batch, 4, 6, 6, generator=rng, dtype=torch.float64)
    w = torch.randn(batch, 6, generator=rng, dtype=torch.float64)
    out = conv(x, w).detach()
    for b, wb in enumerate(modulated_weight_by_hand(conv, w)):
        np.testing.assert_allclose(out[b].numpy(), ref_conv2d(x[b].numpy(), wb, 1), atol=1e-10)


@pytest.mark.parametrize("batch", [1, 2])
def test_upsampling_modulated_conv_matches_reference(batch, rng):
    """Transposed conv (stride 2) then [1,3,3,1] blur (x4) = zero insertion, full conv with the flipped kernel,
    then upfirdn2d with pad (1, 1)."""
    torch.manual_seed(0)
    conv = stylegan2.ModulatedConv2d(3, 2, 3, 5, upsample=True).double()
    x = torch.randn(batch, 3, 5, 5, generator=rng, dtype=torch.float64)
    w = torch.randn(batch, 5, generator=rng, dtype=torch.float64)
    out = conv(x, w).detach()
    assert out.shape == (batch, 2, 10, 10)
    blur = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64 * 4
    for b, wb in enumerate(modulated_weight_by_hand(conv, w)):
        xb = x[b].numpy()
        z = np.zeros((3, 9, 9))
        z[:, ::2, ::2] = xb                                           # zero insertion: 2H - 1
        t = ref_conv2d(z, wb[:, :, ::-1, ::-1], 2)                    # transposed conv: [O, 2H + 1, 2W + 1]
        ref = np.stack([ref_upfirdn(t[o], blur, 1, 1, (1, 1)) for o in range(2)])
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-10)


def test_equalized_lr_runtime_scale():
    lin = stylegan2.EqualLinear(8, 4, lr_mul=0.01, bias_init=0.5)
    x = torch.randn(3, 8)
    expected = x @ (lin.weight * 0.01 / math.sqrt(8)).T + 0.5 * 0.01
    torch.testing.assert_close(lin(x), expected)
    conv = stylegan2.EqualConv2d(3, 2, 3, padding=1)
    assert conv.scale == 1 / math.sqrt(27)


def test_minibatch_stddev(rng):
    x = torch.randn(8, 3, 4, 4, generator=rng)
    y = stylegan2.minibatch_stddev(x, group_size=4)
    assert y.shape == (8, 4, 4, 4)
    groups = x.view(4, 2, 3, 4, 4)  # sample b belongs to group member b // 2, subgroup b % 2
    for m in range(2):
        std = torch.sqrt(groups[:, m].var(dim=0, unbiased=False) + 1e-8).mean()
        for b in range(m, 8, 2):
            torch.testing.assert_close(y[b, 3], std.expand(4, 4))
