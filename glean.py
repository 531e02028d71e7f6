"""GLEAN: Generative Latent Bank for Large-Factor Image Super-Resolution (Chan et al., CVPR 2021).

The reference model: eq. (1)-(4) on whole images, in the paper's order, with its symbols.

    f_0 = E_0(x)                      RRDBNet features of the LR image x
    f_i = E_i(f_{i-1}), i = 1..N      stride-2 blocks from in_size down to 4x4               Eq. (1)
    C   = E_{N+1}(f_N)                conv + fully connected: the latent vectors             Eq. (2)
    g_0 = S_0(c_0, f_N)               style blocks of a frozen, pretrained StyleGAN2 (the    Eq. (3)
    g_i = S_i(c_i, g_{i-1}, f_{N-i})  latent bank), each with an extra conv fusing f_{N-i}
    d_0 = D_0(f_0)                    3x3 conv + pixel-shuffle blocks fusing the bank's      Eq. (4)
    d_i = D_i(d_{i-1}, g_{N+i})       features coarse to fine; the last one outputs y_hat

Fig. 2 (in_size 32 -> out_size 256, N = 3), one row per resolution, each box with its modules:

    res  encoder, Eq. (1)-(2)   latent bank, Eq. (3)                       decoder, Eq. (4)
      4  E_3 encoder[3]  f_3    S_0 bank.conv1        + fusion_out[0]  g_0
      8  E_2 encoder[2]  f_2    S_1 bank.convs[0, 1]  + fusion_out[1]  g_1
     16  E_1 encoder[1]  f_1    S_2 bank.convs[2, 3]  + fusion_out[2]  g_2
     32  E_0 encoder[0]  f_0    S_3 bank.convs[4, 5]  + fusion_out[3]  g_3  D_0 decoder[0]  d_0
     64                         S_4 bank.convs[6, 7]                   g_4  D_1 decoder[1]  d_1
    128                         S_5 bank.convs[8, 9]                   g_5  D_2 decoder[2]  d_2
    256                         S_6 bank.convs[10, 11]                 g_6  D_3 decoder[3]  y_hat
         E_4 encoder[4] on f_3: C, 14 latent vectors (13 style layers, the last toRGB; see Indices)

E_0 is an RRDBNet + conv on x, E_1..E_N a stride-2 conv + conv, E_{N+1} a conv + linear layer.
S_0 is a style layer on the bank's learned 4x4 constant, S_i a 2x upsampling style layer and a style
layer on g_{i-1}; where an encoder feature of the same size exists (i <= N), then an extra conv on
[., f_{N-i}]. D_0 takes f_0, D_i [d_{i-1}, g_{N+i}], at their row's size; each doubles it (3x3 conv,
pixel-shuffle) but the last: 3x3 conv, lrelu, 3x3 conv to the RGB image y_hat.

Indices. f_i is at in_size / 2^i (N = log2(in_size) - 2: f_N is 4x4), g_i at 4 * 2^i; the code keeps
both as lists in the paper's order, f[i] and g[i]. Eq. (4)'s subscript N - 2 + i counts the bank
from another origin: D_i joins to d_{i-1} the bank feature of d_{i-1}'s size, in_size * 2^i: g[N+i].
Eq. (3) writes one latent vector c_i per block; StyleGAN2 gives each layer its own, and the banks
were trained so: layer n of the bank's flat list [conv1, *convs] takes row n of C and the fixed
noise map injected_noise_n (S_0: n = 0; S_i: n = 2i - 1, 2i), a toRGB layer (Fig. 9's variant only)
the row of the next layer: C has 2 log2(out_size) - 2 rows.

Images enter and leave in [-1, 1] (RGB); the network does not clamp. Parameter names mirror the
official implementation (mmagic `GLEANStyleGANv2`), the bank called `bank` (official: `generator`);
file formats and official names are weight_formats.py's job. glean_fast.GLEANFast computes the same
network faster (strips, NHWC, sliced convs) with the same modules and weights, tested equal to it.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import stylegan2
import weight_formats
from rrdbnet import RRDBNet
from stylegan2 import assert_shape


@dataclass
class GLEANConfig:
    in_size: int = 64                # LR input resolution (power of two, >= 8)
    out_size: int = 1024             # HR output = the bank's size; out/in in {4, 8, 16, 32, 64}
    img_channels: int = 3            # RGB
    rrdb_channels: int = 64          # width of the RRDBNet E_0 (ESRGAN: 64)
    num_rrdbs: int = 23              # RRDB blocks in E_0 (ESRGAN: 23)
    rrdb_growth_channels: int = 32   # growth channels inside each residual dense block
    style_channels: int = 512        # length of each latent vector c_i (StyleGAN2 w: 512)
    num_mlps: int = 8                # bank mapping network depth (GLEAN never runs it)
    channel_multiplier: int = 2      # StyleGAN2 config-f channel multiplier
    channel_base: int = 512          # StyleGAN2 channels at 4-32 px; the table scales by it / 512
    blur_kernel: tuple = (1, 3, 3, 1)  # StyleGAN2 FIR kernel
    lr_mlp: float = 0.01             # mapping network learning-rate multiplier
    decoder_channels: int = 64       # hidden width of the last decoder block
    # Ablations of Section 5. None means "all resolutions" (the full GLEAN).
    fuse_encoder_up_to: int | None = None  # Fig. 7: f_i into the bank at res <= this; 0: C only
    decoder_bank_up_to: int | None = None  # Fig. 8: g_i into the decoder at res <= this; 0: none
    use_decoder: bool = True               # Fig. 9: False = the bank's own RGB output is y_hat

    def __post_init__(self):
        self.blur_kernel = tuple(self.blur_kernel)
        sizes = [2 ** i for i in range(2, 11)]                      # a StyleGAN2 bank's: 4 .. 1024
        if self.in_size not in sizes[1:]:
            raise ValueError(f"in_size must be a power of two >= 8, got {self.in_size}")
        if self.out_size not in sizes or self.out_size // self.in_size not in (4, 8, 16, 32, 64):
            raise ValueError(f"out_size / in_size must be 4, 8, 16, 32 or 64 and out_size <= 1024, "
                             f"got {self.out_size}/{self.in_size}")
        if self.fuse_encoder_up_to is None:
            self.fuse_encoder_up_to = self.in_size
        if self.decoder_bank_up_to is None:
            self.decoder_bank_up_to = self.out_size
        if self.fuse_encoder_up_to not in [0] + [r for r in sizes if r <= self.in_size]:
            raise ValueError(f"fuse_encoder_up_to must be 0 or a power of two in [4, in_size], "
                             f"got {self.fuse_encoder_up_to}")
        lo, hi = self.in_size, self.out_size
        if self.decoder_bank_up_to not in [0] + [r for r in sizes if lo < r <= hi]:
            raise ValueError(f"decoder_bank_up_to must be 0 or a power of two in (in_size, "
                             f"out_size], got {self.decoder_bank_up_to}")

    @property
    def scale(self) -> int:
        return self.out_size // self.in_size

    @property
    def num_latents(self) -> int:                        # rows of C (see Indices above)
        return 2 * int(math.log2(self.out_size)) - 2

    @property
    def uses_bank(self) -> bool:
        return not self.use_decoder or self.decoder_bank_up_to > 0

    def bank_config(self) -> stylegan2.GeneratorConfig:
        return stylegan2.GeneratorConfig(
            out_size=self.out_size, style_channels=self.style_channels, num_mlps=self.num_mlps,
            channel_multiplier=self.channel_multiplier, channel_base=self.channel_base,
            blur_kernel=self.blur_kernel, lr_mlp=self.lr_mlp)

    @classmethod
    def from_dict(cls, d: dict) -> "GLEANConfig":
        """A config from plain data (e.g. a file's), field names and value types checked first."""
        return weight_formats.config_from_dict(cls, d)


# -------------------------------------------------------------------------------------------------
# D_i: the decoder's upsampling block


class PixelShufflePack(nn.Module):
    """A decoder block D_i: 3x3 conv to 4x the channels, then pixel-shuffle to twice the size.
    Kaiming-normal initialised (fan_in, ReLU gain, zero bias), as the official code does."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample_conv = nn.Conv2d(in_channels, out_channels * 4, 3, 1, 1)
        if not self.upsample_conv.weight.is_meta:
            nn.init.kaiming_normal_(self.upsample_conv.weight, nonlinearity="relu")
            nn.init.zeros_(self.upsample_conv.bias)

    def forward(self, x):                   # [B, C_in, H, W] -> [B, 4 C_out, H, W]
        return F.pixel_shuffle(self.upsample_conv(x), 2)   # -> [B, C_out, 2H, 2W]


# -------------------------------------------------------------------------------------------------
# GLEAN


class GLEAN(nn.Module):
    """Encoder E_0..E_{N+1}, frozen StyleGAN2 latent bank S_i and extra convs, decoder D_i (Fig. 2):
    an LR image [B, 3, in_size, in_size] in [-1, 1] -> [B, 3, out_size, out_size]."""

    def __init__(self, cfg: GLEANConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = ch = stylegan2.channel_table(cfg.channel_multiplier, cfg.channel_base)
        self.N = int(math.log2(cfg.in_size)) - 2             # stride-2 encoder blocks E_1..E_N
        lrelu = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.encoder = nn.ModuleList([nn.Sequential(          # E_0: RRDBNet + conv, f_0
            RRDBNet(cfg.img_channels, cfg.rrdb_channels, cfg.num_rrdbs, cfg.rrdb_growth_channels),
            nn.Conv2d(cfg.rrdb_channels, ch[cfg.in_size], 3, 1, 1), lrelu())])
        self.bank = None
        if cfg.uses_bank:
            for r in (cfg.in_size // 2 ** i for i in range(self.N)):     # E_1..E_N, Eq. (1)
                self.encoder.append(nn.Sequential(
                    nn.Conv2d(ch[r], ch[r // 2], 3, 2, 1), lrelu(),
                    nn.Conv2d(ch[r // 2], ch[r // 2], 3, 1, 1), lrelu()))
            self.encoder.append(nn.Sequential(                         # E_{N+1}: C, Eq. (2)
                nn.Conv2d(ch[4], ch[4], 3, 1, 1), lrelu(), nn.Flatten(),
                nn.Linear(16 * ch[4], cfg.num_latents * cfg.style_channels)))
            # The latent bank, a pretrained StyleGAN2 generator, frozen by requires_grad_(False)
            # (Sec. 3.4). Its train/eval mode changes nothing: it has no dropout or batch norm.
            self.bank = stylegan2.Generator(cfg.bank_config())
            self.bank.requires_grad_(False)
            # S_i's extra conv fusion_out[i] at r = 4 * 2^i, for r <= fuse_encoder_up_to: Eq. (3)
            fused = [2 ** i for i in range(2, int(math.log2(max(cfg.fuse_encoder_up_to, 1))) + 1)]
            self.fusion_out = nn.ModuleList([nn.Conv2d(2 * ch[r], ch[r], 3, 1, 1) for r in fused])
            # the official fusion of f into the bank's RGB path: it matters only without a decoder
            self.fusion_skip = nn.ModuleList([nn.Conv2d(ch[r] + 3, 3, 3, 1, 1) for r in fused])
            if cfg.use_decoder:
                self.fusion_skip.requires_grad_(False)
        if cfg.use_decoder:                                      # D_0 .. D_last, Eq. (4)
            self.decoder = nn.ModuleList()
            for r in (cfg.in_size * 2 ** i for i in range(int(math.log2(cfg.scale)) + 1)):
                c_in = ch[r] + (ch[r] if cfg.in_size < r <= cfg.decoder_bank_up_to else 0)  # [d, g]
                c_mid = cfg.decoder_channels
                self.decoder.append(PixelShufflePack(c_in, ch[2 * r]) if r < cfg.out_size else
                                    nn.Sequential(nn.Conv2d(c_in, c_mid, 3, 1, 1), lrelu(),
                                                  nn.Conv2d(c_mid, cfg.img_channels, 3, 1, 1)))

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def check_input(self, x: torch.Tensor) -> int:
        """The batch size of x, after checking that x is [B, img_channels, in_size, in_size]."""
        c, s = self.cfg.img_channels, self.cfg.in_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"GLEAN expects input [B, {c}, {s}, {s}], got {list(x.shape)}")
        return x.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (1)-(4): x [B, 3, in, in] -> y_hat [B, 3, out, out], both in [-1, 1]. Each feature is
        [B, ch[r], r, r] (ch = self.channels), at r = in / 2^i for f_i, 4 * 2^i for h and g_i."""
        cfg, N = self.cfg, self.N
        if not cfg.use_decoder:
            return self.bank_image(x)                        # Fig. 9's variant: no decoder
        B = self.check_input(x)
        f = [self.encoder[0](x)]                             # f_0 = E_0(x)
        g = []                                               # stays empty in Fig. 8's "no g"
        if self.bank is not None:
            for E_i in self.encoder[1:N + 1]:
                f.append(E_i(f[-1]))                         # Eq. (1) f_i = E_i(f_{i-1})
            assert_shape(f[N], [B, self.channels[4], 4, 4])
            C = self.encoder[N + 1](f[N])                    # Eq. (2) C = E_{N+1}(f_N)
            C = C.view(B, cfg.num_latents, cfg.style_channels)   # [B, L, S]: row n for layer n
            for i in range(len(self.bank.resolutions) + 1):  # S_0 .. S_K, up to out_size
                h = self.style_block(i, g[-1] if i else None, C)   # S_i's StyleGAN2 layers
                if i < len(self.fusion_out):                 # an f_{N-i} of h's size:
                    h = self.fuse(i, h, f[N - i])            # S_i's extra conv
                g.append(h)                              # Eq. (3) g_i = S_i(c_i, g_{i-1}, f_{N-i})
        d = self.decoder[0](f[0])                            # Eq. (4) d_0 = D_0(f_0), at 2 in
        for i, D_i in enumerate(self.decoder[1:], start=1):
            r = d.shape[-1]                                  # in * 2^i, d_{i-1}'s resolution
            if r <= cfg.decoder_bank_up_to:
                assert_shape(g[N + i], [B, self.channels[r], r, r])
                d = torch.cat([d, g[N + i]], dim=1)          # [d_{i-1}, g_{N+i}] [B, 2 ch[r], r, r]
            d = D_i(d)                                       # Eq. (4) d_i = D_i(d_{i-1}, g_{N+i})
        assert_shape(d, [B, cfg.img_channels, cfg.out_size, cfg.out_size])   # from the output block
        return d

    def style_layer(self, n: int, h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """Layer n of the bank's [conv1, *convs]: modulated 3x3 conv, noise, lrelu; its latent
        vector is C[:, n], its noise the fixed map injected_noise_n (y_hat is a function of x)."""
        layer = self.bank.conv1 if n == 0 else self.bank.convs[n - 1]
        return layer(h, C[:, n], getattr(self.bank, f"injected_noise_{n}"))

    def style_block(self, i: int, g_prev: torch.Tensor | None, C: torch.Tensor) -> torch.Tensor:
        """The StyleGAN2 layers of S_i. S_0: one layer on the learned 4x4 constant. S_i, i >= 1: two
        layers take g_{i-1} to r = 4 * 2^i, each with its own latent vector (rows 2i - 1, 2i of C),
        because the pretrained bank's layers were trained with a style each, not one per block."""
        if i == 0:
            return self.style_layer(0, self.bank.constant_input(C.shape[0]), C)   # [B, ch[4], 4, 4]
        h = self.style_layer(2 * i - 1, g_prev, C)           # 2x up-conv  [B, ch[r], r, r]
        return self.style_layer(2 * i, h, C)                 # conv        [B, ch[r], r, r]

    def fuse(self, i: int, h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """S_i's extra conv fusion_out[i]: [h, f_{N-i}] [B, 2 ch[r], r, r] -> [B, ch[r], r, r]."""
        assert_shape(f, h.shape)
        return self.fusion_out[i](torch.cat([h, f], dim=1))

    def bank_image(self, x: torch.Tensor) -> torch.Tensor:
        """Fig. 9's variant (use_decoder=False): the bank's own RGB output is y_hat. StyleGAN2's
        toRGB layers run on each S_i's layers' output h (before its extra conv) and sum their
        upsampled RGB; the official code also fuses each f_{N-i} into that RGB (fusion_skip[i])."""
        cfg, N, B = self.cfg, self.N, self.check_input(x)
        f = [self.encoder[0](x)]
        for E_i in self.encoder[1:N + 1]:
            f.append(E_i(f[-1]))                             # Eq. (1)
        C = self.encoder[N + 1](f[N]).view(B, cfg.num_latents, cfg.style_channels)   # Eq. (2)
        g = rgb = None
        for i in range(len(self.bank.resolutions) + 1):
            h = self.style_block(i, g, C)                    # [B, ch[r], r, r]
            rgb = (self.bank.to_rgb1(h, C[:, 1]) if i == 0 else    # [B, 3, r, r], with the row
                   self.bank.to_rgbs[i - 1](h, C[:, 2 * i + 1], rgb))   # of the next layer
            g = h
            if i < len(self.fusion_out):
                g = self.fuse(i, h, f[N - i])                # Eq. (3)
                rgb = self.fusion_skip[i](torch.cat([rgb, f[N - i]], dim=1))
        return rgb

    # -- weights: the file formats are weight_formats.py's job ---------------------------------

    def official_names(self) -> dict:
        """Our state-dict keys -> the official release file's (`generator.`, bank `generator`)."""
        return weight_formats.glean_official_names(self)

    @classmethod
    def from_official(cls, checkpoint, cfg: GLEANConfig | dict | None = None, *, source: str = ""):
        """An official GLEAN release file (path or dict; `source`: a dict's file, for messages),
        built from `cfg` (default GLEANConfig()), each `generator.` key matched; eval mode."""
        cfg = GLEANConfig.from_dict(cfg) if isinstance(cfg, dict) else (cfg or GLEANConfig())
        return weight_formats.glean_from_official(cls, checkpoint, cfg, source)

    def load_bank(self, checkpoint) -> "GLEAN":
        """Pretrained StyleGAN2 weights into the bank, from any file weight_formats reads."""
        if self.bank is None:
            raise ValueError("this configuration has no latent bank (decoder_bank_up_to=0)")
        weight_formats.load_generator_weights(self.bank, checkpoint)
        return self

    def save(self, path) -> None:
        """This project's format: tensors + config as plain data (.safetensors/.pt), atomically."""
        weight_formats.save_glean(self, path)

    @classmethod
    def load(cls, checkpoint, *, source: str = ""):
        """This project's format (see `save`; path or loaded dict); the model in eval mode."""
        return weight_formats.load_glean(cls, GLEANConfig, checkpoint, source)
