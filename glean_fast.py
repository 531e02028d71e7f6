"""The fast path of GLEAN: the same modules and weights as glean.GLEAN (the reference, which reads as the paper),
computed faster and in less memory. Used by default by infer.py, demo.py, torch.hub and bench.py, and by train.py
(whose steps run whole images with gradients). `tests/test_fast.py` checks it against the reference.

What it does, each measured on the project's 2-core CPU (see README, "Speed and memory"):
- NHWC ("channels last") activations and weights: oneDNN's fastest CPU convolutions, and cuDNN's on a GPU. The
  convolution weights are re-laid out once when the model is built or loaded (values unchanged).
- Style layers (StyleGAN2's modulated convs): one sample on large maps scales the weight (W * s * d, in the order the
  convolution wants); small maps and batches scale the activations instead, (W'' * x)_o = d_o (W * (s x))_o, so
  the batch shares one convolution. The bias and the sqrt(2) activation gain are folded into the convolution, noise
  and leaky ReLU applied in place; demodulation norms are cached at inference.
- Convolutions with >= 1024 input channels over >= 64x64 pixels (decoder and fusion) run as 128-output-channel
  slices at CPU inference, which oneDNN blocks better for the cache.
- The bank and the decoder are interleaved so that each g_i is freed as soon as the decoder has used it; the
  pixel-shuffle and the concatenation with g_i are one copy (shuffle_cat); the mapping MLP, toRGB and skip-fusion
  branches are never computed (they cannot change the output with a decoder).
- At inference, large stages run on horizontal strips of rows with exact halos (run_in_strips), so the largest
  feature maps never exist whole (by default on CPUs, where it costs nothing; a GPU runs whole images), and free
  heap memory goes back to the OS before the largest stages.
Precision: the NHWC kernels sum in another order than NCHW ones; in float32 the fast path stays within a small
factor of the reference path's own rounding error (tests/test_fast.py measures both against float64). For
inference, to_precision_ runs the convolutions in bf16 (CPUs with bf16 instructions: about twice as fast) or fp16
(GPUs), float32 in and out; choose_precision decides "auto" (AUTO_RULE, from bench.py --precision-report's
fidelity measurements; tests/test_precision.py holds the floor).
"""
import ctypes
import math
import sys
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import glean
import stylegan2
from stylegan2 import SQRT2, assert_shape

# ----------------------------------------------------------------------------------------------------------
# Layout: conv weights stored in the order their convolution runs in (NHWC, like the activations)


def nhwc_weights_(module: nn.Module) -> nn.Module:
    """Lay out every Conv2d weight, and every ModulatedConv2d weight (as [C_out, C_in, k, k] channels-last, or for
    upsampling layers so that the transposed [C_in, C_out, k, k] view is), in NHWC order. The modulated weight
    W * s d then comes out in the order the CPU convolution wants and needs no copy per call. Values, shapes and
    state-dict keys are unchanged."""
    cl = torch.channels_last
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=cl)
        elif isinstance(m, stylegan2.ModulatedConv2d):
            w = m.weight.data[0]
            w = w.transpose(0, 1).contiguous(memory_format=cl).transpose(0, 1) if m.upsample else \
                w.contiguous(memory_format=cl)
            m.weight.data = w.unsqueeze(0)
    return module


# ----------------------------------------------------------------------------------------------------------
# Style layers: the same results as stylegan2.ModulatedConv2d / StyleConv (tested), computed faster


def weight_norms(layer: stylegan2.ModulatedConv2d) -> torch.Tensor:
    """scale^2 ||W_oi||^2 over the kernel taps  [C_out, C_in]. At inference it is computed once and reused until the
    weight changes (any in-place update bumps the tensor's version counter)."""
    key = (layer.weight.data_ptr(), layer.weight._version)
    cached = layer.__dict__.get("_fast_norms")
    if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
        return cached[1]
    dtype = layer.style_modulation.weight.dtype                      # float32 also when W is stored in bf16/fp16
    w2 = (layer.scale * torch.linalg.vector_norm(layer.weight[0], dim=(2, 3), dtype=dtype)).square()  # no W^2 copy
    if not torch.is_grad_enabled():
        layer.__dict__["_fast_norms"] = (key, w2)
    return w2


