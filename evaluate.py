"""Image-quality metrics of the paper's protocol: PSNR, SSIM (RGB and Y), LPIPS (Sec. 4, Table 2).

Images are tensors [B, 3, H, W] in [-1, 1] (RGB), as GLEAN produces them; metrics are computed on 8-bit values.
"""
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from glean_io import CheckpointError, load_file


def to_uint8_range(t: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> rounded 8-bit values 0..255 (float64)."""
    return ((t.double().clamp(-1, 1) + 1) * 127.5).round()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, on 8-bit RGB values: 10 log10(255^2 / MSE). Identical images
    give +inf."""
    mse = (to_uint8_range(a) - to_uint8_range(b)).square().flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


# ----------------------------------------------------------------------------------------------------------
# LPIPS (Zhang et al., CVPR 2018), v0.1 with AlexNet


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)|) ||^2 over the five ReLU
    outputs phi_l of AlexNet's conv layers, with the learned per-channel weights w_l of LPIPS v0.1."""

    CUTS = (2, 5, 8, 10, 12)                      # AlexNet `features` slices ending after relu1..relu5

    def __init__(self, alexnet: dict, heads: dict):
        super().__init__()
        import torchvision
        features = torchvision.models.alexnet().features
        features.load_state_dict({k[len("features."):]: v for k, v in alexnet.items() if k.startswith("features.")})
        self.features = features.eval().requires_grad_(False)
        self.heads = nn.ParameterList([nn.Parameter(heads[f"lin{i}.model.1.weight"], requires_grad=False)
                                       for i in range(5)])                   # [1, C_l, 1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def phis(self, x):
        x, out, start = (x - self.shift) / self.scale, [], 0
        for cut in self.CUTS:
            x = self.features[start:cut](x)
            out.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
            start = cut
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance for images in [-1, 1]."""
        return sum((w * (pa - pb).square()).sum(1).mean(dim=(1, 2))
                   for w, pa, pb in zip(self.heads, self.phis(a), self.phis(b)))

    @classmethod
    def load(cls, alexnet: str = "", heads: str = ""):
        """LPIPS from local files, or (None, reason). AlexNet: the path given, else torchvision's file in the torch.hub
        cache; heads: the path given, else the `lpips` package's weights/v0.1/alex.pth. Nothing is downloaded."""
        alex = Path(alexnet) if alexnet else Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
        if heads:
            lin = Path(heads)
        elif importlib.util.find_spec("lpips") is not None:
            lin = Path(importlib.util.find_spec("lpips").origin).parent / "weights" / "v0.1" / "alex.pth"
        else:
            return None, "LPIPS heads not found (pip install lpips, or pass their alex.pth)"
        for path, what in ((alex, "AlexNet ImageNet weights"), (lin, "LPIPS v0.1 heads")):
            if not path.is_file():
                return None, f"{what} not found at {path}"
        try:
            return cls(load_file(alex), load_file(lin)), ""
        except (CheckpointError, KeyError, RuntimeError) as e:
            return None, f"LPIPS weights unusable ({e})"
