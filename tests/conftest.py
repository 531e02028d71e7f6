"""Shared test helpers: tiny configurations and the official reference data copied into tests/data."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))  # the flat modules (glean.py, stylegan2.py, ...) also without `pip install .`

import glean  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_cfg(in_size=8, out_size=32, **kw) -> "glean.GLEANConfig":
    """A GLEAN small enough for CPU tests: channel table 16 (4-32 px) and below, 2 thin RRDBs."""
    base = dict(in_size=in_size, out_size=out_size, rrdb_channels=8, num_rrdbs=1, rrdb_growth_channels=4,
                style_channels=16, num_mlps=2, channel_multiplier=1, channel_base=16, decoder_channels=8)
    base.update(kw)
    return glean.GLEANConfig(**base)


def save_tiny_model(tmp_path_factory, in_size: int, out_size: int, name: str) -> Path:
    """A tiny GLEAN (random weights, seed 0, no face template) saved in this project's format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / name
    glean.GLEAN(tiny_cfg(in_size, out_size)).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny GLEAN, 8x8 -> 32x32."""
    return save_tiny_model(tmp_path_factory, 8, 32, "tiny.safetensors")


@pytest.fixture(scope="module")
def model(model_file):
    """That model loaded as the tools load it (infer.load_model: the fast path, on the CPU), in float32 so that
    the tests give the same results on CPUs with and without bf16 instructions (tests/test_precision.py: bf16)."""
    import infer
    return infer.load_model(str(model_file), "cpu", "fp32")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
