"""Checkpoints crafted by an attacker, written here opcode by opcode: loading one never writes a file, never changes
an attribute of anything outside the file, never runs code, and every refusal is one CheckpointError line."""
import collections
import copyreg
import io
import pickle
import struct
import subprocess
import sys
import tempfile
import types
import zipfile

import pytest
import torch

import glean_io
import glean_pickle
import infer
import stylegan2
import zoo
from conftest import ROOT
from glean_io import CheckpointError

# ----------------------------------------------------------------------------------------------------------
# Crafting: pickle opcodes by hand, in torch.save's zip and legacy layouts


def text(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def pairs(d: dict) -> bytes:
    """A dict on the stack: EMPTY_DICT MARK k v ... SETITEMS (keys and values given as opcode bytes)."""
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + v for k, v in d.items()) + pickle.SETITEMS


P2 = pickle.PROTO + b"\x02"


def set_attributes(target: bytes, attrs: dict) -> bytes:
    """target, then BUILD with state (None, attrs): pickle sets each attribute with setattr."""
    return target + pickle.NONE + pairs({text(k): v for k, v in attrs.items()}) + pickle.TUPLE2 + pickle.BUILD


def legacy(main: bytes, keys: bytes = b"") -> bytes:
    """torch.save's legacy layout: magic number, protocol, system info, the object, storage keys (here none)."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        glean_pickle.MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    return head + main + (keys or pickle.dumps([], protocol=2))


def zipped(main: bytes) -> bytes:
    """A checkpoint torch.save wrote (zip layout), with its data.pkl replaced by `main`."""
    b = io.BytesIO()
    torch.save({"x": torch.arange(4.0)}, b)
    src, out = zipfile.ZipFile(io.BytesIO(b.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, main if info.filename.endswith("/data.pkl") else src.read(info))
    return out.getvalue()


def patch_writer(name: str) -> bytes:
    """The issue's attack on torch's legacy reader: set dump_patches and __name__ on an allowed torch function, then
    a 'module' record with other source code for it: torch writes the diff to `<__name__>.patch`."""
    func = set_attributes(glob("torch._utils", "_rebuild_tensor_v2"), {"dump_patches": pickle.NEWTRUE,
                                                                       "__name__": text(name)})
    return legacy(P2 + pickle.MARK + text("module") + func + text("evil.py") + text("attacker text\n") +
                  pickle.TUPLE + pickle.BINPERSID + pickle.STOP)


def storage_bytes(main: bytes) -> bytes:
    """A plain pickle (as NVIDIA's .pkl) whose storage record (torch.storage._load_from_bytes) carries `main`."""
    b = main
    return P2 + pairs({text("G_ema"): glob("torch.storage", "_load_from_bytes") + pickle.BINBYTES +
                       struct.pack("<I", len(b)) + b + pickle.TUPLE1 + pickle.REDUCE}) + pickle.STOP


def tensor(hooks: bytes = pickle.EMPTY_DICT) -> bytes:
    """_rebuild_tensor_v2 of the 4 floats zipped() stores under key '0'."""
    return (glob("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pickle.MARK + text("storage") +
            glob("torch", "FloatStorage") + text("0") + text("cpu") + pickle.BININT1 + b"\x04" + pickle.TUPLE +
            pickle.BINPERSID + pickle.BININT1 + b"\0" + pickle.BININT1 + b"\x04" + pickle.TUPLE1 + pickle.BININT1 +
            b"\x01" + pickle.TUPLE1 + pickle.NEWFALSE + hooks + pickle.TUPLE + pickle.REDUCE)


def stop(x: bytes) -> bytes:
    return P2 + x + pickle.POP + pairs({}) + pickle.STOP


CRAFTED = {   # name: (file bytes, what it tries)
    "patch.pt": (lambda d: patch_writer(str(d / "evil")), "write <name>.patch through torch's legacy reader"),
    "patch_cwd.pt": (lambda d: patch_writer("evil"), "the same, into the working directory"),
    "patch.pkl": (lambda d: storage_bytes(patch_writer(str(d / "evil"))), "the same inside a .pkl's storage"),
    "zip_rename.pt": (lambda d: zipped(stop(set_attributes(glob("torch._utils", "_rebuild_tensor_v2"),
                                                           {"__name__": text("renamed"),
                                                            "__qualname__": text("renamed")}))),
                      "rename a torch function for the rest of the process"),
    "zip_dict.pt": (lambda d: zipped(stop(glob("torch._utils", "_rebuild_tensor") +
                                          pairs({text("__dict__"): pairs({text("x"): pickle.NEWTRUE})}) +
                                          pickle.BUILD)),
                    "replace a function's __dict__"),
    "zip_class.pt": (lambda d: zipped(stop(set_attributes(glob("collections", "OrderedDict"),
                                                          {"__repr__": glob("os", "system")}))),
                     "patch a method of an allowed class"),
    "zip_placeholder_class.pt": (lambda d: zipped(stop(glob("os", "system") + glob("torch._utils", "_rebuild_tensor")
                                                       + pickle.BUILD)),
                                 "Placeholder.__setstate__ called with an allowed function as `self`"),
    "zip_tensor_hook.pt": (lambda d: zipped(P2 + tensor(pairs({text("h"): glob("os", "system")})) + pickle.STOP),
                           "a tensor with a backward hook"),
    "zip_param_state.pt": (lambda d: zipped(P2 + glob("torch._utils", "_rebuild_parameter_with_state") +
                                            pickle.MARK + tensor() + pickle.NEWFALSE + pickle.EMPTY_DICT +
                                            pairs({text("__class__"): glob("torch", "Size"),
                                                   text("_backward_hooks"): pairs({text("h"): glob("os", "system")})})
                                            + pickle.TUPLE + pickle.REDUCE + pickle.STOP),
                           "a Parameter whose state sets __class__ and hooks"),
    "zip_module_record.pt": (lambda d: zipped(P2 + pickle.MARK + text("module") + glob("torch", "Size") + text("a") +
                                              text("b") + pickle.TUPLE + pickle.BINPERSID + pickle.STOP),
                             "a zip storage typed 'module'"),
    "inst.pt": (lambda d: zipped(pickle.PROTO + b"\x01" + pickle.MARK + text(f"touch {d / 'pwned'}") +
                                 pickle.INST + b"os\nsystem\n" + pickle.STOP), "INST os.system"),
    "stack_global.pt": (lambda d: zipped(pickle.PROTO + b"\x04" + text("torch._utils") +
                                         text("_rebuild_tensor.__globals__") + pickle.STACK_GLOBAL + pickle.STOP),
                        "a dotted name reaching a module's globals"),
    "ext.pt": (lambda d: zipped(P2 + pickle.EXT1 + b"\xf0" + pickle.STOP), "the extension registry (cached)"),
    "reduce.pt": (lambda d: zipped(P2 + glob("os", "system") + text(f"touch {d / 'pwned'}") + pickle.TUPLE1 +
                                   pickle.REDUCE + pickle.STOP), "REDUCE os.system"),
}


def snapshot(objs) -> dict:
    """Every attribute of each object (its __dict__, and the names and code a function carries), by identity, and
    what each mutable container held: any setattr, rename or in-place change shows up."""
    def fingerprint(v):
        if isinstance(v, (str, bytes, int, float, type(None))):
            return v                                         # (a C type's __name__ is a new string each time)
        if isinstance(v, dict):
            return ("dict", tuple((id(k), id(x)) for k, x in list(v.items())))
        if isinstance(v, (list, set)):
            return (type(v).__name__, tuple(sorted(map(id, v))))
        return id(v)
    out = {}
    for i, obj in enumerate(objs):
        attrs = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        for name in ("__name__", "__qualname__", "__code__", "__defaults__", "__kwdefaults__", "__module__",
                     "__class__"):
            if hasattr(obj, name):
                attrs[name] = getattr(obj, name)
        out[i] = {k: fingerprint(v) for k, v in attrs.items()}
    return out


def watched() -> list:
    """The objects a checkpoint can name (ALLOWED), the torch functions they wrap, and the modules they live in."""
    wrapped = [torch._utils._rebuild_tensor, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor_v3,
               torch._utils._rebuild_parameter, torch._utils._rebuild_parameter_with_state,
               torch._utils.set_tensor_metadata, torch.storage._load_from_bytes, torch.nn.Module]
    modules = [collections, torch, torch._utils, torch.storage, torch.serialization, glean_pickle, glean_io, pickle,
               copyreg, sys.modules["_collections"]]
    return list(glean_pickle.ALLOWED.values()) + wrapped + modules + [glean_pickle.Placeholder,
                                                                      glean_pickle.RestrictedUnpickler]


def files_in(*folders) -> set:
    return {p for f in folders for p in f.rglob("*")}


def test_crafted_files_write_nothing_change_nothing_run_nothing(tmp_path, monkeypatch, capsys):
    files, work, scratch = tmp_path / "files", tmp_path / "cwd", tmp_path / "tmp"
    for d in (files, work, scratch):
        d.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    copyreg.add_extension("collections", "OrderedDict", 0xF0)       # so that EXT1 0xf0 would resolve and be cached
    try:
        glean_io.load_file(ROOT / "tests/data/golden_in16_out64_ckpt.pth")   # warm-up: torch's lazy imports done
        before, listed = snapshot(watched()), files_in(files, work, scratch)
        paths = []
        for name, (make, _) in CRAFTED.items():
            paths.append(files / name)
            paths[-1].write_bytes(make(files))
        listed |= set(paths)
        results = {}
        for path in paths:
            for load in (glean_io.load_file, glean_io.load_pickle, zoo.load_pretrained, zoo.load_bank):
                try:
                    load(path)
                    results[path.name, load.__name__] = "loaded"
                except CheckpointError as e:
                    assert "\n" not in str(e) and str(path) in str(e), e
                    results[path.name, load.__name__] = str(e)
            assert infer.main(["-i", "example:cat", "-o", str(work / "out"), "-m", str(path)]) == 2
        after = snapshot(watched())
    finally:
        copyreg.remove_extension("collections", "OrderedDict", 0xF0)
    assert after == before, [k for k in before if before[k] != after[k]]
    assert files_in(files, work, scratch) == listed | {work / "out"}         # -o is made before the model is read
    assert torch._utils._rebuild_tensor_v2.__name__ == "_rebuild_tensor_v2"
    assert not hasattr(torch._utils._rebuild_tensor_v2, "dump_patches")
    assert "Traceback" not in capsys.readouterr().err
    assert results["patch.pt", "load_file"].endswith("corrupt or truncated checkpoint (the file sets attributes "
                                                     "of a function (refused)); re-download or re-export it")
    assert "'module'" in results["zip_module_record.pt", "load_file"]


@pytest.mark.parametrize("name", ["patch.pt", "patch_cwd.pt"])
def test_the_patch_attack_is_real_against_torchs_own_reader(tmp_path, name):
    """The crafted file above is a working attack where it is not refused: torch.load(weights_only=False) writes
    the .patch file (in a separate process, whose renamed function dies with it)."""
    path = tmp_path / name
    path.write_bytes(CRAFTED[name][0](tmp_path))
    code = f"import torch\ntry:\n    torch.load({str(path)!r}, weights_only=False)\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, check=True, timeout=120)
    assert (tmp_path / "evil.patch").is_file()


def test_placeholders_record_what_they_replace(tmp_path):
    """Objects that are not tensors still load, inert: REDUCE, NEWOBJ and BUILD on them only record data."""
    b, linear = io.BytesIO(), torch.nn.Linear(2, 3)
    torch.save({"x": torch.ones(2), "m": linear, "ns": types.SimpleNamespace(a=1)}, b,
               _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pt").write_bytes(b.getvalue())
    loaded = glean_io.load_file(tmp_path / "legacy.pt")
    assert torch.equal(loaded["x"], torch.ones(2))
    m = loaded["m"]
    assert isinstance(m, glean_io.Placeholder) and m.refused.endswith("Linear")
    assert torch.equal(m.state["_parameters"]["weight"], linear.weight)
    assert loaded["ns"].refused == "types.SimpleNamespace" and loaded["ns"].state == {"a": 1}


# ----------------------------------------------------------------------------------------------------------
# Odd structure: one CheckpointError line each, through every loader


def deep_list(n: int) -> bytes:
    return P2 + pickle.EMPTY_LIST * n + pickle.APPEND * (n - 1) + pickle.STOP


def save(path, obj, **kwargs):
    torch.save(obj, path, **kwargs)
    return path


def one_line_error(load, path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("load", [zoo.load_pretrained, zoo.load_bank])
def test_deep_nesting_is_one_line(tmp_path, load):
    """100000 nested lists (a few hundred bytes) in each format; a JSON config nested as deep in safetensors."""
    from safetensors.torch import save_file
    (tmp_path / "deep.pt").write_bytes(zipped(deep_list(100_000)))
    (tmp_path / "deep_legacy.pt").write_bytes(legacy(deep_list(100_000)))
    (tmp_path / "deep.pkl").write_bytes(deep_list(100_000))
    for name in ("deep.pt", "deep_legacy.pt") + (("deep.pkl",) if load is zoo.load_bank else ()):
        one_line_error(load, tmp_path / name, "nested more than 100 deep")
    deep_json = "[" * 100_000 + "]" * 100_000
    for fmt in ("glean", "stylegan2"):
        save_file({"x": torch.zeros(1)}, tmp_path / f"{fmt}.safetensors", metadata={"format": fmt,
                                                                                  "config": deep_json})
    fmt = "glean" if load is zoo.load_pretrained else "stylegan2"
    one_line_error(load, tmp_path / f"{fmt}.safetensors", "config is not usable .*(recursion|nested too deeply)")
    lst = []
    lst.append(lst)
    (tmp_path / "cycle.pkl").write_bytes(pickle.dumps({"G_ema": lst}))
    if load is zoo.load_bank:
        one_line_error(load, tmp_path / "cycle.pkl", "contains itself")


def test_integer_keys_odd_storages_and_unknown_types_are_one_line(tmp_path):
    for name, obj in [("int.pt", {"format": "glean", "config": {}, "state_dict": {1: torch.zeros(1)}}),
                      ("int_official.pt", {"state_dict": {1: 2, "generator.x": torch.zeros(1)}}),
                      ("int_bank.pt", {"g_ema": {3: torch.zeros(1)}})]:
        save(tmp_path / name, obj)
        load = zoo.load_bank if "bank" in name else zoo.load_pretrained
        one_line_error(load, tmp_path / name, "has a key [13] that is not a name")
    (tmp_path / "module.pt").write_bytes(zipped(P2 + pickle.MARK + text("module") + glob("torch", "Size") + text("a") +
                                                text("b") + pickle.TUPLE + pickle.BINPERSID + pickle.STOP))
    one_line_error(zoo.load_pretrained, tmp_path / "module.pt", "expected 'storage' but got 'module'")
    storage = (pickle.MARK + text("storage") + glob("torch", "QuantumStorage") + text("0") + text("cpu") +
               pickle.BININT1 + b"\x04" + pickle.NONE + pickle.TUPLE + pickle.BINPERSID)
    (tmp_path / "dtype.pt").write_bytes(zipped(P2 + storage + pickle.STOP))
    (tmp_path / "dtype_legacy.pt").write_bytes(legacy(P2 + storage + pickle.STOP))
    for name in ("dtype.pt", "dtype_legacy.pt"):
        one_line_error(zoo.load_pretrained, tmp_path / name, r"unknown type \(torch.QuantumStorage\)")


def test_legacy_storage_sizes_are_checked_before_anything_is_allocated(tmp_path):
    """A legacy file declares each storage's size in its pickle, before the data: a storage larger than the rest of
    the file is refused then (nothing allocated); a file cut short is named, not read past its end."""
    huge = (P2 + pickle.MARK + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu") +
            pickle.LONG1 + b"\x06" + (10 ** 13).to_bytes(6, "little") + pickle.NONE + pickle.TUPLE +
            pickle.BINPERSID + pickle.STOP)
    (tmp_path / "huge.pt").write_bytes(legacy(huge))
    one_line_error(glean_io.load_file, tmp_path / "huge.pt", "a storage of 40000000000000 bytes, more than the file")
    save(tmp_path / "cut.pt", {"w": torch.randn(1000)}, _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:-100])
    one_line_error(glean_io.load_file, tmp_path / "cut.pt", "holds other than its declared 4000 bytes")


def test_legacy_format_is_read_as_torch_writes_it(tmp_path):
    """torch.save's legacy format (rosinality's checkpoints, NVIDIA's storages): every dtype, shared storages and
    views, Parameters, nested containers come back equal, through glean_pickle's own reader."""
    base = torch.randn(6, 4)
    obj = {"f": base, "view": base[2:, 1:3], "t": base.t(), "h": torch.randn(3).half(), "b": torch.randn(3).bfloat16(),
           "i": torch.arange(5), "u8": torch.arange(5, dtype=torch.uint8), "bool": torch.tensor([True, False]),
           "p": torch.nn.Parameter(torch.randn(2)), "nested": {"list": [torch.ones(1), 3, "x"], "n": None},
           "empty": torch.zeros(0, 3), "od": collections.OrderedDict(a=torch.ones(2))}
    save(tmp_path / "legacy.pt", obj, _use_new_zipfile_serialization=False)
    got = glean_io.load_file(tmp_path / "legacy.pt")
    for k in ("f", "view", "t", "h", "b", "i", "u8", "bool", "p", "empty"):
        assert got[k].dtype == obj[k].dtype and torch.equal(got[k], obj[k]), k
    assert got["view"].untyped_storage().data_ptr() == got["f"].untyped_storage().data_ptr()   # still shared
    assert isinstance(got["p"], torch.nn.Parameter) and got["nested"]["list"][1:] == [3, "x"]
    assert isinstance(got["od"], collections.OrderedDict) and torch.equal(got["od"]["a"], torch.ones(2))


def test_tar_format_gets_our_advice(tmp_path):
    import tarfile
    with tarfile.open(tmp_path / "old.pt", "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sys_info")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    e = one_line_error(glean_io.load_file, tmp_path / "old.pt", "old tar format")
    assert "weights_only" not in e and "torch.save(torch.load(file), new_file)" in e


def test_a_file_name_with_a_line_break_stays_one_line(tmp_path, capsys):
    path = tmp_path / "evil\nname\x1b[31m.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        zoo.load_pretrained(path)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "evil\\nname\\x1b[31m.pt" in str(e.value)
    assert infer.main(["-i", "example:cat", "-o", str(tmp_path / "o"), "-m", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil\\nname" in err


def test_odd_tensors_are_named_before_anything_is_built(tmp_path, monkeypatch):
    """A bank file declaring style_channels 8192 with one small tensor is refused from its tensors, without building
    the (2.9 GB) generator; meta, sparse and stride-0 tensors in a model file are named, not used."""
    built = []
    real = stylegan2.Generator.__init__

    def init(self, cfg):
        real(self, cfg)
        built.append(next(self.parameters()).device.type)
    monkeypatch.setattr(stylegan2.Generator, "__init__", init)
    save(tmp_path / "bank.pt", {"format": "stylegan2", "state_dict": {"constant_input.input": torch.zeros(1)},
                                "config": {"out_size": 64, "style_channels": 8192, "num_mlps": 8}})
    one_line_error(zoo.load_bank, tmp_path / "bank.pt", "does not match the model: missing key")
    assert built == ["meta"]
    for bad in ({"num_mlps": 10 ** 9}, {"style_channels": -1}, {"style_channels": True}, {"blur_kernel": "x" * 99}):
        save(tmp_path / "cfg.pt", {"format": "stylegan2", "state_dict": {}, "config": {"out_size": 64, **bad}})
        one_line_error(zoo.load_bank, tmp_path / "cfg.pt", "config is not usable")
    from conftest import tiny_cfg
    import glean
    glean.GLEAN(tiny_cfg()).save(tmp_path / "good.pt")
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    k = "decoder.0.upsample_conv.bias"
    for name, t, match in [("meta", torch.zeros(good["state_dict"][k].shape, device="meta"), "a meta tensor"),
                           ("sparse", good["state_dict"][k].to_sparse(), "a sparse tensor"),
                           ("stride0", torch.zeros(1).expand(good["state_dict"][k].shape), "more values than")]:
        odd = {**good, "state_dict": {**good["state_dict"], k: t}}
        with pytest.raises(CheckpointError, match=f"key '{k}' (is|declares) {match}"):    # as a dict (torch.hub)
            glean.GLEAN.load(odd)
        save(tmp_path / f"{name}.pt", odd)                      # as a file: how torch rebuilds meta and sparse
        one_line_error(zoo.load_pretrained, tmp_path / f"{name}.pt", match if name == "stride0" else  # tensors is
                       "is a Placeholder, not a tensor")                                             # not allowed


def test_the_opcode_builders_make_real_tensors(tmp_path):
    """The crafted files are close to real ones: the same opcodes without the attack load as torch would."""
    (tmp_path / "t.pt").write_bytes(zipped(P2 + tensor() + pickle.STOP))
    assert torch.equal(glean_io.torch_load(tmp_path / "t.pt"), torch.arange(4.0))
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), torch.arange(4.0))
    (tmp_path / "p.pt").write_bytes(CRAFTED["zip_param_state.pt"][0](tmp_path))
    p = glean_io.torch_load(tmp_path / "p.pt")                 # its state is not set: a plain Parameter
    assert type(p) is torch.nn.Parameter and torch.equal(p, torch.arange(4.0)) and not p._backward_hooks
