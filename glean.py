"""GLEAN: Generative Latent Bank for Large-Factor Image Super-Resolution (Chan et al., CVPR 2021).

An encoder-bank-decoder network (Fig. 2):
    f_0 = E_0(x)                     RRDBNet features of the low-resolution image x, at in_size
    f_i = E_i(f_{i-1}),  i = 1..N    stride-2 blocks down to 4x4                                       Eq. (1)
    C   = E_{N+1}(f_N)               conv + fully-connected: latent vectors c_0..c_{k-1}             Eq. (2)
    g_i = S_i(c_i, g_{i-1}, f_{N-i}) style blocks of a frozen StyleGAN2 (the latent bank), each fusing the
                                     encoder feature of its resolution with one extra convolution     Eq. (3)
    d_i = D_i(d_{i-1}, g_{N-2+i})    3x3 conv + pixel-shuffle decoder fusing bank features coarse-to-fine Eq. (4)

Images enter and leave in [-1, 1] (RGB); the network does not clamp. Parameter names mirror the official
implementation (mmagic `GLEANStyleGANv2`) with the bank called `bank` (official: `generator`), so released weights
load through `official_names` in one place.

Also here: `imresize`, MATLAB's antialiased bicubic resize, which made the training inputs of the released models.
"""
import ctypes
import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import stylegan2
from glean_io import CheckpointError, download, load_file, load_state_strict, save_file, sha256_of, state_dict_of
from stylegan2 import assert_shape


@dataclass
class GLEANConfig:
    in_size: int = 64                # LR input resolution (power of two, >= 8)
    out_size: int = 1024             # HR output resolution = StyleGAN2 resolution; out/in in {4, 8, 16, 32, 64}
    img_channels: int = 3            # RGB
    rrdb_channels: int = 64          # width of the RRDBNet E_0 (ESRGAN: 64)
    num_rrdbs: int = 23              # RRDB blocks in E_0 (ESRGAN: 23)
    rrdb_growth_channels: int = 32   # growth channels inside each residual dense block
    style_channels: int = 512        # length of each latent vector c_i (StyleGAN2 w: 512)
    num_mlps: int = 8                # bank mapping network depth (unused by GLEAN's forward, kept for the weights)
    channel_multiplier: int = 2      # StyleGAN2 config-f channel multiplier
    channel_base: int = 512          # StyleGAN2 channels at 4-32 px; the whole table scales by channel_base/512
    blur_kernel: tuple = (1, 3, 3, 1)  # StyleGAN2 FIR kernel
    lr_mlp: float = 0.01             # mapping network learning-rate multiplier
    decoder_channels: int = 64       # hidden width of the last decoder block
    # Ablations of Section 5. None means "all resolutions" (the full GLEAN).
    fuse_encoder_up_to: int | None = None  # Fig. 7: f_i fused into the bank at res <= this; 0 = latent vectors only
    decoder_bank_up_to: int | None = None  # Fig. 8: g_i passed to the decoder at res <= this; 0 = no bank features
    use_decoder: bool = True               # Fig. 9: False = the bank's own RGB output is the result

    def __post_init__(self):
        self.blur_kernel = tuple(self.blur_kernel)
        pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
        if not (pow2(self.in_size) and self.in_size >= 8):
            raise ValueError(f"in_size must be a power of two >= 8, got {self.in_size}")
        if self.out_size // self.in_size not in (4, 8, 16, 32, 64) or not pow2(self.out_size):
            raise ValueError(f"out_size / in_size must be 4, 8, 16, 32 or 64, got {self.out_size}/{self.in_size}")
        if self.out_size > 1024:
            raise ValueError(f"out_size must be <= 1024 (StyleGAN2 banks), got {self.out_size}")
        if self.fuse_encoder_up_to is None:
            self.fuse_encoder_up_to = self.in_size
        if self.decoder_bank_up_to is None:
            self.decoder_bank_up_to = self.out_size
        if self.fuse_encoder_up_to not in [0] + [2 ** i for i in range(2, int(math.log2(self.in_size)) + 1)]:
            raise ValueError(f"fuse_encoder_up_to must be 0 or a power of two in [4, in_size], "
                             f"got {self.fuse_encoder_up_to}")
        if self.decoder_bank_up_to not in [0] + [2 ** i for i in range(int(math.log2(self.in_size)) + 1,
                                                                       int(math.log2(self.out_size)) + 1)]:
            raise ValueError(f"decoder_bank_up_to must be 0 or a power of two in (in_size, out_size], "
                             f"got {self.decoder_bank_up_to}")

    @property
    def scale(self) -> int:
        return self.out_size // self.in_size

    @property
    def num_latents(self) -> int:
        return 2 * int(math.log2(self.out_size)) - 2

    @property
    def uses_bank(self) -> bool:
        return not self.use_decoder or self.decoder_bank_up_to > 0

    def bank_config(self) -> stylegan2.GeneratorConfig:
        return stylegan2.GeneratorConfig(out_size=self.out_size, style_channels=self.style_channels,
                                         num_mlps=self.num_mlps, channel_multiplier=self.channel_multiplier,
                                         channel_base=self.channel_base, blur_kernel=self.blur_kernel,
                                         lr_mlp=self.lr_mlp)

    @classmethod
    def from_dict(cls, d: dict) -> "GLEANConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GLEANConfig fields: {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Pretrained weights, declared once (used by hubconf.py, infer.py, demo.py and train.py)


