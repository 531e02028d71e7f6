"""GLEAN: Generative Latent Bank for Large-Factor Image Super-Resolution (Chan et al., CVPR 2021).

The reference model: eq. (1)-(4) written out on whole images, in the paper's order (Fig. 2):

    f_0 = E_0(x)                      RRDBNet features of the low-resolution image x
    f_i = E_i(f_{i-1}),  i = 1..N     stride-2 blocks, in_size down to 4x4                       Eq. (1)
    C   = E_{N+1}(f_N)                conv + fully-connected: the latent vectors c_0..c_{k-1}     Eq. (2)
    g_i = S_i(c_i, g_{i-1}, f_{N-i})  style blocks of a frozen, pretrained StyleGAN2 (the latent
                                      bank), each fusing an encoder feature with one extra conv   Eq. (3)
    d_i = D_i(d_{i-1}, g_{N-2+i})     3x3 conv + pixel-shuffle blocks fusing bank features
                                      coarse to fine; the last block outputs the image            Eq. (4)

The paper's indices and the code's. The code names every feature map by its resolution r, which needs no index
arithmetic: f[r] is f_i with r = in_size / 2^i (f_0 at in_size, f_N at 4x4), g[r] is the bank's feature at r (g_0 at
4x4, g_i at 4 * 2^i). Eq. (3) fuses f_{N-i} inside S_i; like the official implementation (whose weights this file
loads) the fusion conv runs where f and g share a resolution, on [g[r], f[r]], just before the block that takes g up
to 2r: the same sequence of operations, grouped differently. Eq. (4) joins to d_{i-1} the bank feature of d_{i-1}'s
own resolution, in_size * 2^i (with g_0 at 4x4 that is g_{N+i}; the paper's subscript counts from another origin).

Images enter and leave in [-1, 1] (RGB); the network does not clamp. Parameter names mirror the official
implementation (mmagic `GLEANStyleGANv2`) with the bank called `bank` (official: `generator`), so released weights
load through `official_names` in one place. The fast path for inference (strips, NHWC, channel-sliced convs) is
glean_fast.GLEANFast: the same modules and weights, tested equal to this file.
"""
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import stylegan2
from glean_io import CheckpointError, load_file, load_state_strict, save_file, state_dict_of
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
        """A config from plain data (e.g. a checkpoint's), its field names and value types checked first."""
        known = {f.name: f.default for f in fields(cls)}
        unknown = sorted(map(str, set(d) - set(known))) if isinstance(d, dict) else None
        if unknown is None or unknown:
            raise ValueError(f"unknown GLEANConfig fields: {unknown}" if unknown else "a config must be a dict")
        for k, v in d.items():
            default, is_int = known[k], lambda t: isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
            ok = (isinstance(v, bool) if isinstance(default, bool) else
                  isinstance(v, (tuple, list)) and all(map(is_int, v)) if isinstance(default, tuple) else
                  is_int(v) or isinstance(v, float) if isinstance(default, float) else v is None or is_int(v))
            if not ok:
                raise ValueError(f"GLEANConfig field {k} = {v!r} has the wrong type")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# E_0: RRDBNet (ESRGAN) feature extractor


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; x + 0.2 * conv5([x, x1, x2, x3, x4])."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        for i in range(5):
            out = growth if i < 4 else channels
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * growth, out, 3, 1, 1))
        for i in range(5):  # ESRGAN init: Kaiming normal scaled by 0.1, so the residuals start small
            conv = getattr(self, f"conv{i + 1}")
            if not conv.weight.is_meta:         # on meta (built to be loaded) there is nothing to draw
                nn.init.kaiming_normal_(conv.weight)
                conv.weight.data.mul_(0.1)
                nn.init.zeros_(conv.bias)

    def forward(self, x):
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, dim=1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: x + 0.2 * rdb3(rdb2(rdb1(x)))."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(channels, growth)
        self.rdb2 = ResidualDenseBlock(channels, growth)
        self.rdb3 = ResidualDenseBlock(channels, growth)

    def forward(self, x):
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN trunk without upsampling: conv_first -> RRDB x num_blocks -> conv_body, with a global residual."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, growth: int):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(channels, growth) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(x)
        return feat + self.conv_body(self.body(feat))


