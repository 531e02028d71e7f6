"""StyleGAN2 (config-f) in plain PyTorch: the generative latent bank of GLEAN and its discriminator.

Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020). GLEAN (Chan et
al., CVPR 2021) freezes a pretrained generator and uses its style blocks S_i as a "latent bank"
(Sec. 3.2); the discriminator D is the one of eq. (7) and (9).

Symbols used here
    z, w     latent code and its mapped (intermediate) style vector, both [B, style_channels]
    s        per-input-channel modulation of a style layer, s = A(w)                 [B, C_in]
    W        convolution weight, stored unscaled ("equalized learning rate")   [C_out, C_in, k, k]

Every op is plain tensor code (no compiled extensions) so the whole network runs on a CPU:
  - equalized learning rate: the stored weight is multiplied at run time by lr_mul / sqrt(fan_in);
  - modulation, demodulation: W'_oik = s_i W_oik, W''_oik = W'_oik / sqrt(sum_{i,k} W'_oik^2 + eps);
  - upfirdn2d: zero-insertion upsampling, FIR filtering with the [1, 3, 3, 1] kernel, downsampling.

The generator's layers form one flat sequence: conv1 at 4x4, then for each resolution r = 8 ..
out_size an upsampling style layer convs[2k] and a style layer convs[2k + 1]; layer n of [conv1,
*convs] takes style vector n and noise map injected_noise_n. toRGB layers (to_rgb1, to_rgbs[k])
turn each resolution's features into RGB, summed over resolutions. Parameter names mirror the
official (mmagic / mmediting) layout; weight_formats.py renames the official files' keys
(`weight_orig`, ...) to these.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def assert_shape(x: torch.Tensor, shape):
    """Assert x.shape matches `shape`, where None matches any size."""
    assert x.ndim == len(shape) and all(s is None or s == t for s, t in zip(shape, x.shape)), \
        f"expected shape {tuple(shape)}, got {tuple(x.shape)}"


def channel_table(channel_multiplier: int = 2, channel_base: int = 512) -> dict:
    """Feature channels per resolution: the official table for channel_base=512, every entry scaled
    by channel_base / 512."""
    cm, f = channel_multiplier, channel_base / 512
    base = {4: 512, 8: 512, 16: 512, 32: 512,
            64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm, 1024: 16 * cm}
    return {res: max(1, int(c * f)) for res, c in base.items()}


# -------------------------------------------------------------------------------------------------
# Elementary ops


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor, negative_slope=0.2, gain=SQRT2):
    """leaky_relu(x + b) * sqrt(2): StyleGAN2's "fused" bias + activation (the gain keeps the
    variance)."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * gain


def make_kernel(k, gain: float = 1.0) -> torch.Tensor:
    """Separable FIR kernel from 1-D taps: outer product, normalised to sum gain.  [len(k), len(k)]
    Made on the CPU whatever the default device (on meta, arithmetic would import torch._dynamo)."""
    k = torch.tensor(k, dtype=torch.float32, device="cpu")
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k * (gain / k.sum())


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)):
    """Upsample by zero insertion, pad, convolve with a 2-D FIR kernel (a true convolution), and
    downsample.

    x: [B, C, H, W]; kernel: [kh, kw]; pad = (before, after), the same on both axes; negative crops.
    Output: [B, C, (H*up + p0 + p1 - kh) // down + 1, ...].
    """
    B, C, H, W = x.shape
    kh, kw = kernel.shape
    if up > 1:
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])            # [B, C, H, up, W, up]
        x = x.reshape(B, C, H * up, W * up)
    p0, p1 = pad
    x = F.pad(x, [p0, p1, p0, p1])
    w = kernel.flip([0, 1]).to(x.dtype)[None, None].expand(C, 1, kh, kw)
    x = F.conv2d(x, w, groups=C)                              # depthwise FIR
    return x[:, :, ::down, ::down] if down > 1 else x


class Blur(nn.Module):
    """FIR low-pass filter, upfirdn2d with up = down = 1, as one depthwise conv (kernel scaled by
    factor^2 after a 2x upsampling). An optional per-channel bias is added in the same pass."""

    def __init__(self, kernel=(1, 3, 3, 1), pad=(0, 0), upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel, upsample_factor ** 2))
        self.pad = tuple(pad)

    def forward(self, x, bias=None):
        C = x.shape[1]
        p0, p1 = self.pad
        if p0 != p1:
            x, p0 = F.pad(x, [p0, p1, p0, p1]), 0
        w = self.kernel.flip([0, 1]).to(x.dtype)[None, None].expand(C, 1, *self.kernel.shape)
        return F.conv2d(x, w, bias, padding=p0, groups=C)