@dataclass(frozen=True)
class Weights:
    url: str              # download address (http(s), file://) or a path relative to this file
    sha256: str           # prefix of the file's sha256, checked after download
    kind: str             # "glean-official" (release layout), "glean" (ours), "stylegan2-official", "stylegan2" (ours)
    config: dict          # GLEANConfig or stylegan2.GeneratorConfig kwargs
    category: str         # what the model was trained on
    license: str          # licence of the weights and of their training data
    pixel_range: str = "RGB in [-1, 1] (x / 127.5 - 1)"
    note: str = ""


_MMEDIT = "https://download.openmmlab.com/mmediting"
_APACHE = "weights: Apache-2.0 (OpenMMLab release)"
_SMALL = dict(style_channels=96, num_mlps=2, channel_multiplier=1, channel_base=96)   # the shipped 64 px bank
_CELEBA = ("weights: Apache-2.0 (this project); data: CelebA ids 1-10000, non-commercial research purposes only "
           "(CelebA terms); see weights/MODEL_CARD.md")
WEIGHTS = {
    "glean_face_small_8x": Weights(
        "weights/glean_face_small_8x.safetensors", "1ed45f55", "glean",
        dict(in_size=8, out_size=64, rrdb_channels=64, num_rrdbs=3, rrdb_growth_channels=32, decoder_channels=64,
             **_SMALL), "faces (CelebA, 64x64 crops framed like LFW's: face ~60% of the width)", _CELEBA,
        note="this project's small GLEAN, 8x (8 -> 64), trained on a 2-core CPU; ships with the code, works offline"),
    "glean_face_16x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_ffhq_16x_20210527-61a3afad.pth", "61a3afad", "glean-official",
        dict(in_size=64, out_size=1024), "faces (FFHQ)", f"{_APACHE}; data: FFHQ, CC BY-NC-SA 4.0",
        note="official GLEAN, 16x (64 -> 1024), bicubic (MATLAB) degradation"),
    "glean_face_in128_8x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_in128out1024_4x2_300k_ffhq_celebahq_20210812-acbcb04f.pth", "acbcb04f",
        "glean-official", dict(in_size=128, out_size=1024), "faces (FFHQ + CelebA-HQ)",
        f"{_APACHE}; data: FFHQ (CC BY-NC-SA 4.0), CelebA-HQ (non-commercial research)",
        note="official GLEAN, 8x (128 -> 1024), trained with real-world degradations (blur, noise, JPEG)"),
    "glean_cat_8x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_cat_8x_20210614-d3ac8683.pth", "d3ac8683", "glean-official",
        dict(in_size=32, out_size=256), "cats (LSUN cat)", f"{_APACHE}; data: LSUN, research use",
        note="official GLEAN, 8x (32 -> 256)"),
    "glean_cat_16x": Weights(
        f"{_MMEDIT}/restorers/glean/glean_cat_16x_20210527-68912543.pth", "68912543", "glean-official",
        dict(in_size=16, out_size=256), "cats (LSUN cat)", f"{_APACHE}; data: LSUN, research use",
        note="official GLEAN, 16x (16 -> 256)"),
    "stylegan2_ffhq_1024": Weights(
        f"{_MMEDIT}/stylegan2/official_weights/stylegan2-ffhq-config-f-official_20210327_171224-bce9310c.pth",
        "bce9310c", "stylegan2-official", dict(out_size=1024), "faces (FFHQ)",
        "NVIDIA Source Code License-NC (non-commercial); data: FFHQ, CC BY-NC-SA 4.0",
        note="official StyleGAN2 config-f converted by OpenMMLab: the latent bank of the face models"),
    "stylegan2_cat_256": Weights(
        f"{_MMEDIT}/stylegan2/official_weights/stylegan2-cat-config-f-official_20210327_172444-15bc485b.pth",
        "15bc485b", "stylegan2-official", dict(out_size=256), "cats (LSUN cat)",
        "NVIDIA Source Code License-NC (non-commercial); data: LSUN, research use",
        note="official StyleGAN2 config-f converted by OpenMMLab: the latent bank of the cat models"),
    "stylegan2_celeba_64": Weights(
        "weights/stylegan2_celeba_64.safetensors", "1315473a", "stylegan2", dict(out_size=64, **_SMALL),
        "faces (CelebA, 64x64 centre crops)", _CELEBA,
        note="this project's small StyleGAN2 (64 px), trained with train.py --stage bank: the latent bank of "
             "glean_face_small_8x; ships with the code"),
}