class PixelShufflePack(nn.Module):
    """A decoder block D_i: 3x3 conv to 4x the channels, then pixel-shuffle: [B, C_in, H, W] -> [B, C_out, 2H, 2W].
    Kaiming-normal initialised (fan_in, ReLU gain, zero bias), as the official code does."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.upsample_conv = nn.Conv2d(in_channels, out_channels * 4, 3, 1, 1)
        if not self.upsample_conv.weight.is_meta:
            nn.init.kaiming_normal_(self.upsample_conv.weight, nonlinearity="relu")
            nn.init.zeros_(self.upsample_conv.bias)

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), 2)                     # [B, 4 C_out, H, W] -> [B, C_out, 2H, 2W]


# ----------------------------------------------------------------------------------------------------------
# GLEAN


class GLEAN(nn.Module):
    """Encoder E_0..E_{N+1}, frozen StyleGAN2 latent bank S_i with fusion convs, decoder D_i.

    Maps an LR image [B, 3, in_size, in_size] in [-1, 1] to [B, 3, out_size, out_size].
    """

    def __init__(self, cfg: GLEANConfig):
        super().__init__()
        self.cfg = cfg
        self.channels = ch = stylegan2.channel_table(cfg.channel_multiplier, cfg.channel_base)
        n_in, n_out = int(math.log2(cfg.in_size)), int(math.log2(cfg.out_size))
        lrelu = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        # E_0: RRDBNet + conv to the bank's width at in_size                                   f_0
        self.encoder = nn.ModuleList([nn.Sequential(
            RRDBNet(cfg.img_channels, cfg.rrdb_channels, cfg.num_rrdbs, cfg.rrdb_growth_channels),
            nn.Conv2d(cfg.rrdb_channels, ch[cfg.in_size], 3, 1, 1), lrelu())])
        self.bank = None
        if cfg.uses_bank:
            # E_1..E_N: stride-2 conv + conv, from in_size down to 4x4                          Eq. (1)
            for res in (2 ** i for i in range(n_in, 2, -1)):
                self.encoder.append(nn.Sequential(
                    nn.Conv2d(ch[res], ch[res // 2], 3, 2, 1), lrelu(),
                    nn.Conv2d(ch[res // 2], ch[res // 2], 3, 1, 1), lrelu()))
            # E_{N+1}: conv + fully-connected to the latent matrix C                            Eq. (2)
            self.encoder.append(nn.Sequential(
                nn.Conv2d(ch[4], ch[4], 3, 1, 1), lrelu(), nn.Flatten(),
                nn.Linear(16 * ch[4], cfg.num_latents * cfg.style_channels)))
            # the latent bank: a pretrained StyleGAN2 generator, frozen (Sec. 3.4)
            self.bank = stylegan2.Generator(cfg.bank_config())
            self.bank.requires_grad_(False)
            # one fusion conv per resolution that fuses an encoder feature (4..fuse_encoder_up_to)  Eq. (3)
            fused = [2 ** i for i in range(2, int(math.log2(max(cfg.fuse_encoder_up_to, 1))) + 1)]
            self.fusion_out = nn.ModuleList([nn.Conv2d(2 * ch[r], ch[r], 3, 1, 1) for r in fused])
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
                        nn.Conv2d(c_in, cfg.decoder_channels, 3, 1, 1), lrelu(),
                        nn.Conv2d(cfg.decoder_channels, cfg.img_channels, 3, 1, 1)))

    def train(self, mode: bool = True):
        """The bank stays in eval mode (its weights are fixed, Appendix A)."""
        super().train(mode)
        if self.bank is not None:
            self.bank.eval()
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def check_input(self, x: torch.Tensor) -> int:
        """The batch size of x, after checking that x is [B, img_channels, in_size, in_size]."""
        cfg = self.cfg
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.img_channels, cfg.in_size, cfg.in_size):
            raise ValueError(f"GLEAN expects input [B, {cfg.img_channels}, {cfg.in_size}, {cfg.in_size}], "
                             f"got {list(x.shape)}")
        return x.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (1)-(4) on whole images: x [B, 3, in_size, in_size] -> [B, 3, out_size, out_size], both in [-1, 1]."""
        cfg, bank, ch = self.cfg, self.bank, self.channels
        B = self.check_input(x)
        f = {cfg.in_size: self.encoder[0](x)}                                # f_0 = E_0(x)      [B, ch[in], in, in]
        g, rgb = {}, None                                                    # bank features by resolution
        if bank is not None:
            for E_i in self.encoder[1:-1]:
                r = min(f)
                f[r // 2] = E_i(f[r])                                        # Eq. (1): f_i = E_i(f_{i-1})
            assert_shape(f[4], [B, ch[4], 4, 4])
            C = self.encoder[-1](f[4]).view(B, cfg.num_latents, cfg.style_channels)  # Eq. (2): C = E_{N+1}(f_N)
            noise = bank.noises()                                            # fixed noise maps, one per layer
            g[4] = bank.conv1(bank.constant_input(B), C[:, 0], noise[0])     # Eq. (3): g_0 = S_0(c_0)  [B, ch[4], 4, 4]
            rgb = None if cfg.use_decoder else bank.to_rgb1(g[4], C[:, 1])   # Fig. 9 ablation only: the RGB branch
            for k, r in enumerate(bank.resolutions):                         # style block k takes r/2 to r = 8..out
                h = g[r // 2]
                if r // 2 <= cfg.fuse_encoder_up_to:                         # an encoder feature at this resolution
                    assert_shape(f[r // 2], h.shape)
                    h = self.fusion_out[k](torch.cat([h, f[r // 2]], dim=1))  # Eq. (3): the extra conv
                    if rgb is not None:
                        rgb = self.fusion_skip[k](torch.cat([rgb, f[r // 2]], dim=1))
                h = bank.convs[2 * k](h, C[:, 2 * k + 1], noise[2 * k + 1])  # 2x up-conv     [B, ch[r], r, r]
                g[r] = bank.convs[2 * k + 1](h, C[:, 2 * k + 2], noise[2 * k + 2])  # Eq. (3): g at r  [B, ch[r], r, r]
                if rgb is not None:
                    rgb = bank.to_rgbs[k](g[r], C[:, 2 * k + 3], rgb)        # [B, 3, r, r]
        if not cfg.use_decoder:
            return rgb                                                       # Fig. 9 ablation: the bank's own image
        d = f[cfg.in_size]                                                   # D_0 takes f_0 alone
        for i, D_i in enumerate(self.decoder):
            r = d.shape[-1]
            if i > 0 and r <= cfg.decoder_bank_up_to:
                assert_shape(g[r], [B, ch[r], r, r])
                d = torch.cat([d, g[r]], dim=1)                              # [d_{i-1}, g at r]  [B, 2 ch[r], r, r]
            d = D_i(d)                                                       # Eq. (4): 3x3 conv + pixel-shuffle to 2r
        assert_shape(d, [B, cfg.img_channels, cfg.out_size, cfg.out_size])   # (the last D_i: conv, lrelu, conv to RGB)
        return d

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
    def from_official(cls, checkpoint, cfg: GLEANConfig | dict | None = None, *, source: str = "") -> "GLEAN":
        """Load an official GLEAN release checkpoint ({'meta', 'state_dict'} with `generator.` keys; path or dict,
        `source` naming a dict's file in messages).

        Keys outside `generator.` (discriminator, perceptual loss) are ignored; every generator key must match the
        model built from `cfg` (default: GLEANConfig()) in name and shape. Returns the model in eval mode.
        """
        cfg = GLEANConfig.from_dict(cfg) if isinstance(cfg, dict) else (cfg or GLEANConfig())
        source = source or (str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint")
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
        sd = {k: v for k, v in state_dict_of(ckpt, source).items() if isinstance(k, str) and k.startswith("generator.")}
        if not sd:
            raise CheckpointError(f"{source} has no 'generator.' keys: not an official GLEAN release checkpoint "
                                  f"(for this project's own files use GLEAN.load)")
        with torch.device("meta"):                                           # no random init: the file has it all
            model = cls(cfg)
        load_state_strict(model, sd, model.official_names(), source)
        return model.eval()

    def load_bank(self, checkpoint) -> "GLEAN":
        """Load pretrained StyleGAN2 weights into the latent bank: official files (`generator_ema.*` keys, with or
        without a `state_dict` wrapper), this project's bank files, rosinality's .pt or NVIDIA's .pkl."""
        if self.bank is None:
            raise ValueError("this configuration has no latent bank (decoder_bank_up_to=0 with a decoder)")
        stylegan2.load_generator_weights(self.bank, checkpoint)
        return self

    def save(self, path) -> None:
        """Save in this project's format: tensors + the config as plain data (.safetensors or .pt), atomically."""
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file({"format": "glean", "config": asdict(self.cfg), "state_dict": sd,
                   "metadata": {"format": "glean", "config": asdict(self.cfg)}}
                  if str(path).endswith(".safetensors") else
                  {"format": "glean", "config": asdict(self.cfg), "state_dict": sd}, path)

    @classmethod
    def load(cls, checkpoint, *, source: str = "") -> "GLEAN":
        """Load this project's format (see `save`; path or loaded dict, `source` naming a dict's file in messages);
        returns the model in eval mode."""
        source = source or (str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint")
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
        meta = ckpt["metadata"] if isinstance(ckpt.get("metadata"), dict) else ckpt
        if meta.get("format") != "glean" or "config" not in meta:
            raise CheckpointError(f"{source} is not a GLEAN checkpoint of this project (no format/config entry); "
                                  f"for official release files use GLEAN.from_official")
        sd = state_dict_of(ckpt, source)
        try:
            config = meta["config"]
            cfg = GLEANConfig.from_dict(json.loads(config) if isinstance(config, str) else config)
        except (ValueError, RecursionError) as e:               # json's errors are ValueErrors; deep nesting recurses
            raise CheckpointError(f"{source}: its config is not usable ({e}); the file is damaged or edited") from e
        count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})  # noqa: E731
        if count("encoder.0.0.body.") != cfg.num_rrdbs or cfg.uses_bank and count("bank.style_mapping.") != \
                cfg.num_mlps:           # checked before building: the module count follows these two numbers
            raise CheckpointError(f"{source}: its config (num_rrdbs={cfg.num_rrdbs}, num_mlps={cfg.num_mlps}) does "
                                  f"not match its tensors; the file is damaged or edited")
        with torch.device("meta"):
            model = cls(cfg)
        load_state_strict(model, sd, {k: k for k in model.state_dict()}, source)
        return model.eval()
