"""Checkpoint files in and out, without ever running code from them.

- `load_file(path)`: safetensors, or `torch.load(weights_only=True)`; a file that weights_only refuses (released
  checkpoints may carry arbitrary objects in their `meta`) is read by `RestrictedUnpickler`, which rebuilds tensors
  and plain containers only and replaces every other object by an inert `Placeholder`. It never imports or calls
  anything named in the file.
- `save_file(obj, path)`: plain data (tensors, numbers, strings, dicts), written atomically (temp file + rename,
  with the permissions an ordinary file gets under the umask); `remove_stale_temp(folder)` deletes the hidden
  partial files a killed write leaves behind.
- `download(url, sha256_prefix)`: fetch into the torch.hub cache with a hash check (http(s) or file:// URLs).
"""
import contextlib
import hashlib
import http.client
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import types
import urllib.request
import zipfile
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model. The message says what to do."""


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling


class Placeholder:
    """Inert stand-in for an object the restricted unpickler refused to build. Records what it replaced."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):      # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEM(S) on a dict subclass
        self.items.append((key, value))

    def append(self, value):            # APPEND(S) on a list subclass
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<Placeholder for {type(self).refused}>"


def _placeholder_class(module: str, name: str) -> type:
    return type("Placeholder", (Placeholder,), {"refused": f"{module}.{name}"})


# Globals a checkpoint of tensors needs; everything else becomes a Placeholder.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
} | {("torch", n) for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                            "uint8", "bool")}


def _storage_from_bytes(data: bytes):
    """Stand-in for torch.storage._load_from_bytes, which plain pickles of tensors (e.g. NVIDIA's .pkl files) use:
    the same bytes, read with weights_only=True instead of an unrestricted torch.load."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in `_ALLOWED`; every other global becomes an inert Placeholder class,
    so a REDUCE on it builds a Placeholder instead of calling the named function (e.g. os.system)."""

    refused: list

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        self.refused = getattr(self, "refused", []) + [f"{module}.{name}"]
        return _placeholder_class(module, name)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# what torch.load expects of a pickle module: `Unpickler` and `load`
restricted_pickle = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=_restricted_load,
                                          __name__="glean_io.restricted_pickle")


def _why(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty (e.g. a bare EOFError)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# what reading a damaged or foreign file can raise inside torch.load / pickle: all mean "not a usable checkpoint"
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError,
               AttributeError, UnicodeDecodeError, zipfile.BadZipFile, struct.error)


def _is_torchscript(path) -> bool:
    """A TorchScript archive (torch.jit.save) is a zip like a checkpoint, plus its compiled code and constants."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False                                # torch.load reports the damage


def torch_load(path, map_location="cpu"):
    """torch.load with weights_only=True; if refused for a non-tensor object, load with RestrictedUnpickler.
    A file that is no checkpoint at all is a CheckpointError naming it."""
    mmap = zipfile.is_zipfile(path)  # zip-format files map their tensors instead of reading them into memory
    if mmap and _is_torchscript(path):              # torch.load would warn, then suggest weights_only=False: never
        raise CheckpointError(f"{path} is a TorchScript archive (a compiled model), not a checkpoint of weights: "
                              f"save the model's state_dict() instead")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except _UNREADABLE as e:
        if not (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)):
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_why(e)}); re-download or re-export "
                                  f"it") from e
    try:                                            # objects other than tensors: rebuilt inert, never run
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle,
                          mmap=mmap)
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_why(e)}); re-download or re-export "
                              f"it") from e


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes, e.g. left by a killed copy or a full disk); "
                              f"delete it or restore the file")


def load_pickle(path):
    """A plain pickle file (e.g. NVIDIA stylegan2-ada's network .pkl) through RestrictedUnpickler only: tensors and
    containers are rebuilt, every other object (classes, their embedded source code) becomes a Placeholder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    _check_not_empty(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: not a readable pickle ({_why(e)})") from e


def load_file(path) -> dict:
    """Load a checkpoint as a dict: .safetensors -> {'state_dict': tensors, 'metadata': {str: str}}, else the
    unpickled dict (tensors, containers, Placeholders). Raises CheckpointError with a one-line hint on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the path, or pass a registered model name)")
    _check_not_empty(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {"state_dict": {k: f.get_tensor(k) for k in f.keys()}, "metadata": f.metadata() or {}}
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"{path}: not a valid safetensors file ({e}); re-download or re-export it") from e
    try:
        obj = torch_load(path)
    except CheckpointError:
        raise
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_why(e)}); "
                              f"re-download or re-export it") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def state_dict_of(ckpt: dict, source: str = "checkpoint") -> dict:
    """The tensor dict of a loaded checkpoint: ckpt['state_dict'] when present (release/training layout), else ckpt."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: its 'state_dict' is a {type(sd).__name__}, expected a dict of tensors")
    return sd


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def load_state_strict(module: torch.nn.Module, file_sd: dict, names: dict, source: str) -> None:
    """Load `file_sd` into `module` strictly. `names` maps each module key to its key in the file.

    Any missing, unexpected or mis-shaped key raises CheckpointError naming the key and the expected shape.
    A module built on the meta device takes the file's tensors as its own (no copy, no random init first).
    """
    expected = module.state_dict()
    to_ours = {f: o for o, f in names.items()}
    problems = []
    for ours, theirs in names.items():
        if theirs not in file_sd:
            problems.append(f"missing key '{theirs}' (expected shape {_fmt(expected[ours].shape)})")
        elif not torch.is_tensor(file_sd[theirs]):
            problems.append(f"key '{theirs}' is a {type(file_sd[theirs]).__name__}, not a tensor")
        elif file_sd[theirs].shape != expected[ours].shape:
            problems.append(f"key '{theirs}' has shape {_fmt(file_sd[theirs].shape)}, "
                            f"expected {_fmt(expected[ours].shape)}")
        elif expected[ours].is_floating_point() and not file_sd[theirs].is_floating_point():
            problems.append(f"key '{theirs}' holds {str(file_sd[theirs].dtype).removeprefix('torch.')} values, "
                            f"expected floating point")
        elif file_sd[theirs].is_floating_point() and not torch.isfinite(file_sd[theirs]).all():
            problems.append(f"key '{theirs}' holds NaN or infinite values")
    problems += [f"unexpected key '{k}'" for k in file_sd if k not in to_ours]
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems[:3]) + more +
                              ". Check that the checkpoint and the model configuration belong together.")
    ours_sd = {o: file_sd[f].to(expected[o].dtype) for o, f in names.items()}
    assign = any(t.is_meta for t in expected.values())
    module.load_state_dict(ours_sd, strict=True, assign=assign)