DEFAULT_MODEL = "glean_face_small_8x"   # what infer.py, demo.py and torch.hub users get without naming a model


def shipped_file(w: Weights) -> Path:
    """A file that ships with the code: next to this file (a clone, an editable install, torch.hub) or in
    <prefix>/share/glean-sr/ (a wheel install); hash-checked, so a Git LFS pointer or a damaged copy is named."""
    places = [Path(__file__).resolve().parent / w.url, Path(sys.prefix) / "share" / "glean-sr" / w.url]
    path = next((p for p in places if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{w.url} is missing (looked in {', '.join(str(p.parent) for p in places)}); "
                              f"reinstall the package or clone the repository again")
    if not sha256_of(path).startswith(w.sha256):
        raise CheckpointError(f"{path} is damaged (sha256 does not start with {w.sha256}); restore it with "
                              f"git checkout -- {w.url} or reinstall the package")
    return path


def weights_file(name_or_path, progress: bool = True) -> Path:
    """A registered weights name -> its local file (downloaded once into the torch.hub cache, hash-checked, or
    shipped with the code); any other string is taken as a path and must exist."""
    if name_or_path in WEIGHTS:
        w = WEIGHTS[name_or_path]
        if "://" not in w.url:
            return shipped_file(w)
        return download(w.url, w.sha256, progress=progress)
    path = Path(name_or_path)
    if not path.is_file():
        raise CheckpointError(f"'{name_or_path}' is neither a registered model ({', '.join(WEIGHTS)}) "
                              f"nor an existing file")
    return path


def load_pretrained(name_or_path, *, progress: bool = True) -> "GLEAN":
    """A GLEAN model from a registered name (see WEIGHTS) or a checkpoint file (this project's format, or an
    official release file when its name ends in .pth and it has `generator.` keys), in eval mode on the CPU."""
    if name_or_path in WEIGHTS:
        w = WEIGHTS[name_or_path]
        if not w.kind.startswith("glean"):
            raise ValueError(f"'{name_or_path}' is a {w.kind} latent bank, not a GLEAN model")
        path = weights_file(name_or_path, progress)
        return GLEAN.from_official(path, GLEANConfig(**w.config)) if w.kind == "glean-official" else GLEAN.load(path)
    ckpt = load_file(weights_file(name_or_path))
    meta = ckpt.get("metadata", ckpt)
    if meta.get("format") == "glean":
        return GLEAN.load(ckpt)
    if meta.get("format") == "glean-train":                   # a training checkpoint of train.py
        return GLEAN.load({"format": "glean", "config": ckpt["model_config"], "state_dict": ckpt["model"]})
    raise CheckpointError(f"{name_or_path}: not a GLEAN checkpoint of this project; for an official release file "
                          f"use GLEAN.from_official(path, GLEANConfig(in_size=..., out_size=...))")


def _entry(name: str, pretrained: bool, progress: bool):
    w = WEIGHTS[name]
    if w.kind.startswith("stylegan2"):
        if pretrained:
            return stylegan2.load_generator(weights_file(name, progress))
        return stylegan2.Generator(stylegan2.GeneratorConfig(**w.config)).eval()
    return load_pretrained(name, progress=progress) if pretrained else GLEAN(GLEANConfig(**w.config)).eval()


def _describe(fn):
    """Write a builder's docstring (shown by torch.hub.help) from its WEIGHTS entry, the one declaration."""
    w = WEIGHTS[fn.__name__]
    c = w.config
    sizes = (f"{c['in_size']}x{c['in_size']} -> {c['out_size']}x{c['out_size']} ({c['out_size'] // c['in_size']}x)"
             if "in_size" in c else f"{c['out_size']}x{c['out_size']} images")
    fn.__doc__ = (f"{w.note or fn.__name__}.\n\n    {sizes}; {w.category}; input and output {w.pixel_range}.\n"
                  f"    Weights: {w.url} (sha256 {w.sha256}...).\n    Licence: {w.license}.\n\n"
                  f"    pretrained=False gives the same network with random weights; progress shows the download.")
    return fn


@_describe
def glean_face_small_8x(*, pretrained: bool = True, progress: bool = True) -> "GLEAN":
    return _entry("glean_face_small_8x", pretrained, progress)


@_describe
def glean_face_16x(*, pretrained: bool = True, progress: bool = True) -> "GLEAN":
    return _entry("glean_face_16x", pretrained, progress)


@_describe
def glean_face_in128_8x(*, pretrained: bool = True, progress: bool = True) -> "GLEAN":
    return _entry("glean_face_in128_8x", pretrained, progress)


@_describe
def glean_cat_8x(*, pretrained: bool = True, progress: bool = True) -> "GLEAN":
    return _entry("glean_cat_8x", pretrained, progress)


@_describe
def glean_cat_16x(*, pretrained: bool = True, progress: bool = True) -> "GLEAN":
    return _entry("glean_cat_16x", pretrained, progress)


@_describe
def stylegan2_ffhq_1024(*, pretrained: bool = True, progress: bool = True) -> "stylegan2.Generator":
    return _entry("stylegan2_ffhq_1024", pretrained, progress)


@_describe
def stylegan2_cat_256(*, pretrained: bool = True, progress: bool = True) -> "stylegan2.Generator":
    return _entry("stylegan2_cat_256", pretrained, progress)


@_describe
def stylegan2_celeba_64(*, pretrained: bool = True, progress: bool = True) -> "stylegan2.Generator":
    return _entry("stylegan2_celeba_64", pretrained, progress)


# ----------------------------------------------------------------------------------------------------------
# E_0: RRDBNet (ESRGAN) feature extractor


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; x + 0.2 * conv5([x, x1, x2, x3, x4])."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        for i in range(5):
            out = growth if i < 4 else channels
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * growth, out, 3, 1, 1))
        for i in range(5):  # ESRGAN init: small residuals at the start of training
            conv = getattr(self, f"conv{i + 1}")
            if not conv.weight.is_meta:         # on meta (built to be loaded) there is nothing to draw
                nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu_(getattr(self, f"conv{i}")(torch.cat(feats, dim=1)), 0.2))
        return self.conv5(torch.cat(feats, dim=1)).mul_(0.2).add_(x)


