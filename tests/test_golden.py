"""The whole model against the official implementation's output (golden case from ../shared/reference)."""
import json

import torch

import pytest

import glean
import glean_fast
from conftest import DATA


def golden_model(fast: bool = False):
    meta = json.loads((DATA / "golden_in16_out64.json").read_text())
    kwargs = dict(meta["constructor_kwargs"], channel_base=meta["stylegan_channel_table_override"]["channel_base"])
    cls = glean_fast.GLEANFast if fast else glean.GLEAN
    return cls.from_official(DATA / "golden_in16_out64_ckpt.pth", glean.GLEANConfig(**kwargs)), meta


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_golden_output_matches_official(fast):
    """Both paths, the reference (glean.py) and the fast one (glean_fast.py), against the official output."""
    model, meta = golden_model(fast)
    io = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)
    with torch.no_grad():
        out = model(io["input"])
    assert out.shape == io["output"].shape == (2, 3, 64, 64)
    err = (out - io["output"]).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g} vs official output"
    tol = meta["recommended_tolerance"]
    torch.testing.assert_close(out, io["output"], atol=tol["atol"], rtol=tol["rtol"])


def test_golden_channel_table_and_counts():
    model, meta = golden_model()
    table = {int(k): v for k, v in meta["stylegan_channel_table_override"]["resulting_table"].items()}
    assert model.channels == table
    assert len(model.state_dict()) == meta["num_state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]


def test_outputs_not_influenced_by_skipped_branches_match_official_list():
    """The official list of parameters with zero gradient wrt the output = the ones our forward never computes."""
    model, meta = golden_model()
    model.requires_grad_(True)
    x = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)["input"]
    model(x).square().sum().backward()
    names = model.official_names()
    unused = sorted(names[k].removeprefix("generator.") for k, p in model.named_parameters()
                    if p.grad is None or not p.grad.any())
    assert unused == sorted(meta["params_with_zero_grad_wrt_output"])


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_deterministic_and_train_mode_equal(fast):
    model, _ = golden_model(fast)
    x = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)["input"]
    with torch.no_grad():
        a = model.eval()(x)
        b = model.train()(x)
    assert torch.equal(a, b)
    assert not any(p.requires_grad for p in model.bank.parameters())   # frozen in either mode