class Upsample(nn.Module):
    """2x upsampling of the RGB skip: zero insertion + [1,3,3,1] FIR (upfirdn2d, up=2)."""

    def __init__(self, kernel=(1, 3, 3, 1), factor: int = 2):
        super().__init__()
        self.register_buffer("kernel", make_kernel(kernel, factor ** 2))
        p = len(kernel) - factor
        self.factor, self.pad = factor, ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x):
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class PixelNorm(nn.Module):
    """z / sqrt(mean(z^2) + eps): normalises the input code of the mapping network."""

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


# -------------------------------------------------------------------------------------------------
# Equalized-learning-rate layers


def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
    """N(0, std^2) initial weights; only the shape when the model is built on the meta device to be
    loaded: the numbers would be thrown away, and torch's meta kernels for normal_ and arithmetic
    import torch._dynamo on first use (about a second)."""
    if torch.get_default_device().type == "meta":
        return torch.empty(shape)
    return torch.randn(shape) * std


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate:
    y = x (W * lr_mul / sqrt(in))^T + b * lr_mul  [, then leaky ReLU * sqrt 2]."""

    def __init__(self, in_features: int, out_features: int, *,
                 bias_init: float = 0.0,   # 1.0 for style modulation A(w), so styles start at s = 1
                 lr_mul: float = 1.0,      # 0.01 in the mapping network (lr_mlp)
                 activation: bool = False):  # fused bias + leaky ReLU(0.2) * sqrt(2)
        super().__init__()
        self.weight = nn.Parameter(randn(out_features, in_features, std=1 / lr_mul))
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale, self.lr_mul = lr_mul / math.sqrt(in_features), lr_mul
        self.activation = activation

    def forward(self, x):
        if self.activation:
            return bias_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate (weight * 1/sqrt(C_in k k) at run time); the
    discriminator's."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        self.weight = nn.Parameter(randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride, self.padding = stride, padding

    def forward(self, x):
        w = self.weight * self.scale
        return F.conv2d(x, w, self.bias, stride=self.stride, padding=self.padding)


class BiasLeakyReLU(nn.Module):
    """Learned bias + leaky ReLU(0.2) * sqrt(2) (official `activate` / FusedBiasLeakyReLU)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return bias_leaky_relu(x, self.bias)


# -------------------------------------------------------------------------------------------------
# Generator (synthesis) layers


