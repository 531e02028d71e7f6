"""Checkpoint files in and out, without ever running code from them.

- `load_file(path)`: safetensors, or a torch.save file read by glean_pickle's `RestrictedUnpickler`, which rebuilds
  tensors and plain containers only and replaces every other object (released checkpoints may carry arbitrary
  objects in their `meta`) by an inert `Placeholder`; the legacy (non-zip) format through glean_pickle's own
  reader. Loading never imports, calls or writes anything named in the file and changes no attribute of anything
  that exists outside it; every problem is one CheckpointError line (`one_line`).
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
import mmap
import os
import pickle
import re
import struct
import sys
import tempfile
import types
import urllib.request
import zipfile
from pathlib import Path

import torch

import glean_pickle


def one_line(message: str) -> str:
    """A message as one line: line breaks and other control characters (e.g. in a file name) escaped as \\n, \\x1b."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(message))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the model. The message (one line, even
    for a file name with a line break) says what to do."""

    def __init__(self, message: str = ""):
        super().__init__(one_line(message))


# ----------------------------------------------------------------------------------------------------------
# Loading: safetensors; torch's zip format through torch.load with glean_pickle's restricted unpickler; torch's
# legacy format through glean_pickle's own reader. Never torch's own unpickler, never torch's legacy reader.

RestrictedUnpickler, Placeholder = glean_pickle.RestrictedUnpickler, glean_pickle.Placeholder

# what torch.load expects of a pickle module: `Unpickler` and `load`
restricted_pickle = types.SimpleNamespace(Unpickler=RestrictedUnpickler, load=glean_pickle.restricted_load,
                                          __name__="glean_pickle.restricted")


def _why(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty (e.g. a bare EOFError)."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, MemoryError):
        return "it declares more memory than this machine has"
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


# what reading a damaged, foreign or crafted file can raise inside torch.load / pickle: all mean "not a usable
# checkpoint" (AssertionError: torch's checks of a zip's records, e.g. a storage typed 'module')
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError,
               AttributeError, UnicodeDecodeError, zipfile.BadZipFile, struct.error, AssertionError, RecursionError,
               MemoryError, OverflowError, NotImplementedError)


def _is_torchscript(path) -> bool:
    """A TorchScript archive (torch.jit.save) is a zip like a checkpoint, plus its compiled code and constants."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False                                # torch.load reports the damage


def _is_tar(path) -> bool:
    """torch.save's oldest format (before torch 0.4 / 2018) is a tar archive ('ustar' at byte 257)."""
    with open(path, "rb") as f:
        return f.read(512)[257:262] == b"ustar"


def _corrupt(path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt or truncated checkpoint ({_why(e)}); re-download or re-export it")


def torch_load(path, map_location="cpu"):
    """A torch.save file, never running or writing anything: the zip format through torch.load with glean_pickle's
    RestrictedUnpickler (tensors mapped from the file, not read into memory), the legacy format through
    glean_pickle.read_legacy. A file that is no checkpoint at all is a CheckpointError naming it."""
    if not zipfile.is_zipfile(path):
        if _is_tar(path):
            raise CheckpointError(f"{path}: saved in PyTorch's old tar format (before 2018), which is not read "
                                  f"here; convert it where you trust it: torch.save(torch.load(file), new_file)")
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return glean_pickle.read_legacy(data, str(path))
        except _UNREADABLE as e:
            raise _corrupt(path, e) from e
    if _is_torchscript(path):                       # torch.load would warn, then suggest weights_only=False: never
        raise CheckpointError(f"{path} is a TorchScript archive (a compiled model), not a checkpoint of weights: "
                              f"save the model's state_dict() instead")
    try:           # weights_only=False only because our unpickler replaces torch's: it is stricter than weights_only
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle,
                          mmap=True)
    except _UNREADABLE as e:
        raise _corrupt(path, e) from e


def _check_not_empty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes, e.g. left by a killed copy or a full disk); "
                              f"delete it or restore the file")


def _check_nesting(obj, path):
    try:
        glean_pickle.nesting(obj)
    except pickle.UnpicklingError as e:
        raise _corrupt(path, e) from None
    return obj


