"""Loading official release checkpoints, official StyleGAN2 weights, and the safety of unpickling."""
import json
import os
import pickle

import pytest
import torch

import glean
import glean_fast
import glean_io
import stylegan2
import weight_formats
from conftest import DATA, tiny_cfg
from glean_io import CheckpointError

RELEASED = ["glean_x8_2xb8_cat", "glean_x16_2xb8_cat", "glean_x16_2xb8_ffhq",
            "glean_in128out1024_4xb2-300k_ffhq-celeba-hq"]


def manifest(name):
    return json.loads((DATA / f"manifest_{name}.json").read_text())


def synthesize(entries):
    """A state dict with exactly the manifest's keys and shapes (zeros: only names and shapes matter here)."""
    return {e["key"]: torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"].split(".")[1])) for e in entries}


@pytest.mark.parametrize("name", RELEASED)
def test_released_layout_loads_strictly(name):
    m = manifest(name)
    sd = synthesize(m["state_dict"])
    sd["discriminator.final_linear.1.bias"] = torch.zeros(1)  # other parts of the release file are ignored
    model = glean.GLEAN.from_official({"meta": {}, "state_dict": sd}, m["constructor_kwargs"])
    assert not model.training
    ours = model.state_dict()
    assert len(ours) == m["summary"]["num_state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == m["summary"]["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        m["summary"]["num_trainable_parameters"] - sum(  # fusion_skip is frozen: it cannot influence the output
            e["numel"] for e in m["state_dict"] if "fusion_skip" in e["key"])
    for ours_key, theirs in model.official_names().items():      # the reference takes every tensor without a copy
        assert ours[ours_key].data_ptr() == sd[theirs].data_ptr()
    fast = glean_fast.GLEANFast.from_official({"meta": {}, "state_dict": sd}, m["constructor_kwargs"])
    ours = fast.state_dict()
    nhwc = {f"{n}.weight" for n, m in fast.named_modules() if isinstance(m, torch.nn.Conv2d)}
    modulated = {f"{n}.weight": m for n, m in fast.named_modules() if isinstance(m, stylegan2.ModulatedConv2d)}
    for ours_key, theirs in fast.official_names().items():
        if ours_key in nhwc:         # the fast path re-lays conv weights out once to NHWC, like the activations
            assert ours[ours_key].is_contiguous(memory_format=torch.channels_last)
        elif ours_key in modulated:  # NHWC as the convolution (or the transposed one) takes it
            w = ours[ours_key][0].transpose(0, 1) if modulated[ours_key].upsample else ours[ours_key][0]
            assert w.is_contiguous(memory_format=torch.channels_last)
        else:                        # everything else is taken without a copy
            assert ours[ours_key].data_ptr() == sd[theirs].data_ptr()


@pytest.mark.parametrize("name", RELEASED[2:3])
def test_dropped_or_reshaped_key_is_named(name):
    m = manifest(name)
    kwargs = m["constructor_kwargs"]
    sd = synthesize(m["state_dict"])
    dropped = dict(sd)
    del dropped["generator.encoder.5.3.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'generator.encoder.5.3.weight' "
                                              r"\(expected shape \[9216, 8192\]\)"):
        glean.GLEAN.from_official({"state_dict": dropped}, kwargs)
    reshaped = dict(sd)
    reshaped["generator.generator.convs.3.conv.weight_orig"] = torch.empty(1, 512, 256, 3, 3)
    with pytest.raises(CheckpointError, match=r"'generator.generator.convs.3.conv.weight_orig' has shape "
                                              r"\[1, 512, 256, 3, 3\], expected \[1, 512, 512, 3, 3\]"):
        glean.GLEAN.from_official({"state_dict": reshaped}, kwargs)
    extra = dict(sd, **{"generator.decoder.9.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'generator.decoder.9.weight'"):
        glean.GLEAN.from_official({"state_dict": extra}, kwargs)
    with pytest.raises(CheckpointError, match="not an official GLEAN release"):
        glean.GLEAN.from_official({"state_dict": {"encoder.0.weight": torch.zeros(1)}}, kwargs)


@pytest.mark.parametrize("name,cfg", [("stylegan2_cat-config-f_256", dict(out_size=256)),
                                      ("stylegan2_ffhq-config-f_1024", dict(out_size=1024))])
def test_official_stylegan2_weights_load(name, cfg):
    m = manifest(name)
    g_sd = synthesize(m["generator_ema"]["state_dict"])
    d_sd = synthesize(m["discriminator"]["state_dict"])
    with torch.device("meta"):
        G = stylegan2.Generator(stylegan2.GeneratorConfig(**cfg))
        D = stylegan2.Discriminator(stylegan2.DiscriminatorConfig(in_size=cfg["out_size"]))
    wrapped = {"state_dict": {**g_sd, **d_sd}}
    weight_formats.load_official(G, wrapped, "generator_ema.")
    weight_formats.load_official(D, {**g_sd, **d_sd}, "discriminator.")  # also without the state_dict wrapper
    assert not any(t.is_meta for t in G.state_dict().values()) and not any(t.is_meta for t in D.state_dict().values())
    assert sum(p.numel() for p in G.parameters()) == m["generator_ema"]["summary"]["num_parameters"]
    assert sum(p.numel() for p in D.parameters()) == m["discriminator"]["summary"]["num_parameters"]


def test_bank_loading_into_glean(tmp_path):
    cfg = tiny_cfg()
    model = glean.GLEAN(cfg)
    G = stylegan2.Generator(cfg.bank_config())
    names = weight_formats.stylegan2_official_names(G)
    path = tmp_path / "bank.pth"
    torch.save({"state_dict": {"generator_ema." + names[k]: v for k, v in G.state_dict().items()}}, path)
    model.load_bank(path)
    for k, v in G.state_dict().items():
        assert torch.equal(model.bank.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="no StyleGAN2 generator found"):
        model.load_bank({"state_dict": {"generator.x": torch.zeros(1)}})


class Evil:
    """Unpickling this runs a shell command, unless the unpickler refuses to call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def golden_release_dict():
    return torch.load(DATA / "golden_in16_out64_ckpt.pth", weights_only=True)


def test_malicious_meta_never_runs_and_weights_still_load(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = golden_release_dict()
    ckpt["meta"] = {"note": "release", "payload": Evil(marker), "nested": [Evil(marker)]}
    path = tmp_path / "release.pth"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses it ...
        torch.load(path, weights_only=True)
    loaded = glean_io.load_file(path)              # ... and ours falls back to the restricted unpickler
    assert not marker.exists()
    assert isinstance(loaded["meta"]["payload"], glean_io.Placeholder)
    assert "system" in loaded["meta"]["payload"].refused
    assert loaded["meta"]["note"] == "release"
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v)
    meta = json.loads((DATA / "golden_in16_out64.json").read_text())
    cfg = dict(meta["constructor_kwargs"], channel_base=64)
    model = glean.GLEAN.from_official(path, cfg)
    assert not marker.exists()
    io = torch.load(DATA / "golden_in16_out64_io.pt", weights_only=True)
    with torch.no_grad():
        assert (model(io["input"]) - io["output"]).abs().max() <= 1e-4


def test_raw_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": Evil(marker)}))  # legacy (non-zip) format
    with pytest.raises(CheckpointError):
        glean_io.load_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("content,match", [(None, "checkpoint not found"),
                                           (b"\x89PNG\r\n\x1a\n not a checkpoint", "not a readable|corrupt"),
                                           ("truncated", "corrupt or truncated")])
def test_missing_corrupt_truncated_files(tmp_path, content, match):
    path = tmp_path / "model.pth"
    if content == "truncated":
        torch.save(golden_release_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        glean_io.load_file(path)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        glean_io.load_file(path)


def test_own_loader_refuses_release_file_with_hint():
    with pytest.raises(CheckpointError, match="from_official"):
        glean.GLEAN.load(DATA / "golden_in16_out64_ckpt.pth")


def test_download_file_url_with_hash(tmp_path):
    src = tmp_path / "weights-abc.pt"
    torch.save({"x": torch.arange(3)}, src)
    sha = glean_io.sha256_of(src)
    cache = tmp_path / "cache"
    got = glean_io.download(src.as_uri(), sha[:8], progress=False, cache_dir=cache)
    assert got == cache / src.name and glean_io.sha256_of(got) == sha
    assert glean_io.download(src.as_uri(), sha[:8], progress=False, cache_dir=cache) == got  # cached
    got.unlink()
    with pytest.raises(CheckpointError, match="sha256 .* does not start with deadbeef"):
        glean_io.download(src.as_uri(), "deadbeef", progress=False, cache_dir=cache)
    assert list(cache.iterdir()) == []  # nothing half-written or unverified left in the cache


@pytest.mark.parametrize("content,match", [(b"", "empty file"),
                                           (b"hello, this is a text file\n" * 20, "corrupt or truncated")])
def test_empty_and_text_files_are_named_not_tracebacks(tmp_path, content, match):
    """A zero-byte checkpoint (killed copy) and a text file passed as weights: a CheckpointError naming the file."""
    for name in ("x.pt", "x.pkl"):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match if name == "x.pt" else "empty file|not a readable pickle"):
            (glean_io.load_pickle if name.endswith(".pkl") else glean_io.load_file)(path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert glean_io.current_umask() == umask
        glean_io.save_file({"x": torch.zeros(1)}, tmp_path / "a.pt")
        (tmp_path / "b.txt").write_text("an ordinary file")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".step_00000002.pt.k3j2_x.tmp").write_bytes(b"partial")      # as a SIGKILL during a write leaves
    (tmp_path / ".glean.safetensors.abc.tmp").write_bytes(b"partial")
    keep = [tmp_path / "step_00000001.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in keep:
        p.write_bytes(b"x")
    removed = glean_io.remove_stale_temp(tmp_path, "step_*.pt")
    assert [p.name for p in removed] == [".step_00000002.pt.k3j2_x.tmp"]
    assert glean_io.remove_stale_temp(tmp_path) == [tmp_path / ".glean.safetensors.abc.tmp"]
    assert sorted(tmp_path.iterdir()) == sorted(keep)
