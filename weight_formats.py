"""Weight files in every format this project reads, and the one it writes: the formats, kept out of the models.

glean.py and stylegan2.py hold the networks; this module knows how their tensors are named and stored on disk:
- this project's own files: a GLEAN (`save_glean` / `load_glean`) or a StyleGAN2 bank (`save_generator` /
  `load_generator`), tensors plus the configuration as plain data (.safetensors or .pt);
- official release files (mmagic / mmediting): GLEAN checkpoints with `generator.*` keys and StyleGAN2 weights with
  `generator_ema.*` / `discriminator.*` keys, whose equalized-learning-rate layers store `weight_orig`
  (`stylegan2_official_names`, `glean_official_names`, `glean_from_official`, `official_config`);
- latent banks of other StyleGAN2 code bases: rosinality's .pt (`g_ema`) and NVIDIA stylegan2-ada's .pkl (`G_ema`,
  read by glean_io's restricted unpickler, which never runs the code such a pickle carries);
- discriminators, wherever a file holds one (`discriminator_state`), for train.py;
- configurations read from files (`config_from_dict`), with their field names and value types checked first.
Foreign key names are renamed to ours here and nowhere else. Reading a file never changes it or anything global.
"""
import json
import math
import re
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn

import stylegan2
from glean_io import (CheckpointError, Placeholder, check_state, load_file, load_pickle, load_state_strict, named,
                      save_file, state_dict_of)


def config_from_dict(cls, d: dict):
    """A config dataclass (GLEANConfig, GeneratorConfig) from plain data such as a checkpoint's: unknown field
    names and values of the wrong type (judged by each field's default) are a ValueError naming them."""
    known = {f.name: f.default for f in fields(cls)}
    unknown = sorted(map(str, set(d) - set(known))) if isinstance(d, dict) else None
    if unknown is None or unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}" if unknown else "a config must be a dict")
    is_int = lambda t: isinstance(t, int) and not isinstance(t, bool)              # noqa: E731
    for k, v in d.items():
        default = known[k]
        ok = (isinstance(v, bool) if isinstance(default, bool) else
              isinstance(v, (tuple, list)) and all(map(is_int, v)) if isinstance(default, tuple) else
              is_int(v) or isinstance(v, float) if isinstance(default, float) else v is None or is_int(v))
        if not ok:
            raise ValueError(f"{cls.__name__} field {k} = {v!r} has the wrong type")
    return cls(**d)


# Bounds on a file's bank numbers, checked before anything is built from them (a small file must not make a model of
# gigabytes): the official models use 512 / 8 / 2 / 512.
_LIMITS = {"style_channels": 1 << 14, "num_mlps": 64, "channel_multiplier": 64, "channel_base": 1 << 14}


def _config_of_file(cls, config, source: str):
    """A config from a file's plain data (a dict, or JSON text), its bank numbers within _LIMITS; or a
    CheckpointError naming the file."""
    try:
        cfg = config_from_dict(cls, json.loads(config) if isinstance(config, str) else config)
        for name, limit in _LIMITS.items():
            v = getattr(cfg, name, 1)
            if not (type(v) is int and 1 <= v <= limit):
                raise ValueError(f"{name} = {v!r:.40} is not a whole number from 1 to {limit}")
        if not 1 <= len(getattr(cfg, "blur_kernel", (1,))) <= 16:
            raise ValueError("blur_kernel is not a short list of numbers")
        return cfg
    except (TypeError, ValueError, RecursionError) as e:     # json's errors are ValueErrors; deep nesting recurses
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise CheckpointError(f"{source}: its config is not usable ({why}); the file is damaged or edited") from e