# ----------------------------------------------------------------------------------------------------------
# Writing


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc/self/status), else by
    setting and restoring it (a moment in which another thread creating files would use 0o077)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"   # atomic_write's temporary files: ".<name>.<random>.tmp" beside the target


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; rename it over `path` only if the block succeeds. The file gets the
    permissions of an ordinary new file (0o666 less the umask), not mkstemp's private 0o600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temp(folder, names: str = "*") -> list:
    """Delete the partial files that writes into `folder` killed by SIGKILL or a crash left behind (hidden
    ".<name>.<random>.tmp" files of atomic_write, for targets matching the glob `names`). Call it only where no
    other process is writing to the folder. Returns the removed paths."""
    removed = []
    for p in sorted(Path(folder).glob(f".{names}.*{TEMP_SUFFIX}")):
        if p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def save_file(obj: dict, path) -> None:
    """Save plain data atomically: .safetensors needs {'state_dict': tensors, 'metadata': dict}; else torch.save."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in obj.get("metadata", {}).items()}
        tensors = {k: v.detach().contiguous().cpu() for k, v in obj["state_dict"].items()}
        data = save(tensors, metadata=meta)
        with atomic_write(path) as f:
            f.write(data)
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path) as f:
        f.write(buf.getbuffer())


# ----------------------------------------------------------------------------------------------------------
# Download


def sha256_of(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


DOWNLOAD_TIMEOUT = 30.0   # seconds a download may wait for the server (to connect, or for the next bytes)


def download(url: str, sha256_prefix: str | None = None, *, progress=True, cache_dir=None,
             timeout: float | None = None, tries: int = 2) -> Path:
    """Download `url` into the torch.hub checkpoint cache (or reuse it) and check its sha256 prefix.

    Works with http(s):// and file:// URLs; the file appears only when complete and verified. A server that does
    not answer within `timeout` seconds (DOWNLOAD_TIMEOUT) fails the try; a failed try is repeated once. The error
    names the exact cache path where a copy downloaded by hand can be put.
    """
    cache = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    dst = cache / os.path.basename(url.split("?")[0])
    if dst.is_file():
        if sha256_prefix is None or sha256_of(dst).startswith(sha256_prefix):
            return dst
        dst.unlink()  # a stale or corrupt cached copy: fetch again
    by_hand = f"download it by hand (a browser, curl) and save it as {dst}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the download cache {cache} ({e.strerror or e}); {by_hand}") from e
    for attempt in range(1, tries + 1):
        try:
            _fetch(url, dst, sha256_prefix, progress, DOWNLOAD_TIMEOUT if timeout is None else timeout)
            return dst
        except (OSError, http.client.HTTPException) as e:      # URLError, timeouts and resets are OSErrors
            reason = getattr(e, "reason", None) or e                # URLError wraps the socket's error
            if isinstance(reason, TimeoutError):
                reason = f"no answer within {DOWNLOAD_TIMEOUT if timeout is None else timeout:g} s"
            if attempt == tries:
                raise CheckpointError(f"could not download {url} ({reason}); check the network, or {by_hand}") \
                    from e
            print(f"download of {url} failed ({reason}); trying again", file=sys.stderr)
    raise AssertionError("unreachable")


def _fetch(url: str, dst: Path, sha256_prefix: str | None, progress: bool, timeout: float) -> None:
    """One try: stream url into dst (atomically), hashing as it comes."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as r, atomic_write(dst) as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=None)
        try:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if sha256_prefix and not h.hexdigest().startswith(sha256_prefix):
            raise CheckpointError(f"{url}: the downloaded file's sha256 {h.hexdigest()[:16]}... does not start with "
                                  f"{sha256_prefix} (a changed or damaged file); try again later, or download it by "
                                  f"hand, check its hash and save it as {dst}")