class RRDB(nn.Module):
    """Residual-in-residual dense block: x + 0.2 * rdb3(rdb2(rdb1(x)))."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, growth)
        self.rdb2 = ResidualDenseBlock(channels, growth)
        self.rdb3 = ResidualDenseBlock(channels, growth)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))).mul_(0.2).add_(x)


class RRDBNet(nn.Module):
    """ESRGAN trunk without upsampling: conv_first -> RRDB x num_blocks -> conv_body, with a global residual."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, growth: int):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(channels, growth) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(x)
        return self.conv_body(self.body(feat)).add_(feat)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state-dict keys) for the decoder and fusion convs, whose inputs are the
    widest: at inference on a CPU, a conv with >= 1024 input channels over >= 64x64 pixels runs as convs of 128
    output channels each, then one concatenation. oneDNN blocks these narrower convs better for the cache: on the
    2-core reference CPU, 1024->1024 at 64x64 takes 349 ms instead of 411 ms (385 ms in NCHW), 1024->512 at 64x64
    172 ms instead of 200 ms; narrower inputs or smaller maps gain nothing. Same result up to rounding."""

    chunk = 128

    def forward(self, x):
        B, C, H, W = x.shape
        if torch.is_grad_enabled() or x.device.type != "cpu" or C < 1024 or H * W < 64 * 64:
            return super().forward(x)
        weights = self.weight.split(self.chunk)
        biases = self.bias.split(self.chunk) if self.bias is not None else [None] * len(weights)
        return torch.cat([self._conv_forward(x, w, b) for w, b in zip(weights, biases)], 1)


class PixelShufflePack(nn.Module):
    """3x3 conv to 4x the channels, then pixel-shuffle: [B, C_in, H, W] -> [B, C_out, 2H, 2W]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample_conv = Conv2d(in_channels, out_channels * 4, 3, 1, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), 2)


# ----------------------------------------------------------------------------------------------------------
# GLEAN


