"""ESRGAN's RRDBNet (Wang et al., "ESRGAN: Enhanced Super-Resolution Generative Adversarial
Networks", ECCV Workshops 2018) without its upsampling layers: GLEAN's first encoder block E_0
(Sec. 3.1), which glean.py builds. Residual-in-residual dense blocks of 3x3 convs and leaky ReLUs,
each residual scaled by 0.2, with ESRGAN's initialisation (Kaiming normal x 0.1): they start small.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; x + 0.2 * conv5([x, x1, x2, x3, x4])."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        for i in range(5):
            out = growth if i < 4 else channels
            setattr(self, f"conv{i + 1}", nn.Conv2d(channels + i * growth, out, 3, 1, 1))
        for i in range(5):
            conv = getattr(self, f"conv{i + 1}")
            if not conv.weight.is_meta:     # ESRGAN init: Kaiming normal x 0.1 (meta: to be loaded)
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
    """ESRGAN's trunk, no upsampling: conv_first, num_blocks RRDBs, conv_body, global residual."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, growth: int):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(channels, growth) for _ in range(num_blocks)])
        self.conv_body = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(x)
        return feat + self.conv_body(self.body(feat))