class ModulatedConv2d(nn.Module):
    """Style-modulated convolution of StyleGAN2 (with optional demodulation and 2x upsampling).

    s = A(w);  W'_oik = s_i W_oik;  W''_oik = W'_oik / sqrt(sum_{i,k} W'_oik^2 + eps)  (demodulate)
    Each sample has its own weight W'', so the batch runs as one grouped convolution with B groups.
    Upsampling = transposed convolution with stride 2, then the [1,3,3,1] blur.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_channels: int,
                 *, demodulate: bool = True, upsample: bool = False, blur_kernel=(1, 3, 3, 1),
                 eps: float = 1e-8):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.demodulate, self.upsample, self.eps = demodulate, upsample, eps
        self.style_modulation = EqualLinear(style_channels, in_channels, bias_init=1.0)   # A
        # official layout [1, C_out, C_in, k, k] (a leading batch axis for the modulated weight)
        self.weight = nn.Parameter(randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size ** 2)   # equalized learning rate
        if upsample:
            factor, p = 2, (len(blur_kernel) - 2) - (kernel_size - 1)
            pad = ((p + 1) // 2 + factor - 1, p // 2 + 1)
            self.blur = Blur(blur_kernel, pad=pad, upsample_factor=factor)

    def modulated_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W'' for styles w [B, style_channels]  ->  [B, C_out, C_in, k, k]."""
        s = self.style_modulation(w)                                     # s = A(w)       [B, I]
        weight = self.scale * self.weight * s[:, None, :, None, None]  # W' = s_i W   [B,O,I,k,k]
        if self.demodulate:
            d = torch.rsqrt(weight.square().sum(dim=(2, 3, 4)) + self.eps)   # 1 / ||W'_o|| [B, O]
            weight = weight * d[:, :, None, None, None]                   # W''
        return weight

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, H, W], styles w [B, style_channels] -> [B, C_out, H, W] or [.., 2H, 2W]."""
        B, C, H, W = x.shape
        assert C == self.in_channels, f"expected {self.in_channels} input channels, got {C}"
        C_out, k = self.out_channels, self.kernel_size
        weight = self.modulated_weight(w).to(x.dtype)                    # [B, C_out, C, k, k]
        x = x.reshape(1, B * C, H, W)                                    # the batch as B groups
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(B * C, C_out, k, k)  # [in, out / groups, k, k]
            out = F.conv_transpose2d(x, weight, stride=2, groups=B)      # [1, B C_out, 2H+1, 2W+1]
            return self.blur(out.view(B, C_out, 2 * H + 1, 2 * W + 1))   # [B, C_out, 2H, 2W]
        weight = weight.reshape(B * C_out, C, k, k)
        out = F.conv2d(x, weight, padding=k // 2, groups=B)              # [1, B C_out, H, W]
        return out.view(B, C_out, H, W)


class NoiseInjection(nn.Module):
    """x + strength * noise, with one learned strength per layer; noise is [1 or B, 1, H, W]."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x, noise=None):
        if noise is None:
            B, _, H, W = x.shape
            noise = x.new_empty(B, 1, H, W).normal_()
        return x + self.weight * noise


class StyleConv(nn.Module):
    """One style layer: modulated conv -> + strength * noise -> + bias -> leaky ReLU(0.2) * sqrt(2)
    (official ModulatedStyleConv; `noise_injector` and `activate` hold the strength, the bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, style_channels, *, upsample=False,
                 blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_channels,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise_injector = NoiseInjection()
        self.activate = BiasLeakyReLU(out_channels)

    def forward(self, x, w, noise=None):
        return self.activate(self.noise_injector(self.conv(x, w), noise))   # [B, C_out, H', W']


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB, plus the upsampled RGB skip of the previous
    resolution."""

    def __init__(self, in_channels, style_channels, *, upsample=True, blur_kernel=(1, 3, 3, 1),
                 out_channels=3):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, out_channels, 1, style_channels, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x, w, skip=None):
        out = self.conv(x, w) + self.bias
        return out + self.upsample(skip) if skip is not None else out


class ConstantInput(nn.Module):
    """The learned 4x4 input of the synthesis network, repeated over the batch."""

    def __init__(self, channels, size=4):
        super().__init__()
        self.input = nn.Parameter(randn(1, channels, size, size))

    def forward(self, batch: int):
        return self.input.expand(batch, -1, -1, -1)


# -------------------------------------------------------------------------------------------------
# Generator


@dataclass
class GeneratorConfig:
    out_size: int = 1024             # output resolution, a power of two in [16, 1024]
    style_channels: int = 512        # dimension of z and w
    num_mlps: int = 8                # depth of the mapping network
    channel_multiplier: int = 2      # 2 in config-f
    channel_base: int = 512          # channel table entry for 4-32 px (512 in the official models)
    blur_kernel: tuple = (1, 3, 3, 1)  # FIR taps of up/downsampling
    lr_mlp: float = 0.01             # learning-rate multiplier of the mapping network

    def __post_init__(self):
        self.blur_kernel = tuple(self.blur_kernel)
        if self.out_size not in (16, 32, 64, 128, 256, 512, 1024):
            raise ValueError(f"StyleGAN2 out_size must be a power of two from 16 to 1024, "
                             f"got {self.out_size}")