def check_weights_file(name: str, flag: str) -> None:
    """A file passed as weights (`flag` names the option) that clearly holds none - text, an image - is a
    CheckpointError saying so, before anything tries to read it as a checkpoint. Registered names, missing files
    and anything that may be a checkpoint (zip, pickle, tar, safetensors, empty) pass: load_file judges those."""
    path = Path(name) if name and name != "none" else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar":   # zip, pickle, tar: torch's
        return
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:   # safetensors
        return
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8": "a JPEG image", b"GIF8": "a GIF image", b"%PDF": "a PDF"}
    what = next((k for magic, k in kinds.items() if head.startswith(magic)), None)
    if what is None:
        try:
            first = head.decode("utf-8").strip().splitlines()[0][:40] if head.strip() else ""
            what = f"text ('{first}...')" if first.isprintable() else "data of an unknown kind"
        except UnicodeDecodeError:
            what = "data of an unknown kind"
    raise CheckpointError(f"{flag} {name} is not a weights file (it holds {what}): pass a checkpoint, e.g. a "
                          f"registered name, a file of train.py or an official release file")


def _source(checkpoint, source: str = "") -> str:
    return source or (str(checkpoint) if not isinstance(checkpoint, dict) else "checkpoint")


def _metadata(ckpt: dict) -> dict:
    """Where a file keeps its format and config: a .safetensors file's metadata, else the dict itself."""
    return ckpt["metadata"] if isinstance(ckpt.get("metadata"), dict) else ckpt


def _save(fmt: str, config: dict, sd: dict, path, **extra) -> None:
    """This project's format: tensors + plain data; .safetensors keeps the plain data in its metadata."""
    meta = {"format": fmt, "config": config, **extra}
    save_file({**meta, "state_dict": sd, "metadata": meta} if str(path).endswith(".safetensors") else
              {**meta, "state_dict": sd}, path)