def demodulation(layer: stylegan2.ModulatedConv2d, s: torch.Tensor) -> torch.Tensor:
    """d_o = 1 / sqrt(sum_{i,k} (s_i W_oik)^2 + eps) = 1 / sqrt(sum_i s_i^2 ||W_oi||^2 + eps)   [B, C_out]"""
    return torch.rsqrt(s.square() @ weight_norms(layer).T + layer.eps)


def modulated_conv(layer: stylegan2.ModulatedConv2d, x: torch.Tensor, w: torch.Tensor, *, gain: float = 1.0,
                   bias=None) -> torch.Tensor:
    """gain * layer(x, w) + bias, for x [B, C_in, H, W] and styles w [B, S]  ->  [B, C_out, H', W'].

    One sample on large maps: W'' is an ordinary conv weight (gain folded in), one pass over the weight, kept in its
    NHWC order. Small maps (where the weight is larger than the maps) and batches: (W'' * x)_o = d_o (W * (s x))_o,
    so the batch shares one convolution and only the (smaller) activations are scaled.
    """
    B, C, H, W = x.shape
    assert C == layer.in_channels, f"expected {layer.in_channels} input channels, got {C}"
    k = layer.kernel_size
    out_per_in = layer.out_channels / C * (4 if layer.upsample else 1)          # output / input elements
    s = layer.style_modulation(w.to(layer.style_modulation.weight.dtype))        # s = A(w)   [B, I], float32
    bias = bias.to(x.dtype) if bias is not None else None
    if B == 1 and x.numel() * (1 + out_per_in) >= layer.weight.numel():
        factor = (layer.scale * gain) * s[:, None, :]                            # [1, 1, I]
        if layer.demodulate:
            factor = factor * demodulation(layer, s)[:, :, None]                 # [1, O, I]
        weight = (layer.weight[0] * factor[0, :, :, None, None]).to(x.dtype)     # W'' gain  [O, I, k, k]
        if layer.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)        # [1, O, 2H + 1, 2W + 1]
            return layer.blur(out, bias)                                         # [1, O, 2H, 2W]
        return F.conv2d(x, weight, bias, padding=k // 2)                         # [1, O, H, W]
    x = x * (layer.scale * s).to(x.dtype)[:, :, None, None]                      # modulate the activations
    weight = layer.weight[0].to(x.dtype)                                         # [O, I, k, k]
    if layer.upsample:
        out = layer.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))  # [B, O, 2H, 2W]
    else:
        out = F.conv2d(x, weight, padding=k // 2)                                  # [B, O, H, W]
    d = demodulation(layer, s) * gain if layer.demodulate else torch.full_like(s[:, :1], gain)   # [B, O or 1]
    d = d.to(out.dtype)[:, :, None, None]
    return out * d if bias is None else torch.addcmul(bias.view(1, -1, 1, 1).to(out.dtype), out, d)


def style_conv(layer: stylegan2.StyleConv, x: torch.Tensor, w: torch.Tensor, noise=None) -> torch.Tensor:
    """layer(x, w, noise): leaky ReLU is positively homogeneous, lrelu(y) sqrt 2 = lrelu(sqrt 2 y), so the gain is
    folded into the conv and the bias added inside it; at high resolution only two passes remain (noise,
    activation), in place at inference. noise None: fresh N(0, 1) noise, as StyleConv draws it."""
    out = modulated_conv(layer.conv, x, w, gain=SQRT2, bias=layer.activate.bias * SQRT2)
    if noise is None:
        B, _, H, W = out.shape
        noise = torch.randn(B, 1, H, W, device=out.device, dtype=out.dtype)
    noise = (noise * (layer.noise_injector.weight * SQRT2)).to(out.dtype)      # [B or 1, 1, H, W]
    if torch.is_grad_enabled():
        return F.leaky_relu(out + noise, 0.2)
    return F.leaky_relu_(out.add_(noise), 0.2)                                  # in place: no new allocation


def to_rgb(layer: stylegan2.ToRGB, x: torch.Tensor, w: torch.Tensor, skip=None) -> torch.Tensor:
    """layer(x, w, skip) in the layer's own precision (float32 when the style convs run in bf16, see
    to_precision_): the RGB branch is only computed without a decoder (the Fig. 9 ablation), where it is the
    output."""
    dtype = layer.conv.weight.dtype
    return layer(x.to(dtype), w.to(dtype), skip)


class GeneratorFast(stylegan2.Generator):
    """stylegan2.Generator with the fast style layers: what train.py's bank stage trains (a batch of 16 at 64 px
    steps ~1.5x faster than through the grouped convolution). Same modules, keys and results (tested)."""

    def synthesis(self, latents: torch.Tensor, noise="random") -> torch.Tensor:
        B = latents.shape[0]
        assert_shape(latents, [B, self.num_latents, self.cfg.style_channels])
        noise = self.noises() if noise == "const" else [None] * self.num_injected_noises if noise == "random" else noise
        x = style_conv(self.conv1, self.constant_input(B), latents[:, 0], noise[0])    # [B, C4, 4, 4]
        skip = self.to_rgb1(x, latents[:, 1])                                           # [B, 3, 4, 4]
        for k, to_rgb in enumerate(self.to_rgbs):
            x = style_conv(self.convs[2 * k], x, latents[:, 2 * k + 1], noise[2 * k + 1])   # [B, C_r, r, r]
            x = style_conv(self.convs[2 * k + 1], x, latents[:, 2 * k + 2], noise[2 * k + 2])
            skip = to_rgb(x, latents[:, 2 * k + 3], skip)                               # [B, 3, r, r]
        return skip


# ----------------------------------------------------------------------------------------------------------
# Wide convolutions in output-channel slices


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x). At inference on a CPU, a conv with >= 1024 input channels over >= 64x64 pixels (the decoder's and the
    fusion convs) runs as convs of 128 output channels each, then one concatenation: oneDNN blocks the narrower
    convs better for the cache. On the 2-core reference CPU, 1024->1024 at 64x64 takes 349 ms instead of 411 ms
    (385 ms in NCHW), 1024->512 at 64x64 172 ms instead of 200 ms; narrower inputs or smaller maps gain nothing."""
    B, C, H, W = x.shape
    if torch.is_grad_enabled() or x.device.type != "cpu" or C < 1024 or H * W < 64 * 64:
        return conv(x)
    chunk = 128
    weights = conv.weight.split(chunk)
    biases = conv.bias.split(chunk) if conv.bias is not None else [None] * len(weights)
    return torch.cat([conv._conv_forward(x, w, b) for w, b in zip(weights, biases)], 1)


# ----------------------------------------------------------------------------------------------------------
# Strips of rows


def shuffle_cat(o: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """[pixel_shuffle(o, 2), g] along channels, written into one new NHWC buffer.

    o [B, 4C, H, W] -> [B, C (+ C_g), 2H, 2W], with out[b, c, 2h+i, 2w+j] = o[b, 4c + 2i + j, h, w] (PixelShuffle).
    """
    B, C4, H, W = o.shape
    C, C_g = C4 // 4, (g.shape[1] if g is not None else 0)
    out = torch.empty(B, C + C_g, 2 * H, 2 * W, dtype=o.dtype, device=o.device,
                      memory_format=torch.channels_last)
    shuffled = o.unflatten(1, (C, 2, 2)).permute(0, 1, 4, 2, 5, 3)          # [B, C, H, i, W, j]
    out[:, :C].unflatten(2, (H, 2)).unflatten(4, (W, 2)).copy_(shuffled)     # [B, C, H, 2, W, 2] view of out
    if g is not None:
        assert_shape(g, [B, None, 2 * H, 2 * W])
        out[:, C:] = g
    return out


def cut_rows(t: torch.Tensor, t0: int, lo: int, hi: int):
    """Rows [lo, hi) of t, whose first row is row t0, clipped to the rows t has. Returns (rows, first row)."""
    lo, hi = max(lo, t0), min(hi, t0 + t.shape[-2])
    return t[:, :, lo - t0:hi - t0], lo


class Strip(NamedTuple):
    """Rows of one strip, counted at the base resolution of run_in_strips: [r0, r1) computed, [a, b) given."""
    a: int
    r0: int
    r1: int
    b: int

    def crop(self, y: torch.Tensor, scale: int) -> torch.Tensor:
        """The computed rows of y, an output with `scale` rows per base row that starts at row a."""
        return y[:, :, scale * (self.r0 - self.a):scale * (self.r1 - self.a)]


# glibc's malloc_trim(0) returns the heap's free pages to the OS; None where the C library has no such function.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand memory that the C heap holds but no tensor uses back to the OS. Streamed stages (run_in_strips) each
    allocate many temporaries of their own sizes; without this, a stage's freed chunks stay resident while the next
    stage allocates differently sized ones, and peak memory grows by the difference. It has a price: every page
    handed back is faulted in and zeroed again when the heap reuses it (~1 us per 4 KiB page), so run_in_strips
    calls it only before large stages (ffhq 16x's last two), not before every one (which cost cat 8x ~60k page
    faults and ~50 ms per image)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def run_in_strips(fn, inputs: list, scales: list, halo: int, out_scale: int, width: int, max_elems: int = 1 << 22):
    """fn(strip, *inputs) computed on horizontal strips and stitched together, for inference at high resolution.

    Rows are counted at a base resolution: inputs[i] has scales[i] rows per base row (None inputs pass through).
    For each Strip, fn receives the input rows [a, b) = [r0 - halo, r1 + halo) (clipped to the image) and returns
    the output rows [out_scale r0, out_scale r1). The halo is at least fn's receptive-field radius, so the result
    equals the whole-image computation while fn's intermediates exist for one strip at a time. A strip is sized so
    that an output-resolution intermediate with `width` channels has at most about `max_elems` values (16 MB in
    float32): small enough for the allocator to reuse memory between strips instead of faulting in fresh pages.
    """
    x0 = next(x for x in inputs if x is not None)
    B, H, W = x0.shape[0], x0.shape[-2] // scales[0], x0.shape[-1] // scales[0]   # base rows and columns
    rows = max(1, max_elems // (B * width * out_scale ** 2 * W))                    # base rows per strip
    rows = -(-H // -(-H // rows))                                                   # equal strips: reusable memory
    if sum(x.numel() for x in inputs if x is not None) > 3 * max_elems:   # a large stage:
        release_free_memory()                                               # hand back what earlier stages left
    out = None
    for r0 in range(0, H, rows):
        s = Strip(max(0, r0 - halo), r0, min(H, r0 + rows), min(H, r0 + rows + halo))
        y = fn(s, *[x[:, :, s.a * k:s.b * k] if x is not None else None for x, k in zip(inputs, scales)])
        if out is None:
            out = torch.empty(B, y.shape[1], out_scale * H, y.shape[-1], dtype=y.dtype, device=y.device,
                              memory_format=torch.channels_last)
        out[:, :, out_scale * s.r0:out_scale * s.r1] = y
    return out


# ----------------------------------------------------------------------------------------------------------
# GLEAN, fast


class GLEANFast(glean.GLEAN):
    """glean.GLEAN with a faster forward: same modules, state-dict keys and weights, same results up to rounding.

    Build, load and save exactly as GLEAN (`GLEANFast(cfg)`, `GLEANFast.load(path)`, `GLEANFast.from_official(...)`);
    `fast(model)` turns an existing reference model into one.
    """

    def __init__(self, cfg: glean.GLEANConfig):
        super().__init__(cfg)
        # Inference runs blocks whose intermediates exceed this many values on strips of rows (0: whole images).
        # None: 2^22 on a CPU, where strips keep peak memory low at no cost in speed, and 0 on a GPU, where whole
        # images keep it busy (2-3x faster at batch 8 on an H200, for more GPU memory). See run_in_strips.
        self.strip_elems: int | None = None
        nhwc_weights_(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        nhwc_weights_(self)                                     # loaded tensors come in the file's layout
        return result

    def load_bank(self, checkpoint) -> "GLEANFast":
        super().load_bank(checkpoint)
        nhwc_weights_(self.bank)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The precision the convolutions run in (float32 unless to_precision_ changed it); inputs are cast to it."""
        return self.encoder[0][0].conv_first.weight.dtype

    def strip_size(self, device: torch.device) -> int:
        """strip_elems, or its default for this device (None: 2^22 values on a CPU, whole images elsewhere)."""
        if self.strip_elems is not None:
            return self.strip_elems
        return 1 << 22 if device.type == "cpu" else 0

    # -- encoder and bank --------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor):
        """Eq. (1)-(2): features {res: f_i} from in_size down to 4, and C [B, num_latents, style_channels]."""
        B = x.shape[0]
        feats = {self.cfg.in_size: self.encoder[0](x)}                       # f_0: [B, ch[in], in, in]
        if self.bank is None:
            return feats, None
        f = feats[self.cfg.in_size]
        for E_i in self.encoder[1:-1]:                                       # Eq. (1)
            f = E_i(f)                                                       # f_i: [B, ch[r/2], r/2, r/2]
            feats[f.shape[-1]] = f
        conv, act, flatten, fc = self.encoder[-1]
        C = fc(flatten(act(conv(f))).to(fc.weight.dtype))                    # Eq. (2): [B, num_latents * S]
        C = C.view(B, self.cfg.num_latents, self.cfg.style_channels)
        return feats, C

    def bank_input(self, C: torch.Tensor, rgb: bool = False):
        """S_0: the constant 4x4 input through the first style layer (c_0); with rgb=True also its toRGB (c_1)."""
        bank = self.bank
        const = bank.constant_input(C.shape[0]).to(self.dtype, memory_format=torch.channels_last)  # NHWC
        g = style_conv(bank.conv1, const, C[:, 0], bank.injected_noise_0)      # [B, ch[4], 4, 4]
        return g, (to_rgb(bank.to_rgb1, g, C[:, 1]) if rgb else None)

    def fast_style_block(self, k: int, g: torch.Tensor, C: torch.Tensor, feats: dict, skip=None, row0: int = 0):
        """The k-th upsampling style block of the bank, with its fusion conv (Eq. 3): g [B, ch[r], h, r] ->
        [B, ch[2r], 2h, 2r], fusing the encoder feature f at r first if there is one. `skip` is the official RGB
        skip branch (toRGB + fusion_skip): it only matters without a decoder, so it is computed only when given.
        g may be a strip of rows starting at `row0` (h < r, see run_in_strips): the noise is cut to match."""
        bank, (B, _, h, r) = self.bank, g.shape
        i = 2 * k + 1                                                        # index of this block's first latent
        noise = [getattr(bank, f"injected_noise_{n}")[:, :, 2 * row0:2 * (row0 + h)] for n in (i, i + 1)]
        if r <= self.cfg.fuse_encoder_up_to:
            f = feats[r]
            assert_shape(f, [B, g.shape[1], r, r])
            g = conv2d(self.fusion_out[k], torch.cat([g, f], dim=1))         # Eq. (3): [B, ch[r], r, r]
            g = g.contiguous(memory_format=torch.channels_last)
            if skip is not None:
                skip = self.fusion_skip[k](torch.cat([skip, f.to(skip.dtype)], dim=1))   # [B, 3, r, r]
        g = style_conv(bank.convs[2 * k], g, C[:, i], noise[0])              # [B, ch[2r], 2h, 2r]
        g = style_conv(bank.convs[2 * k + 1], g, C[:, i + 1], noise[1])
        if skip is not None:
            skip = to_rgb(bank.to_rgbs[k], g, C[:, i + 2], skip)             # [B, 3, 2r, 2r]
        return g, skip

    def bank_step(self, g: torch.Tensor, C: torch.Tensor, feats: dict, elems: int) -> torch.Tensor:
        """The next style block of the bank: g at resolution r -> 2r (on strips of `elems` if elems and no fusion)."""
        r = g.shape[-1]
        k = int(math.log2(r)) - 2
        if not elems or r <= self.cfg.fuse_encoder_up_to:
            return self.fast_style_block(k, g, C, feats)[0]
        return run_in_strips(lambda s, g_s: s.crop(self.fast_style_block(k, g_s, C, feats, row0=s.a)[0], 2),
                             [g], [1], halo=2, out_scale=2, width=self.channels[2 * r], max_elems=elems)

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = self.check_input(x)
        cfg = self.cfg
        x = x.to(self.dtype, memory_format=torch.channels_last)  # NHWC: the fast layout for CPU (oneDNN), GPU convs
        feats, C = self.encode(x)                                            # Eq. (1), (2)
        if not cfg.use_decoder:                                              # ablation: the bank's RGB is the output
            g, rgb = self.bank_input(C, rgb=True)
            for k in range(len(self.bank.resolutions)):
                g, rgb = self.fast_style_block(k, g, C, feats, rgb)
            return rgb.contiguous()
        # Decoder, Eq. (4), interleaved with the bank: each g_i is consumed, then freed, as soon as it exists.
        # The mapping MLP is never run (C is in w space already) and the bank stops at the last g_i the decoder uses.
        # `o` holds a decoder block's conv output before its pixel-shuffle (see decoder_step). At inference (on CPUs
        # by default, see strip_size), large blocks run on strips of rows (run_in_strips), so the biggest feature
        # maps never exist whole.
        g = self.bank_input(C)[0] if cfg.decoder_bank_up_to else None
        o = conv2d(self.decoder[0].upsample_conv, feats[cfg.in_size])        # D_0(f_0), before the shuffle
        elems = 0 if torch.is_grad_enabled() else self.strip_size(x.device)   # values per strip, 0: whole maps
        stream = bool(elems)
        n = len(self.decoder)
        for j in range(1, n):
            res = 2 * o.shape[-1]                                            # level j's resolution: in_size * 2^j
            uses_g = res <= cfg.decoder_bank_up_to
            if stream and j == n - 2 and cfg.decoder_bank_up_to == cfg.out_size:
                # The last two levels and the bank's last two blocks in one pass over strips of rows.
                # The bank goes to out_size / 4 first; its next block joins the strips unless it fuses an encoder
                # feature or its output is small (up to two strips' worth): strips recompute their halos.
                next_out = self.channels[2 * o.shape[-1]] * (2 * o.shape[-1]) ** 2 * B
                while (g.shape[-1] < o.shape[-1] or g.shape[-1] <= cfg.fuse_encoder_up_to
                       or (g.shape[-1] == o.shape[-1] and next_out <= 2 * elems)):
                    g = self.bank_step(g, C, feats, elems)
                width = max(2 * self.channels[cfg.out_size], cfg.decoder_channels)
                o = run_in_strips(partial(self.top_levels, C=C, feats=feats), [o, g], [1, g.shape[-1] // o.shape[-1]],
                                  halo=2 if g.shape[-1] > o.shape[-1] else 3, out_scale=4, width=width,
                                  max_elems=elems)
                break
            while uses_g and g.shape[-1] < res:                              # the bank up to resolution res
                g = self.bank_step(g, C, feats, elems)
            g_j = g if uses_g else None
            if res == cfg.decoder_bank_up_to:
                g = None                                                     # the bank's last feature: free after use
            D_j = self.decoder[j]
            if stream:
                width = max(o.shape[1] // 4 + (g_j.shape[1] if g_j is not None else 0),         # [d_{j-1}, g_j]
                            D_j.upsample_conv.out_channels if isinstance(D_j, glean.PixelShufflePack) else 0)
                step = lambda s, o_s, g_s, D_j=D_j: s.crop(self.decoder_step(D_j, o_s, g_s), 2)  # noqa: E731
                o = run_in_strips(step, [o, g_j], [1, 2], halo=1, out_scale=2, width=width, max_elems=elems)
            else:
                o = self.decoder_step(D_j, o, g_j)                           # d_j = D_j(d_{j-1}, g_j)
            del g_j
        assert_shape(o, [B, cfg.img_channels, cfg.out_size, cfg.out_size])
        return o.contiguous()

    def top_levels(self, s: Strip, o: torch.Tensor, g: torch.Tensor, C: torch.Tensor, feats: dict) -> torch.Tensor:
        """The last two decoder levels and the bank's blocks up to out_size, on one strip of rows.

        o [B, 4C, h, w]: the conv output of the level at out_size / 4, before its shuffle, rows [s.a, s.b).
        g: the bank at out_size / 4 (same rows; its next block is computed here) or at out_size / 2 (rows 2 s.a..).
        Returns output rows [4 s.r0, 4 s.r1). Each stage is cut to the rows the next one needs: a 3x3 conv
        widens the rows it depends on by 1 on each side, a style block's up-conv by 1 input row (its blur included).
        """
        r0, r1, top = s.r0, s.r1, len(self.bank.resolutions) - 1
        if g.shape[-1] == o.shape[-1]:                                       # g at out_size / 4: one more block
            g = self.fast_style_block(top - 1, g, C, feats, row0=s.a)[0]          # rows from 2 s.a, at out_size / 2
        g, g0 = cut_rows(g, 2 * s.a, 2 * r0 - 3, 2 * r1 + 3)                 # what the up-conv and D_a need
        o, o0 = cut_rows(o, s.a, r0 - 1, r1 + 1)
        o = self.decoder_step(self.decoder[-2], o, cut_rows(g, g0, 2 * o0, 2 * (o0 + o.shape[-2]))[0])
        o, o0 = cut_rows(o, 2 * o0, 2 * r0 - 1, 2 * r1 + 1)                  # d at out_size / 2, before the shuffle
        g, g0 = cut_rows(self.fast_style_block(top, g, C, feats, row0=g0)[0], 2 * g0, 4 * r0 - 2, 4 * r1 + 2)
        x = shuffle_cat(o, g)                                                # [d, g] at out_size: rows from 2 o0
        del o, g
        return cut_rows(self.output_block(x), 2 * o0, 4 * r0, 4 * r1)[0]

    def decoder_step(self, D_j: nn.Module, o: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """d_j = D_j(d_{j-1}, g_j), Eq. (4): the previous block's conv output o [B, 4C, h, w] is pixel-shuffled to
        d_{j-1} [B, C, 2h, 2w] and concatenated with the bank feature g_j in one copy (shuffle_cat), then D_j's conv
        runs; its own shuffle is left to the next step. The output block (conv, lrelu, conv) ends the chain."""
        if isinstance(D_j, glean.PixelShufflePack):
            return conv2d(D_j.upsample_conv, shuffle_cat(o, g))              # [B, C + C_g, 2h, 2w] -> conv
        return self.output_block(shuffle_cat(o, g))

    def output_block(self, x: torch.Tensor) -> torch.Tensor:
        """The last decoder block, conv -> lrelu -> conv to RGB [B, 3, H, W], its RGB conv in that conv's own
        precision (float32 when the rest runs in bf16/fp16, see to_precision_)."""
        conv, act, conv_rgb = self.decoder[-1]
        return conv_rgb(act(conv(x)).to(conv_rgb.weight.dtype))


# ----------------------------------------------------------------------------------------------------------
# Precision: the convolutions in bf16 (CPUs with bf16 instructions) or fp16 (GPUs), for inference


def to_precision_(model: GLEANFast, dtype: torch.dtype) -> GLEANFast:
    """Run the model's convolutions in `dtype` (torch.bfloat16 or torch.float16) at inference: their weights are
    stored in it (half the memory) and the activations between them flow in it, in NHWC; oneDNN and cuDNN sum each
    convolution in float32 and round its output. Stay in float32: the styles s = A(w) and the demodulation norms
    of the bank (vectors, computed once per image), the modulated weight W'' = W s d (rounded once, as the
    convolution takes it), the final RGB conv (the output: bf16 keeps 8 bits, an 8-bit image needs more in
    [-1, 1]) and the RGB branch of the no-decoder ablation. The model takes any float input, casts it inside and
    returns float32. dtype float32: nothing changes. Set once, on a float32 model; not for training.
    Rounding differs with the batch size (one image scales the weight, a batch the activations, each rounded to
    dtype): a batch's outputs equal single images' up to that rounding (~1/255), not bit for bit as in float32."""
    if not isinstance(model, GLEANFast):
        raise TypeError(f"to_precision_ takes a GLEANFast (glean_fast.fast(model)); the reference "
                        f"{type(model).__name__} stays float32")
    if model.dtype == dtype:
        return model
    if model.dtype != torch.float32:
        raise ValueError(f"to_precision_ needs a float32 model, this one runs in {model.dtype}; load it again")
    layers = [m for m in model.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if model.bank is not None:
        layers += list(model.fusion_out) + [model.bank.conv1.conv] + [c.conv for c in model.bank.convs]
    if model.cfg.use_decoder:
        layers += [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d) and m is not model.decoder[-1][-1]]
    freed = 0
    for m in layers:
        freed += m.weight.numel() * 4
        m.weight.data = m.weight.data.to(dtype)                  # the NHWC layout is kept (values rounded)
        if getattr(m, "bias", None) is not None:
            m.bias.data = m.bias.data.to(dtype)
        if freed > 1 << 24:     # every 16 MB of float32 weights freed: hand it back, else the process keeps the float32
            release_free_memory()   # weights resident beside their copies (cat 8x: +160 MB of peak RSS)
            freed = 0
    release_free_memory()
    return model


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Instruction-set features (torch.cpu.get_capabilities names) with which a CPU computes bf16 / fp16 convolutions
# natively: AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake), AMX (Intel Sapphire Rapids and later), ARM BF16.
CPU_FEATURES = {"bf16": ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
                "fp16": ("avx512_fp16", "amx_fp16", "fp16_arith")}
# --precision auto, decided by `python bench.py --precision-report` (README, "Precision"): bf16 kept every shipped
# model >= 50 dB from fp32 (8-bit PSNR on LFW faces) at twice the speed; fp16 kept it >= 60 dB.
AUTO_RULE = ("auto: bf16 on a CPU with bf16 instructions (AVX512-BF16, AMX, ARM BF16; 2x the speed of fp32, "
             "outputs >= 50 dB from fp32's), fp16 on a CUDA GPU, fp32 elsewhere")


def cpu_features() -> set:
    """The instruction-set features torch sees on this CPU (torch.cpu.get_capabilities; before torch 2.8, the
    flags of /proc/cpuinfo, or none)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return {k for k, v in get().items() if v is True}
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def native(precision: str, device: torch.device) -> bool:
    """Whether the device computes convolutions in this precision natively (not emulated, slower than fp32)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(cpu_features() & set(CPU_FEATURES[precision]))


def choose_precision(precision: str, device: torch.device) -> tuple:
    """(precision to run in, a one-line note or ""): "auto" resolved by AUTO_RULE; an explicit bf16 or fp16 runs as
    asked, with a note if the device lacks the instructions for it."""
    if precision == "auto":
        best = "bf16" if device.type == "cpu" else "fp16" if device.type == "cuda" else "fp32"
        return (best if native(best, device) else "fp32"), ""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': choose auto, {', '.join(PRECISIONS)}")
    if native(precision, device):
        return precision, ""
    what = (f"this CPU has no {precision} instructions ({', '.join(CPU_FEATURES[precision][:3])})"
            if device.type == "cpu" else f"this {device.type} device has no {precision} support")
    return precision, f"{what}: {precision} runs emulated, slower than fp32 (--precision auto picks fp32 here)"


def precision_line(asked: str, chosen: str, device: torch.device) -> str:
    """What a front end prints once: the precision in use, and why when auto chose it."""
    why = ("" if asked != "auto" else
           f" (auto: this CPU {'has' if chosen == 'bf16' else 'has no'} bf16 instructions)" if device.type == "cpu"
           else " (auto)")
    return f"precision: {chosen} on {device}{why}" + ("; --precision fp32 for float32 throughout" * (chosen != "fp32"))


def fast(model: glean.GLEAN) -> GLEANFast:
    """The fast path over a reference model's weights: a GLEANFast holding the same tensors (those of its convs
    re-laid out to NHWC), in the same train/eval mode and with the same trainable parameters."""
    if isinstance(model, GLEANFast):
        return model
    with torch.device("meta"):
        out = GLEANFast(model.cfg)
    out.load_state_dict(model.state_dict(), assign=True)   # new Parameters over the same storage
    return out.train(model.training)