def load_pickle(path):
    """A plain pickle file (e.g. NVIDIA stylegan2-ada's network .pkl) through RestrictedUnpickler only: tensors and
    containers are rebuilt, every other object (classes, their embedded source code) becomes a Placeholder."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    _check_not_empty(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            obj = RestrictedUnpickler(data).load()
    except _UNREADABLE as e:
        raise CheckpointError(f"{path}: not a readable pickle ({_why(e)})") from e
    return _check_nesting(obj, path)


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
            raise CheckpointError(f"{path}: not a valid safetensors file ({_why(e)}); re-download or re-export "
                                  f"it") from e
    obj = _check_nesting(torch_load(path), path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def state_dict_of(ckpt: dict, source: str = "checkpoint") -> dict:
    """The tensor dict of a loaded checkpoint: ckpt['state_dict'] when present (release/training layout), else ckpt.
    Its keys must be names (a crafted file may use numbers)."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: its 'state_dict' is a {type(sd).__name__}, expected a dict of tensors")
    return named(sd, source)


def named(sd: dict, source: str = "checkpoint") -> dict:
    """sd itself, after checking that its keys are strings (tensor names)."""
    for k in sd:
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: its state dict has a key {k!r:.40} that is not a name; the file is "
                                  f"damaged or edited")
    return sd


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _problem(key: str, t, expected: torch.Tensor) -> str:
    """What is wrong with the file's tensor t under `key` for a parameter like `expected`; '' if nothing."""
    if not torch.is_tensor(t):
        return f"key '{key}' is a {type(t).__name__}, not a tensor"
    if t.layout != torch.strided or t.is_meta:
        return f"key '{key}' is a {'meta' if t.is_meta else 'sparse'} tensor, not one of stored values"
    if t.shape != expected.shape:
        return f"key '{key}' has shape {_fmt(t.shape)}, expected {_fmt(expected.shape)}"
    if t.numel() * t.element_size() > t.untyped_storage().nbytes():       # e.g. one value repeated by stride 0
        return f"key '{key}' declares more values than the file holds for it"
    if expected.is_floating_point() and not t.is_floating_point():
        return f"key '{key}' holds {str(t.dtype).removeprefix('torch.')} values, expected floating point"
    if t.is_floating_point() and not torch.isfinite(t).all():
        return f"key '{key}' holds NaN or infinite values"
    return ""


def check_state(module: torch.nn.Module, file_sd: dict, names: dict, source: str) -> None:
    """Check that `file_sd` fits `module` (which may live on the meta device: only shapes are used). `names` maps
    each module key to its key in the file. Any missing, unexpected, mis-shaped or odd tensor raises CheckpointError
    naming the key and the expected shape."""
    expected = module.state_dict()
    to_ours = {f: o for o, f in names.items()}
    problems = []
    for ours, theirs in names.items():
        if theirs not in file_sd:
            problems.append(f"missing key '{theirs}' (expected shape {_fmt(expected[ours].shape)})")
        else:
            problems.append(_problem(theirs, file_sd[theirs], expected[ours]))
    problems = [p for p in problems if p] + [f"unexpected key '{k}'" for k in file_sd if k not in to_ours]
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems[:3]) + more +
                              ". Check that the checkpoint and the model configuration belong together.")


def load_state_strict(module: torch.nn.Module, file_sd: dict, names: dict, source: str) -> None:
    """Load `file_sd` into `module` strictly, after check_state. `names` maps each module key to its key in the file.
    A module built on the meta device takes the file's tensors as its own (no copy, no random init first)."""
    check_state(module, file_sd, names, source)
    expected = module.state_dict()
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


TEMP_SUFFIX = ".tmp"   # atomic_write's temporary files: ".<name>.<pid>-<random>.tmp" beside the target
KILLED_TEMP = re.compile(r"\.(.+)\.(\d+)-[a-z0-9_]{8}\.tmp")   # the same, as a pattern (mkstemp: 8 characters)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file next to `path`; rename it over `path` only if the block succeeds. The file gets the
    permissions of an ordinary new file (0o666 less the umask), not mkstemp's private 0o600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):            # another user's process; a pid no system has
        return True
    return True


def remove_killed_temp(folder, started: float, targets: tuple = ()) -> list:
    """Delete, under `folder` (recursively), the temporary files atomic_write left when its process was killed:
    only names of its own pattern (".<name>.<pid>-<random>.tmp", with <name> ending in one of `targets` if given),
    last changed before `started` (time.time() when this run began) and written by a process that no longer
    exists, so that concurrent writers into the same folder keep theirs. Returns the removed paths."""
    removed = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            m = KILLED_TEMP.fullmatch(name)
            p = Path(root) / name
            if not m or (targets and not m[1].lower().endswith(targets)) or _alive(int(m[2])):
                continue
            with contextlib.suppress(FileNotFoundError):
                if p.is_file() and not p.is_symlink() and p.stat().st_mtime < started:
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