class Generator(nn.Module):
    """StyleGAN2 generator: mapping network z -> w, synthesis network from a constant 4x4 input.

    Style vectors: one per layer, num_latents = 2 log2(out_size) - 2 (conv1, then per resolution
    up-conv and conv; each toRGB takes the index of the next layer). Noise: fixed buffers
    `injected_noise_n` (noise='const'), or fresh N(0, 1) maps ('random').
    """

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = ch = channel_table(cfg.channel_multiplier, cfg.channel_base)
        self.log_size = int(math.log2(cfg.out_size))
        self.num_latents = 2 * self.log_size - 2
        self.num_injected_noises = 2 * (self.log_size - 2) + 1
        S, bk = cfg.style_channels, cfg.blur_kernel
        self.style_mapping = nn.Sequential(PixelNorm(), *[
            EqualLinear(S, S, lr_mul=cfg.lr_mlp, activation=True) for _ in range(cfg.num_mlps)])
        self.constant_input = ConstantInput(ch[4])
        self.conv1 = StyleConv(ch[4], ch[4], 3, S, blur_kernel=bk)
        self.to_rgb1 = ToRGB(ch[4], S, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        in_ch = ch[4]
        for res in self.resolutions:
            out_ch = ch[res]
            self.convs.append(StyleConv(in_ch, out_ch, 3, S, upsample=True, blur_kernel=bk))
            self.convs.append(StyleConv(out_ch, out_ch, 3, S, blur_kernel=bk))
            self.to_rgbs.append(ToRGB(out_ch, S, upsample=True, blur_kernel=bk))
            in_ch = out_ch
        for n in range(self.num_injected_noises):                    # layer n's map, at its size
            res = 2 ** ((n + 1) // 2 + 2)
            self.register_buffer(f"injected_noise_{n}", randn(1, 1, res, res))

    @property
    def resolutions(self):
        """Resolutions of the upsampling style blocks: 8, 16, ..., out_size."""
        return [2 ** i for i in range(3, self.log_size + 1)]

    def noises(self):
        return [getattr(self, f"injected_noise_{n}") for n in range(self.num_injected_noises)]

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, S] -> w [B, S]."""
        return self.style_mapping(z)

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of w over n random z: the centre used by the truncation trick.  [1, S]"""
        device = self.constant_input.input.device
        z = torch.randn(n, self.cfg.style_channels, generator=generator).to(device)
        return self.mapping(z).mean(dim=0, keepdim=True)

    def styles_to_latents(self, styles, *, input_is_latent=False, truncation=1.0,
                          truncation_latent=None, inject_index=None) -> torch.Tensor:
        """z or w codes -> per-layer styles [B, num_latents, S].

        styles: a tensor [B, S] (one code for all layers), [B, num_latents, S] (one per layer, w
        space only), or a list of two [B, S] codes for style mixing at `inject_index` (random when
        None).
        """
        if torch.is_tensor(styles) and styles.ndim == 3:
            assert input_is_latent, "per-layer styles [B, num_latents, S] must be w codes " \
                                    "(input_is_latent=True)"
            assert_shape(styles, [None, self.num_latents, self.cfg.style_channels])
            return styles
        codes = [styles] if torch.is_tensor(styles) else list(styles)
        ws = codes if input_is_latent else [self.mapping(z) for z in codes]
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (Generator.mean_latent)")
            ws = [truncation_latent + truncation * (w - truncation_latent) for w in ws]
        L = self.num_latents
        if len(ws) == 1:
            return ws[0][:, None].expand(-1, L, -1)
        if inject_index is None:
            inject_index = int(torch.randint(1, L, ()).item())
        return torch.cat([ws[0][:, None].expand(-1, inject_index, -1),
                          ws[1][:, None].expand(-1, L - inject_index, -1)], dim=1)

    def synthesis(self, latents: torch.Tensor, noise="random") -> torch.Tensor:
        """Per-layer styles [B, num_latents, S] -> image [B, 3, out_size, out_size], ~[-1, 1]."""
        B = latents.shape[0]
        assert_shape(latents, [B, self.num_latents, self.cfg.style_channels])
        if noise == "const":
            noise = self.noises()
        elif noise == "random":
            noise = [None] * self.num_injected_noises
        x = self.conv1(self.constant_input(B), latents[:, 0], noise[0])   # [B, C4, 4, 4]
        skip = self.to_rgb1(x, latents[:, 1])                              # [B, 3, 4, 4]
        n = 1                                                              # the next layer
        for up_conv, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            x = up_conv(x, latents[:, n], noise[n])                        # [B, C_r, r, r]
            x = conv(x, latents[:, n + 1], noise[n + 1])
            skip = to_rgb(x, latents[:, n + 2], skip)                      # [B, 3, r, r]
            n += 2
        return skip

    def forward(self, styles, *, input_is_latent=False, truncation=1.0, truncation_latent=None,
                inject_index=None, noise="random", return_latents=False):
        latents = self.styles_to_latents(styles, input_is_latent=input_is_latent,
                                         truncation=truncation, truncation_latent=truncation_latent,
                                         inject_index=inject_index)
        image = self.synthesis(latents, noise)
        return (image, latents) if return_latents else image

    @torch.no_grad()
    def sample(self, n: int, *, truncation=1.0, seed: int | None = None, noise="const"):
        """n images from random z (optionally truncated towards the mean w)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        device = self.constant_input.input.device
        z = torch.randn(n, self.cfg.style_channels, generator=gen).to(device)
        mean = self.mean_latent(generator=gen) if truncation < 1 else None
        return self(z, truncation=truncation, truncation_latent=mean, noise=noise)


# -------------------------------------------------------------------------------------------------
# Discriminator


class ConvLayer(nn.Sequential):
    """[blur] -> equalized conv (stride 2 when downsampling) -> [bias + leaky ReLU]
    (official ConvDownLayer)."""

    def __init__(self, in_channels, out_channels, kernel_size, *, downsample=False, activate=True,
                 bias=True, blur_kernel=(1, 3, 3, 1)):
        layers = []
        if downsample:
            p = len(blur_kernel) - 2 + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(BiasLeakyReLU(out_channels))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual discriminator block: (conv3x3, downsampling conv3x3) + downsampled 1x1 skip, over
    sqrt 2."""

    def __init__(self, in_channels, out_channels, blur_kernel=(1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True,
                               blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False,
                              bias=False, blur_kernel=blur_kernel)

    def forward(self, x):
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Append one feature map: the std over groups of samples, averaged over C, H, W.
    [B, C, H, W] -> [B, C+1, H, W]"""
    B, C, H, W = x.shape
    G = min(group_size, B)
    if B % G:
        raise ValueError(f"minibatch stddev needs a batch divisible by {G}, got {B}")
    y = x.view(G, B // G, C, H, W)                                   # [G, M, C, H, W]
    y = torch.sqrt(y.var(dim=0, unbiased=False) + eps)               # [M, C, H, W]
    y = y.mean(dim=(1, 2, 3))[:, None, None, None]                   # [M, 1, 1, 1]
    return torch.cat([x, y.repeat(G, 1, H, W)], dim=1)


@dataclass
class DiscriminatorConfig:
    in_size: int = 1024              # input resolution, a power of two in [16, 1024]
    channel_multiplier: int = 2      # 2 in config-f
    channel_base: int = 512          # channel table entry for 4-32 px
    blur_kernel: tuple = (1, 3, 3, 1)
    mbstd_group_size: int = 4        # samples per minibatch-stddev group

    def __post_init__(self):
        self.blur_kernel = tuple(self.blur_kernel)
        if self.in_size not in (16, 32, 64, 128, 256, 512, 1024):
            raise ValueError(f"StyleGAN2 discriminator in_size must be a power of two from 16 to "
                             f"1024, got {self.in_size}")


class Discriminator(nn.Module):
    """StyleGAN2's residual discriminator: [B, 3, R, R] -> logit [B, 1], D = sigmoid(logit)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        ch = channel_table(cfg.channel_multiplier, cfg.channel_base)
        log_size = int(math.log2(cfg.in_size))
        convs = [ConvLayer(3, ch[cfg.in_size], 1)]
        in_ch = ch[cfg.in_size]
        for i in range(log_size, 2, -1):
            out_ch = ch[2 ** (i - 1)]
            convs.append(ResBlock(in_ch, out_ch, cfg.blur_kernel))
            in_ch = out_ch
        self.convs = nn.Sequential(*convs)
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 4 * 4, ch[4], activation=True),
                                          EqualLinear(ch[4], 1))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        B, C, H, W = img.shape
        R = self.cfg.in_size
        assert (C, H, W) == (3, R, R), f"D expects [B, 3, {R}, {R}], got {[B, C, H, W]}"
        x = self.convs(img)                                              # [B, C4, 4, 4]
        x = minibatch_stddev(x, self.cfg.mbstd_group_size)               # [B, C4 + 1, 4, 4]
        x = self.final_conv(x)                                           # [B, C4, 4, 4]
        return self.final_linear(x.flatten(1))                           # [B, 1]
