"""GLEAN on tiny configurations: shapes for every scale, gradients, the frozen bank, ablations, own checkpoints."""
import pytest
import torch

import glean
from conftest import tiny_cfg

# every power-of-two pair with in_size >= 8, out/in in {4..64}, out_size <= 1024
PAIRS = [(i, i * s) for i in (8, 16, 32, 64, 128, 256) for s in (4, 8, 16, 32, 64) if i * s <= 1024]


@pytest.mark.parametrize("in_size,out_size", PAIRS)
def test_shapes_every_supported_scale(in_size, out_size):
    torch.manual_seed(0)
    cfg = tiny_cfg(in_size, out_size, channel_base=8)
    model = glean.GLEAN(cfg).eval()
    x = torch.rand(1, 3, in_size, in_size) * 2 - 1
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, out_size, out_size)
    assert torch.isfinite(y).all()
    assert len(model.fusion_out) == len(range(2, in_size.bit_length()))  # one fusion conv per res 4..in_size
    assert cfg.num_latents == 2 * (out_size.bit_length() - 1) - 2


@pytest.mark.parametrize("bad", [dict(in_size=4, out_size=16), dict(in_size=16, out_size=32),
                                 dict(in_size=16, out_size=2048), dict(in_size=24, out_size=96),
                                 dict(in_size=8, out_size=1024), dict(fuse_encoder_up_to=16),
                                 dict(decoder_bank_up_to=8)])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        tiny_cfg(**{**dict(in_size=8, out_size=32), **bad})


def test_wrong_input_size_is_refused():
    model = glean.GLEAN(tiny_cfg())
    with pytest.raises(ValueError, match=r"expects input \[B, 3, 8, 8\]"):
        model(torch.zeros(1, 3, 16, 16))


ABLATIONS = {
    "full": {},
    "latent_only": dict(fuse_encoder_up_to=0),           # Fig. 7, no encoder features into the bank
    "coarse_features": dict(fuse_encoder_up_to=4),       # Fig. 7, only the 4x4 feature
    "no_bank_features": dict(decoder_bank_up_to=0),      # Fig. 8, encoder-decoder only
    "coarse_bank_features": dict(decoder_bank_up_to=16), # Fig. 8, bank features up to 16x16
    "no_decoder": dict(use_decoder=False),               # Fig. 9, the bank's RGB output
}


@pytest.mark.parametrize("name", ABLATIONS)
def test_gradients_reach_exactly_the_trainable_parameters(name):
    torch.manual_seed(0)
    model = glean.GLEAN(tiny_cfg(8, 32, **ABLATIONS[name])).train()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    model(x).square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "nothing to train"
    for n, p in trainable:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {n}"
    for n, p in model.named_parameters():
        if n.startswith("bank."):
            assert not p.requires_grad and p.grad is None, f"bank parameter {n} gets a gradient"


def test_ablation_structure():
    assert glean.GLEAN(tiny_cfg(decoder_bank_up_to=0)).bank is None      # the bank cannot influence the output
    assert len(glean.GLEAN(tiny_cfg(fuse_encoder_up_to=0)).fusion_out) == 0
    no_dec = glean.GLEAN(tiny_cfg(use_decoder=False))
    assert not hasattr(no_dec, "decoder") and all(p.requires_grad for p in no_dec.fusion_skip.parameters())


def test_bank_frozen_after_optimizer_step():
    torch.manual_seed(0)
    model = glean.GLEAN(tiny_cfg()).train()
    bank_before = {k: v.clone() for k, v in model.bank.state_dict().items()}
    other_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("bank.")}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.rand(2, 3, 8, 8) * 2 - 1).square().mean().backward()
        opt.step()
    assert not any(p.requires_grad for p in model.bank.parameters())
    for k, v in model.bank.state_dict().items():
        assert torch.equal(v, bank_before[k]), f"bank tensor {k} changed"
    changed = [k for k, v in model.state_dict().items() if k in other_before and not torch.equal(v, other_before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_own_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    cfg = tiny_cfg(8, 32, fuse_encoder_up_to=4)
    model = glean.GLEAN(cfg).eval()
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = glean.GLEAN.load(path)
    assert loaded.cfg == cfg and not loaded.training
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    if suffix == ".pt":  # plain data only: loadable with weights_only=True
        obj = torch.load(path, weights_only=True)
        assert set(obj) == {"format", "config", "state_dict"} and isinstance(obj["config"], dict)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_loaded_model_can_be_trained(tmp_path):
    """Weights loaded without copying (meta device + assign) are ordinary trainable tensors."""
    model = glean.GLEAN(tiny_cfg())
    model.save(tmp_path / "m.pt")
    loaded = glean.GLEAN.load(tmp_path / "m.pt").train()
    opt = torch.optim.Adam(loaded.trainable_parameters(), lr=1e-2)
    loaded(torch.rand(2, 3, 8, 8)).mean().backward()
    opt.step()
    assert not torch.equal(loaded.decoder[0].upsample_conv.weight, model.decoder[0].upsample_conv.weight)
    assert all(not p.requires_grad for p in loaded.bank.parameters())