class GLEAN(nn.Module):
    """Encoder E_0..E_{N+1}, frozen StyleGAN2 latent bank S_i with fusion convs, decoder D_i.

    Maps an LR image [B, 3, in_size, in_size] in [-1, 1] to [B, 3, out_size, out_size].
    """

    def __init__(self, cfg: GLEANConfig):
        super().__init__()
        self.cfg = cfg
        # Inference runs blocks whose intermediates exceed this many values on strips of rows (0: whole images).
        # None: 2^22 on a CPU, where strips keep peak memory low at no cost in speed, and 0 on a GPU, where whole
        # images keep it busy (2-3x faster at batch 8 on an H200, for more GPU memory). See run_in_strips.
        self.strip_elems: int | None = None
        self.channels = ch = stylegan2.channel_table(cfg.channel_multiplier, cfg.channel_base)
        n_in, n_out = int(math.log2(cfg.in_size)), int(math.log2(cfg.out_size))
        lrelu_ = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        # E_0: RRDBNet + conv to the bank's width at in_size                                   f_0
        self.encoder = nn.ModuleList([nn.Sequential(
            RRDBNet(cfg.img_channels, cfg.rrdb_channels, cfg.num_rrdbs, cfg.rrdb_growth_channels),
            nn.Conv2d(cfg.rrdb_channels, ch[cfg.in_size], 3, 1, 1), lrelu_())])
        self.bank = None
        if cfg.uses_bank:
            # E_1..E_N: stride-2 conv + conv, from in_size down to 4x4                          Eq. (1)
            for res in (2 ** i for i in range(n_in, 2, -1)):
                self.encoder.append(nn.Sequential(
                    nn.Conv2d(ch[res], ch[res // 2], 3, 2, 1), lrelu_(),
                    nn.Conv2d(ch[res // 2], ch[res // 2], 3, 1, 1), lrelu_()))
            # E_{N+1}: conv + fully-connected to the latent matrix C                            Eq. (2)
            self.encoder.append(nn.Sequential(
                nn.Conv2d(ch[4], ch[4], 3, 1, 1), lrelu_(), nn.Flatten(),
                nn.Linear(16 * ch[4], cfg.num_latents * cfg.style_channels)))
            # the latent bank: a pretrained StyleGAN2 generator, frozen
            self.bank = stylegan2.Generator(cfg.bank_config())
            self.bank.requires_grad_(False)
            # one fusion conv per bank block that receives an encoder feature (res 4..fuse_encoder_up_to)  Eq. (3)
            fused = [2 ** i for i in range(2, int(math.log2(max(cfg.fuse_encoder_up_to, 1))) + 1)]
            self.fusion_out = nn.ModuleList([Conv2d(2 * ch[r], ch[r], 3, 1, 1) for r in fused])
            # official skip-branch fusion into the RGB path: only influences the output without a decoder
            self.fusion_skip = nn.ModuleList([nn.Conv2d(ch[r] + 3, 3, 3, 1, 1) for r in fused])
            if cfg.use_decoder:
                self.fusion_skip.requires_grad_(False)
        if cfg.use_decoder:
            # D_0 at in_size, then one D_i per resolution up to out_size                        Eq. (4)
            self.decoder = nn.ModuleList()
            for res in (2 ** i for i in range(n_in, n_out + 1)):
                c_in = ch[res] + (ch[res] if cfg.in_size < res <= cfg.decoder_bank_up_to else 0)
                if res < cfg.out_size:
                    self.decoder.append(PixelShufflePack(c_in, ch[2 * res]))
                else:
                    self.decoder.append(nn.Sequential(
                        nn.Conv2d(c_in, cfg.decoder_channels, 3, 1, 1), lrelu_(),
                        nn.Conv2d(cfg.decoder_channels, cfg.img_channels, 3, 1, 1)))
        self.conv_weights_nhwc()

    def conv_weights_nhwc(self) -> "GLEAN":
        """Store conv weights in the order their convolution runs in (NHWC, like the activations), so convolutions
        need not copy them per call."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        if self.bank is not None:
            stylegan2.nhwc_weights_(self.bank)
        return self

    def train(self, mode: bool = True):
        """The bank stays in eval mode (its weights are fixed, Appendix A)."""
        super().train(mode)
        if self.bank is not None:
            self.bank.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    # -- encoder -------------------------------------------------------------------------------------------

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
        C = self.encoder[-1](f).view(B, self.cfg.num_latents, self.cfg.style_channels)  # Eq. (2)
        return feats, C

    # -- latent bank -----------------------------------------------------------------------------------------

    def bank_input(self, C: torch.Tensor, rgb: bool = False):
        """S_0: the constant 4x4 input through the first style layer (c_0); with rgb=True also its toRGB (c_1)."""
        bank = self.bank
        const = bank.constant_input(C.shape[0]).contiguous(memory_format=torch.channels_last)  # NHWC like the rest
        g = bank.conv1(const, C[:, 0], bank.injected_noise_0)                   # [B, ch[4], 4, 4]
        return g, (bank.to_rgb1(g, C[:, 1]) if rgb else None)

    def style_block(self, k: int, g: torch.Tensor, C: torch.Tensor, feats: dict, skip=None, row0: int = 0):
        """The k-th upsampling style block S_{k+1} of the bank, augmented with a fusion conv (Eq. 3).

        g [B, ch[r], h, r] -> [B, ch[2r], 2h, 2r]. If the encoder has a feature f at resolution r, it is fused
        first: g <- conv([g, f]). Each layer takes its own latent vector from C (one per layer, Sec. 3.2); the bank
        always uses its fixed noise buffers. `skip` is the official RGB skip branch (toRGB + fusion_skip): it only
        matters without a decoder, so it is computed only when given. g may be a strip of rows starting at `row0`
        (h < r, see run_in_strips): the noise is cut to match.
        """
        bank, (B, _, h, r) = self.bank, g.shape
        i = 2 * k + 1                                                        # index of this block's first latent
        noise = [getattr(bank, f"injected_noise_{n}")[:, :, 2 * row0:2 * (row0 + h)] for n in (i, i + 1)]
        if r <= self.cfg.fuse_encoder_up_to:
            f = feats[r]
            assert_shape(f, [B, g.shape[1], r, r])
            g = self.fusion_out[k](torch.cat([g, f], dim=1))                  # Eq. (3): [B, ch[r], r, r]
            g = g.contiguous(memory_format=torch.channels_last)
            if skip is not None:
                skip = self.fusion_skip[k](torch.cat([skip, f], dim=1))      # [B, 3, r, r]
        g = bank.convs[2 * k](g, C[:, i], noise[0])                          # [B, ch[2r], 2h, 2r]
        g = bank.convs[2 * k + 1](g, C[:, i + 1], noise[1])
        if skip is not None:
            skip = bank.to_rgbs[k](g, C[:, i + 2], skip)                     # [B, 3, 2r, 2r]
        return g, skip

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C_img, H, W = x.shape
        cfg = self.cfg
        if (C_img, H, W) != (cfg.img_channels, cfg.in_size, cfg.in_size):
            raise ValueError(f"GLEAN expects input [B, {cfg.img_channels}, {cfg.in_size}, {cfg.in_size}], "
                             f"got {list(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: the fast layout for CPU (oneDNN) and GPU convs
        feats, C = self.encode(x)                                            # Eq. (1), (2)
        if not cfg.use_decoder:                                              # ablation: the bank's RGB is the output
            g, rgb = self.bank_input(C, rgb=True)
            for k in range(len(self.bank.resolutions)):
                g, rgb = self.style_block(k, g, C, feats, rgb)
            return rgb.contiguous()
        # Decoder, Eq. (4), interleaved with the bank: each g_i is consumed, then freed, as soon as it exists.
        # The mapping MLP is never run (C is in w space already) and the bank stops at the last g_i the decoder uses.
        # `o` holds a decoder block's conv output before its pixel-shuffle (see decoder_step). At inference (on CPUs
        # by default, see strip_size), large blocks run on strips of rows (run_in_strips), so the biggest feature
        # maps never exist whole.
        g = self.bank_input(C)[0] if cfg.decoder_bank_up_to else None
        o = self.decoder[0].upsample_conv(feats[cfg.in_size])                # D_0(f_0), before the shuffle
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
                            D_j.upsample_conv.out_channels if isinstance(D_j, PixelShufflePack) else 0)
                step = lambda s, o_s, g_s, D_j=D_j: s.crop(self.decoder_step(D_j, o_s, g_s), 2)  # noqa: E731
                o = run_in_strips(step, [o, g_j], [1, 2], halo=1, out_scale=2, width=width, max_elems=elems)
            else:
                o = self.decoder_step(D_j, o, g_j)                           # d_j = D_j(d_{j-1}, g_j)
            del g_j
        assert_shape(o, [B, cfg.img_channels, cfg.out_size, cfg.out_size])
        return o.contiguous()

    def bank_step(self, g: torch.Tensor, C: torch.Tensor, feats: dict, elems: int) -> torch.Tensor:
        """The next style block of the bank: g at resolution r -> 2r (on strips of `elems` if elems and no fusion)."""
        r = g.shape[-1]
        k = int(math.log2(r)) - 2
        if not elems or r <= self.cfg.fuse_encoder_up_to:
            return self.style_block(k, g, C, feats)[0]
        return run_in_strips(lambda s, g_s: s.crop(self.style_block(k, g_s, C, feats, row0=s.a)[0], 2), [g], [1],
                             halo=2, out_scale=2, width=self.channels[2 * r], max_elems=elems)

    def strip_size(self, device: torch.device) -> int:
        """strip_elems, or its default for this device (None: 2^22 values on a CPU, whole images elsewhere)."""
        if self.strip_elems is not None:
            return self.strip_elems
        return 1 << 22 if device.type == "cpu" else 0

    def top_levels(self, s: "Strip", o: torch.Tensor, g: torch.Tensor, C: torch.Tensor, feats: dict) -> torch.Tensor:
        """The last two decoder levels and the bank's blocks up to out_size, on one strip of rows.

        o [B, 4C, h, w]: the conv output of the level at out_size / 4, before its shuffle, rows [s.a, s.b).
        g: the bank at out_size / 4 (same rows; its next block is computed here) or at out_size / 2 (rows 2 s.a..).
        Returns output rows [4 s.r0, 4 s.r1). Each stage is cut to the rows the next one needs: a 3x3 conv
        widens the rows it depends on by 1 on each side, a style block's up-conv by 1 input row (its blur included).
        """
        r0, r1, top = s.r0, s.r1, len(self.bank.resolutions) - 1
        if g.shape[-1] == o.shape[-1]:                                       # g at out_size / 4: one more block
            g = self.style_block(top - 1, g, C, feats, row0=s.a)[0]          # rows from 2 s.a, at out_size / 2
        g, g0 = cut_rows(g, 2 * s.a, 2 * r0 - 3, 2 * r1 + 3)                 # what the up-conv and D_a need
        o, o0 = cut_rows(o, s.a, r0 - 1, r1 + 1)
        o = self.decoder_step(self.decoder[-2], o, cut_rows(g, g0, 2 * o0, 2 * (o0 + o.shape[-2]))[0])
        o, o0 = cut_rows(o, 2 * o0, 2 * r0 - 1, 2 * r1 + 1)                  # d at out_size / 2, before the shuffle
        g, g0 = cut_rows(self.style_block(top, g, C, feats, row0=g0)[0], 2 * g0, 4 * r0 - 2, 4 * r1 + 2)
        x = shuffle_cat(o, g)                                                # [d, g] at out_size: rows from 2 o0
        del o, g
        return cut_rows(self.decoder[-1](x), 2 * o0, 4 * r0, 4 * r1)[0]      # the output block

    def decoder_step(self, D_j: nn.Module, o: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """d_j = D_j(d_{j-1}, g_j), Eq. (4): the previous block's conv output o [B, 4C, h, w] is pixel-shuffled to
        d_{j-1} [B, C, 2h, 2w] and concatenated with the bank feature g_j in one copy (shuffle_cat), then D_j's conv
        runs; its own shuffle is left to the next step. The output block (conv, lrelu, conv) ends the chain."""
        if isinstance(D_j, PixelShufflePack):
            conv = D_j.upsample_conv
            return conv(shuffle_cat(o, g))                                   # [B, C + C_g, 2h, 2w] -> conv
        return D_j(shuffle_cat(o, g))

    # -- weights ---------------------------------------------------------------------------------------------

    def official_names(self) -> dict:
        """Our state-dict keys -> keys of the official release checkpoint (`generator.` prefix, bank = `generator`)."""
        names = {}
        bank_names = stylegan2.official_names(self.bank) if self.bank is not None else {}
        for k in self.state_dict():
            if k.startswith("bank."):
                names[k] = "generator.generator." + bank_names[k[len("bank."):]]
            else:
                names[k] = "generator." + k
        return names

    @classmethod
    def from_official(cls, checkpoint, cfg: GLEANConfig | dict | None = None) -> "GLEAN":
        """Load an official GLEAN release checkpoint ({'meta', 'state_dict'} with `generator.` keys; path or dict).

        Keys outside `generator.` (discriminator, perceptual loss) are ignored; every generator key must match the
        model built from `cfg` (default: GLEANConfig()) in name and shape. Returns the model in eval mode.
        """
        cfg = GLEANConfig.from_dict(cfg) if isinstance(cfg, dict) else (cfg or GLEANConfig())
        source = str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint"
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
        sd = {k: v for k, v in state_dict_of(ckpt).items() if k.startswith("generator.")}
        if not sd:
            raise CheckpointError(f"{source} has no 'generator.' keys: not an official GLEAN release checkpoint "
                                  f"(for this project's own files use GLEAN.load)")
        with torch.device("meta"):
            model = cls(cfg)
        load_state_strict(model, sd, model.official_names(), source)
        return model.conv_weights_nhwc().eval()

    def load_bank(self, checkpoint) -> "GLEAN":
        """Load pretrained StyleGAN2 weights into the latent bank: official files (`generator_ema.*` keys, with or
        without a `state_dict` wrapper), this project's bank files, rosinality's .pt or NVIDIA's .pkl."""
        if self.bank is None:
            raise ValueError("this configuration has no latent bank (decoder_bank_up_to=0 with a decoder)")
        stylegan2.load_generator_weights(self.bank, checkpoint)
        self.conv_weights_nhwc()
        return self

    def save(self, path) -> None:
        """Save in this project's format: tensors + the config as plain data (.safetensors or .pt), atomically."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        save_file({"format": "glean", "config": asdict(self.cfg), "state_dict": sd,
                   "metadata": {"format": "glean", "config": asdict(self.cfg)}}
                  if str(path).endswith(".safetensors") else
                  {"format": "glean", "config": asdict(self.cfg), "state_dict": sd}, path)

    @classmethod
    def load(cls, checkpoint) -> "GLEAN":
        """Load this project's format (see `save`); returns the model in eval mode."""
        source = str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint"
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
        meta = ckpt.get("metadata", ckpt)
        if meta.get("format") != "glean" or "config" not in meta:
            raise CheckpointError(f"{source} is not a GLEAN checkpoint of this project (no format/config entry); "
                                  f"for official release files use GLEAN.from_official")
        config = meta["config"]
        config = json.loads(config) if isinstance(config, str) else config
        with torch.device("meta"):
            model = cls(GLEANConfig.from_dict(config))
        load_state_strict(model, state_dict_of(ckpt), {k: k for k in model.state_dict()}, source)
        return model.conv_weights_nhwc().eval()


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
# MATLAB-compatible bicubic resize


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic')."""
    ax = x.abs()
    ax2, ax3 = ax ** 2, ax ** 3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """[out_len, in_len] float64 matrix of MATLAB imresize's bicubic weights along one axis.

    Output pixel x (1-based) samples input coordinate u = x / scale + (1 - 1/scale) / 2. When downscaling with
    antialiasing the kernel is stretched by 1/scale (width 4/scale) and its height scaled by `scale`. Weights are
    normalised to sum 1; taps outside the image are mirrored back in (MATLAB's 'symmetric' boundary).
    """
    stretch = scale < 1 and antialias
    width = 4.0 / scale if stretch else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]     # [out, taps], 1-based
    dist = u[:, None] - idx
    w = scale * cubic(dist * scale) if stretch else cubic(dist)
    w = w / w.sum(dim=1, keepdim=True)
    idx = idx.long() - 1                                                     # 0-based
    idx = torch.where(idx < 0, -idx - 1, idx)                                # mirror: -1 -> 0, -2 -> 1
    idx = torch.where(idx >= in_len, 2 * in_len - 1 - idx, idx)              # mirror: n -> n-1, n+1 -> n-2
    idx = idx.clamp(0, in_len - 1)                                           # (only for kernels wider than 2n)
    m = torch.zeros(out_len, in_len, dtype=torch.float64)
    m.scatter_add_(1, idx, w)
    return m


def imresize(img: torch.Tensor, scale: float | None = None, size: tuple | int | None = None,
             antialias: bool = True) -> torch.Tensor:
    """MATLAB `imresize(img, scale, 'bicubic')` on float tensors [..., H, W] (any value range; no rounding).

    Give either `scale` (output = ceil(in * scale)) or `size` (int or (H, W)). Antialiased when downscaling,
    as MATLAB does; the released GLEAN models were trained on LR images made this way.
    """
    if not torch.is_floating_point(img):
        raise TypeError(f"imresize expects a float tensor, got {img.dtype} (convert with .float())")
    H, W = img.shape[-2:]
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size")
    if size is None:
        out_h, out_w = math.ceil(H * scale), math.ceil(W * scale)
        sh = sw = float(scale)
    else:
        out_h, out_w = (size, size) if isinstance(size, int) else size
        sh, sw = out_h / H, out_w / W
    mh = resize_matrix(H, out_h, sh, antialias).to(img.dtype).to(img.device)  # [out_h, H]
    mw = resize_matrix(W, out_w, sw, antialias).to(img.dtype).to(img.device)  # [out_w, W]
    return mh @ img @ mw.T                                                      # [..., out_h, out_w]