def _tensors(module: nn.Module, prefix: str = "") -> dict:
    return {prefix + k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# StyleGAN2: official names (mmagic / mmediting)


def stylegan2_official_names(module: nn.Module) -> dict:
    """Each of our state-dict keys of a StyleGAN2 generator or discriminator -> its official (mmagic) name.

    The official equalized-LR layers keep the unscaled weight as `weight_orig`; their linear layers nest it in
    `.linear`, and the discriminator's conv layers in `.conv`. Everything else has the same name.
    """
    names = {}
    for path, m in module.named_modules():
        p = f"{path}." if path else ""
        if isinstance(m, stylegan2.EqualLinear):
            names[p + "weight"] = p + "linear.weight_orig"
        elif isinstance(m, stylegan2.ModulatedConv2d):
            names[p + "weight"] = p + "weight_orig"
        elif isinstance(m, stylegan2.EqualConv2d):
            names[p + "weight"] = p + "conv.weight_orig"
            names[p + "bias"] = p + "conv.bias"
    return {k: names.get(k, k) for k in module.state_dict()}


def load_official(module: nn.Module, checkpoint, prefix: str) -> nn.Module:
    """Load official StyleGAN2 weights (path or loaded dict, with or without a `state_dict` wrapper) into `module`.

    prefix: 'generator_ema.' for the generator GLEAN uses as its bank, 'discriminator.' for the discriminator.
    Every key under the prefix must match in name and shape (see `stylegan2_official_names`).
    """
    source = _source(checkpoint)
    sd = state_dict_of(checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint))
    sd = {k: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise CheckpointError(f"{source} has no '{prefix}' keys: not an official StyleGAN2 weight file")
    names = {k: prefix + v for k, v in stylegan2_official_names(module).items()}
    load_state_strict(module, sd, names, source)
    return module


def infer_generator_config(sd: dict, official: bool = False, source: str = "checkpoint") -> stylegan2.GeneratorConfig:
    """The GeneratorConfig a state dict (our names, or official names with official=True) was made with."""
    lin = ".linear.weight_orig" if official else ".weight"
    mlps = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"style_mapping\.(\d+)" + re.escape(lin), k)))
    convs = [k for k in sd if re.fullmatch(r"convs\.\d+\.conv\.weight(_orig)?", k)]
    if not mlps or "constant_input.input" not in sd or not convs:
        raise CheckpointError(f"{source}: not a StyleGAN2 generator state dict (no mapping network, constant input "
                              f"or convs)")
    try:                                          # a crafted file's "tensors" may be anything: checked here
        out_size = 2 ** (len(convs) // 2 + 2)
        style = sd[f"style_mapping.{mlps[0]}{lin}"].shape[1]
        base = sd["constant_input.input"].shape[1]
        cm = 2
        if out_size >= 64:  # ch[64] = 256 * cm * base / 512
            c64 = sd[f"convs.{2 * 3}.conv.weight" + ("_orig" if official else "")].shape[1]
            cm = max(1, round(c64 * 512 / (256 * base)))
        return _config_of_file(stylegan2.GeneratorConfig, dict(
            out_size=out_size, style_channels=style, num_mlps=len(mlps), channel_multiplier=cm, channel_base=base,
            lr_mlp=0.01), source)
    except (KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source}: its generator tensors do not make a StyleGAN2 generator ({e!r:.80})") from e


# ----------------------------------------------------------------------------------------------------------
# StyleGAN2: latent banks from other code bases, renamed to ours here and nowhere else


_ROSINALITY = [(r"^style\.", "style_mapping."), (r"^input\.input$", "constant_input.input"),
               (r"\.modulation\.", ".style_modulation."), (r"\.noise\.weight$", ".noise_injector.weight"),
               (r"^noises\.noise_", "injected_noise_")]


def _from_rosinality(sd: dict) -> dict:
    """rosinality/stylegan2-pytorch `g_ema` keys -> ours (same layers, shapes and weight scaling)."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in _ROSINALITY:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _flatten_placeholders(obj, prefix="") -> dict:
    """Tensors of a module tree that a restricted unpickler rebuilt as Placeholders (NVIDIA's persistent classes
    pickle their state as {'_parameters', '_buffers', '_modules'} inside a `meta` dict), as a flat state dict."""
    if isinstance(obj, Placeholder):
        state = obj.state if isinstance(obj.state, dict) else {}
        if obj.args and isinstance(obj.args[0], dict) and isinstance(obj.args[0].get("state"), dict):
            state = obj.args[0]["state"]                                  # persistence._reconstruct_persistent_obj
        out = {}
        for group in ("_parameters", "_buffers"):
            for name, t in _items(state.get(group)):
                if torch.is_tensor(t):
                    out[prefix + name] = t
        for name, child in _items(state.get("_modules")):
            out.update(_flatten_placeholders(child, f"{prefix}{name}."))
        return out
    return {}


def _items(group) -> list:
    """The (name, value) pairs of a pickled module's _parameters / _buffers / _modules dict (string names only)."""
    return [(k, v) for k, v in group.items() if isinstance(k, str)] if isinstance(group, dict) else []


def _ada_target(res: int, layer: str, rest: str):
    """Our (key, conversion) of a stylegan2-ada synthesis tensor: block b{res}, layer conv0/conv1/torgb, name rest.
    Our layers are flat: conv1 (4 px), then convs[2k] / convs[2k + 1] for the block k going up to 8 * 2^k."""
    k = int(math.log2(res)) - 3                                           # -1 for the 4x4 block
    if layer == "torgb":
        name = "to_rgb1" if res == 4 else f"to_rgbs.{k}"
    else:
        name = "conv1" if res == 4 else f"convs.{2 * k + (layer == 'conv1')}"
    noise = 0 if res == 4 else 2 * k + 1 + (layer == "conv1")            # injected_noise_n: layer n of the flat list
    return {"weight": (f"{name}.conv.weight", lambda t: t[None]),
            "bias": (f"{name}.bias", lambda t: t.view(1, -1, 1, 1)) if layer == "torgb" else
                    (f"{name}.activate.bias", lambda t: t),
            "affine.weight": (f"{name}.conv.style_modulation.weight", lambda t: t),
            "affine.bias": (f"{name}.conv.style_modulation.bias", lambda t: t),
            "noise_strength": (f"{name}.noise_injector.weight", lambda t: t.reshape(1)),
            "noise_const": (f"injected_noise_{noise}", lambda t: t[None, None])}.get(rest)


def _from_ada(sd: dict) -> dict:
    """NVIDIA stylegan2-ada-pytorch G / G_ema tensors -> ours. Weights lose the leading batch axis convention
    ([O, I, k, k] there), noise is per-layer `noise_const` + scalar `noise_strength`; the FIR filters are checked to
    be the [1, 3, 3, 1] ones our layers use. Not modelled: conv_clamp (None in the converted official models)."""
    out, ref = {}, stylegan2.make_kernel([1, 3, 3, 1])
    for k, v in sd.items():
        if k.endswith("resample_filter"):
            if v.shape != ref.shape or not torch.allclose(v.float(), ref, atol=1e-6):
                raise CheckpointError(f"unsupported resample filter in '{k}' (expected [1, 3, 3, 1])")
            continue
        m = re.fullmatch(r"mapping\.fc(\d+)\.(weight|bias)", k)
        if m:
            out[f"style_mapping.{int(m[1]) + 1}.{m[2]}"] = v
            continue
        if k == "mapping.w_avg":
            continue                                                      # truncation centre; see mean_latent
        m = re.fullmatch(r"synthesis\.b(\d+)\.(const|conv0|conv1|torgb)\.?(.*)", k)
        if m and m[2] == "const":
            out["constant_input.input"] = v[None]
            continue
        target = _ada_target(int(m[1]), m[2], m[3]) if m else None
        if target is None:
            raise CheckpointError(f"unexpected key '{k}' in a stylegan2-ada generator")
        out[target[0]] = target[1](v)
    return out


# ----------------------------------------------------------------------------------------------------------
# StyleGAN2: any file in, this project's file out


def generator_state(ckpt, source: str = "checkpoint") -> tuple:
    """A StyleGAN2 generator's weights from any supported file, renamed to ours: (state dict, config or None).

    Recognised: this project's bank files ({'format': 'stylegan2', 'config', 'state_dict'}) and bank-training
    checkpoints ('g_ema'), official mmagic/mmediting files (`generator_ema.*`), rosinality's .pt (`g_ema`), and
    NVIDIA stylegan2-ada .pkl (`G_ema`, read by glean_io's restricted unpickler).
    """
    if isinstance(ckpt, (str, Path)):
        source = str(ckpt)
        ckpt = load_pickle(ckpt) if str(ckpt).endswith(".pkl") else load_file(ckpt)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: not a StyleGAN2 checkpoint")
    meta = _metadata(ckpt)
    if meta.get("format") == "stylegan2":                                 # ours (.pt or .safetensors)
        return ({k: v for k, v in state_dict_of(ckpt, source).items() if not k.startswith("discriminator.")},
                _config_of_file(stylegan2.GeneratorConfig, meta.get("config"), source))
    if ckpt.get("format") == "glean-train" and isinstance(ckpt.get("g_ema"), dict):   # our bank-training checkpoint
        return named(ckpt["g_ema"], source), _config_of_file(stylegan2.GeneratorConfig, ckpt.get("generator_config"),
                                                              source)
    if "G_ema" in ckpt:                                                   # NVIDIA stylegan2-ada pickle
        return _from_ada(_flatten_placeholders(ckpt["G_ema"])), None
    if "g_ema" in ckpt and isinstance(ckpt["g_ema"], dict):              # rosinality
        return _from_rosinality(named(ckpt["g_ema"], source)), None
    prefix = "generator_ema."
    sd = {k[len(prefix):]: v for k, v in named(state_dict_of(ckpt, source), source).items() if k.startswith(prefix)}
    if sd:                                                                # official mmagic / mmediting
        with torch.device("meta"):
            probe = stylegan2.Generator(infer_generator_config(sd, official=True, source=source))
        back = {v: k for k, v in stylegan2_official_names(probe).items()}
        return {back.get(k, k): v for k, v in sd.items()}, None
    raise CheckpointError(f"{source}: no StyleGAN2 generator found (expected this project's bank file, "
                          f"'generator_ema.*' keys, rosinality's 'g_ema' or a stylegan2-ada .pkl with 'G_ema')")


def _with_kernels(G: stylegan2.Generator, sd: dict) -> dict:
    """sd, plus G's FIR kernels (fixed buffers) where the source format has none (NVIDIA's files)."""
    kernels = {k: v if not v.is_meta else torch.zeros(v.shape) for k, v in G.state_dict().items()
               if k.endswith(".kernel") and k not in sd}
    return {**sd, **kernels}


def load_generator_weights(G: stylegan2.Generator, ckpt, source: str = "") -> stylegan2.Generator:
    """Load weights from any file `generator_state` reads into G, strictly (every key and shape must match).
    Buffers the source format has no counterpart for (the FIR kernels of NVIDIA's files) keep their values."""
    source = _source(ckpt, source)
    sd = _with_kernels(G, generator_state(ckpt, source)[0])
    load_state_strict(G, sd, {k: k for k in G.state_dict()}, source)
    return G


def load_generator(ckpt, config: stylegan2.GeneratorConfig | None = None) -> stylegan2.Generator:
    """A Generator built from the file's own config (or inferred from its shapes) with its weights, in eval mode.
    The file's tensors are checked against the configuration (on the meta device) before the model is built."""
    source = _source(ckpt)
    if isinstance(ckpt, (str, Path)):
        ckpt = load_pickle(ckpt) if str(ckpt).endswith(".pkl") else load_file(ckpt)
    sd, found = generator_state(ckpt, source)
    cfg = config or found or infer_generator_config(sd, source=source)
    with torch.device("meta"):
        probe = stylegan2.Generator(cfg)
    check_state(probe, _with_kernels(probe, sd), {k: k for k in probe.state_dict()}, source)
    return load_generator_weights(stylegan2.Generator(cfg), ckpt, source).eval()


def save_generator(G: stylegan2.Generator, path, discriminator: stylegan2.Discriminator | None = None) -> None:
    """This project's bank file: the generator's tensors + its config as plain data (.safetensors or .pt), and
    optionally the discriminator trained with it (tensors under 'discriminator.', its config in the metadata), from
    which GLEAN training starts its own (as the official configs do from the StyleGAN2 release)."""
    sd, extra = _tensors(G), {}
    if discriminator is not None:
        sd.update(_tensors(discriminator, "discriminator."))
        extra["discriminator_config"] = asdict(discriminator.cfg)
    _save("stylegan2", asdict(G.cfg), sd, path, **extra)


def discriminator_state(path: Path) -> tuple:
    """The StyleGAN2 discriminator a file holds, as (state dict, names) for load_state_strict, or (None, None);
    names None means official names (load with `load_official(D, sd, 'discriminator.')`).

    Read: this project's bank files (written by --stage bank: 'discriminator.*' under our names), its training
    checkpoints (GLEAN stage: 'discriminator'; bank stage: 'd'), rosinality's .pt ('d', the same names as ours) and
    official mmagic / mmediting files, StyleGAN2 releases and GLEAN releases alike ('discriminator.*', official
    names). NVIDIA .pkl files are not read for it.
    """
    if Path(path).suffix == ".pkl":
        return None, None
    ckpt = load_file(path)
    meta, sd = _metadata(ckpt), ckpt.get("state_dict", ckpt)
    ours = lambda d: {k: k for k in d}                                               # noqa: E731
    if meta.get("format") == "stylegan2":                                   # our bank file
        d = {k[len("discriminator."):]: v for k, v in sd.items() if k.startswith("discriminator.")}
        return (d, ours(d)) if d else (None, None)
    for key in ("discriminator", "d"):                                      # our checkpoints, rosinality's
        if isinstance(ckpt.get(key), dict) and ckpt[key]:
            return ckpt[key], ours(ckpt[key])
    if isinstance(sd, dict) and any(isinstance(k, str) and k.startswith("discriminator.") for k in sd):
        return sd, None                                                     # official names
    return None, None


# ----------------------------------------------------------------------------------------------------------
# GLEAN: official release files and this project's files


def glean_official_names(model: nn.Module) -> dict:
    """A GLEAN's state-dict keys -> keys of the official release checkpoint: `generator.` before everything,
    the bank called `generator` there (`generator.generator.` + its official StyleGAN2 names)."""
    bank = stylegan2_official_names(model.bank) if model.bank is not None else {}
    return {k: "generator.generator." + bank[k[len("bank."):]] if k.startswith("bank.") else "generator." + k
            for k in model.state_dict()}


def glean_from_official(cls, checkpoint, cfg, source: str = ""):
    """An official GLEAN release checkpoint ({'meta', 'state_dict'} with `generator.` keys; path or dict) as a
    `cls` (glean.GLEAN or glean_fast.GLEANFast) built from `cfg`, in eval mode.

    Keys outside `generator.` (discriminator, perceptual loss) are ignored; every generator key must match the
    model built from `cfg` in name and shape.
    """
    source = _source(checkpoint, source)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
    sd = {k: v for k, v in state_dict_of(ckpt, source).items() if isinstance(k, str) and k.startswith("generator.")}
    if not sd:
        raise CheckpointError(f"{source} has no 'generator.' keys: not an official GLEAN release checkpoint "
                              f"(for this project's own files use GLEAN.load)")
    with torch.device("meta"):                                           # no random init: the file has it all
        model = cls(cfg)
    load_state_strict(model, sd, glean_official_names(model), source)
    return model.eval()


def official_config(sd: dict, source: str = "checkpoint") -> dict:
    """The GLEANConfig fields an official release file was made with, read off its `generator.*` tensors: the
    encoder's length gives in_size, the bank (infer_generator_config) out_size and widths, the RRDBNet its own."""
    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    bank = {k[len("generator.generator."):]: v for k, v in sd.items() if k.startswith("generator.generator.")}
    try:
        g = infer_generator_config(bank, official=True)
        rrdb = sd["generator.encoder.0.0.body.0.rdb1.conv1.weight"]          # [growth, channels, 3, 3]
        last = f"generator.decoder.{count('generator.decoder.') - 1}.0.weight"   # [decoder_channels, ., 3, 3]
        return dict(in_size=2 ** count("generator.encoder."), out_size=g.out_size, rrdb_channels=rrdb.shape[1],
                    rrdb_growth_channels=rrdb.shape[0], num_rrdbs=count("generator.encoder.0.0.body."),
                    style_channels=g.style_channels, num_mlps=g.num_mlps,
                    channel_multiplier=g.channel_multiplier, channel_base=g.channel_base,
                    decoder_channels=sd[last].shape[0])
    except (KeyError, IndexError, AttributeError, ValueError, CheckpointError) as e:
        raise CheckpointError(f"{source}: has 'generator.' keys but is not a complete official GLEAN release file "
                              f"({e})") from e


def save_glean(model: nn.Module, path) -> None:
    """This project's format: the model's tensors + its config as plain data (.safetensors or .pt), atomically."""
    _save("glean", asdict(model.cfg), _tensors(model), path)


def load_glean(cls, config_cls, checkpoint, source: str = ""):
    """A `cls` model from this project's format (see `save_glean`; path or loaded dict), in eval mode. The config is
    checked (`config_from_dict`) and matched against the tensors before anything is built."""
    source = _source(checkpoint, source)
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_file(checkpoint)
    meta = _metadata(ckpt)
    if meta.get("format") != "glean" or "config" not in meta:
        raise CheckpointError(f"{source} is not a GLEAN checkpoint of this project (no format/config entry); "
                              f"for official release files use GLEAN.from_official")
    sd = state_dict_of(ckpt, source)
    cfg = _config_of_file(config_cls, meta["config"], source)
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})  # noqa: E731
    if count("encoder.0.0.body.") != cfg.num_rrdbs or cfg.uses_bank and count("bank.style_mapping.") != \
            cfg.num_mlps:           # checked before building: the module count follows these two numbers
        raise CheckpointError(f"{source}: its config (num_rrdbs={cfg.num_rrdbs}, num_mlps={cfg.num_mlps}) does "
                              f"not match its tensors; the file is damaged or edited")
    with torch.device("meta"):
        model = cls(cfg)
    load_state_strict(model, sd, {k: k for k in model.state_dict()}, source)
    return model.eval()
