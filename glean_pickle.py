"""Reading pickled checkpoints from strangers: nothing in the file is run, written or changed.

- `RestrictedUnpickler`: Python's own unpickler (the pure-Python one, so that single opcodes can be refused) that
  resolves only the globals a checkpoint of tensors needs (`ALLOWED`, each a checking wrapper or an immutable type);
  every other global becomes an inert `Placeholder` class, so REDUCE on it records its arguments instead of calling
  anything. BUILD (set an object's attributes) is done only on Placeholders and on OrderedDicts made by the file;
  extension codes (EXT1/2/4, a process-wide registry) are refused.
- `read_legacy(data, source)`: torch.save's format before the zip archive (torch < 1.6, and
  `_use_new_zipfile_serialization=False`, as NVIDIA's .pkl files hold their storages): four pickles, then the raw
  storages. Read with RestrictedUnpickler; declared storage sizes are checked against the bytes there before
  anything is allocated. torch's own reader of this format is never used: it compares a 'module' record's source
  with the installed code and can write a `<name>.patch` file.
- `nesting(obj)`: how deeply a loaded object nests (a crafted file can nest thousands deep, which recursive code,
  repr or json then cannot handle).

Every problem is a `pickle.UnpicklingError` with a one-line message; glean_io turns it into a CheckpointError.
"""
import collections
import io
import pickle

import numpy as np
import torch


class Placeholder:
    """Inert stand-in for an object the restricted unpickler refused to build. Records what it replaced."""

    def __new__(cls, *args, **kwargs):  # REDUCE and NEWOBJ (cls.__new__(cls, *args)) alike
        self = super().__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args, **kwargs):
        pass

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


def placeholder_class(module: str, name: str) -> type:
    return type("Placeholder", (Placeholder,), {"refused": f"{module}.{name}"})


# ----------------------------------------------------------------------------------------------------------
# The globals a checkpoint may name: checking wrappers around torch's rebuild functions, and immutable types


class StorageType:
    """What a storage class name in a checkpoint (torch.FloatStorage, ...) stands for: its element type only."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


STORAGE_TYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                 "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                 "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                 "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
                 "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8}
DTYPES = set(STORAGE_TYPES.values()) | {torch.uint16, torch.uint32, torch.uint64}   # by name, for _rebuild_tensor_v3


def _ints(x, what: str) -> tuple:
    if not isinstance(x, (tuple, list)) or not all(type(v) is int for v in x):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a list of integers")
    return tuple(x)


def _no_hooks(backward_hooks) -> None:
    if backward_hooks:                  # torch never saves hooks (Note [Don't serialize hooks]); a file could
        raise pickle.UnpicklingError("a tensor with backward hooks (code to run)")


def rebuild_tensor(storage, storage_offset, size, stride, dtype=None):
    """torch._utils._rebuild_tensor, after checking its arguments: a storage of this file, integer geometry (the
    storage's bounds are checked by Tensor.set_)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor whose storage is a {type(storage).__name__}")
    if type(storage_offset) is not int:
        raise pickle.UnpicklingError("a tensor whose storage offset is not an integer")
    t = torch.empty((0,), dtype=dtype or storage.dtype)
    return t.set_(storage._untyped_storage, storage_offset, _ints(size, "size"), _ints(stride, "stride"))


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None,
                      dtype=None):
    """torch._utils._rebuild_tensor_v2 after checking (no hooks, known metadata); with dtype: _rebuild_tensor_v3."""
    _no_hooks(backward_hooks)
    t = rebuild_tensor(storage, storage_offset, size, stride, dtype)
    t.requires_grad = bool(requires_grad) and t.is_floating_point()
    if metadata:                        # {'conj': bool, 'neg': bool}: bits of the tensor itself
        if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
            raise pickle.UnpicklingError("a tensor with unknown metadata")
        torch._utils.set_tensor_metadata(t, {k: bool(v) for k, v in metadata.items()})
    return t


def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """torch._utils._rebuild_tensor_v3 (dtypes stored as plain bytes, e.g. uint16), after checking."""
    if dtype not in DTYPES:
        raise pickle.UnpicklingError(f"a tensor of an unknown type ({dtype!r:.40})")
    return rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata, dtype)


def rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch._utils._rebuild_parameter(_with_state), after checking: a tensor of this file. Python attributes some
    libraries set on Parameters (state) are not set: setattr is what this module never does for a file."""
    _no_hooks(backward_hooks)
    if not torch.is_tensor(data):
        raise pickle.UnpicklingError(f"a Parameter of a {type(data).__name__}")
    return torch.nn.Parameter(data, bool(requires_grad) and data.is_floating_point())


def storage_from_bytes(data):
    """Stand-in for torch.storage._load_from_bytes (how a plain pickle of a tensor, e.g. NVIDIA's .pkl, holds its
    storage): the same bytes, a torch.save of one storage in the legacy format, read by read_legacy."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("a storage that is not bytes")
    storage = read_legacy(bytes(data), "storage")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a storage record that holds no storage")
    return storage


ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,       # C types: their attributes cannot be set
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): storage_from_bytes,
} | {("torch", str(d).removeprefix("torch.")): d for d in DTYPES}


# ----------------------------------------------------------------------------------------------------------
# The unpickler


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only the globals in `ALLOWED` (others become Placeholder classes), sets attributes
    only on Placeholders and OrderedDicts it made, and refuses the extension registry. Pure Python: pickle's C
    Unpickler cannot refuse single opcodes. `refused` lists the globals replaced by Placeholders."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, **kwargs):
        super().__init__(file, **{"encoding": "utf-8", **kwargs})        # torch.load's default for old pickles
        self.refused = []

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        if module in ("torch", "torch.storage") and name in STORAGE_TYPES:
            return StorageType(STORAGE_TYPES[name])
        if module == "torch" and name.endswith("Storage"):
            raise pickle.UnpicklingError(f"tensors of an unknown type (torch.{name[:40]})")
        self.refused.append(f"{module}.{name}")
        return placeholder_class(module, name)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            inst.__setstate__(state)
        elif type(inst) is collections.OrderedDict and isinstance(state, dict) and \
                all(isinstance(k, str) and not k.startswith("__") for k in state):
            vars(inst).update(state)                       # e.g. a state_dict's _metadata
        else:
            raise pickle.UnpicklingError(f"the file sets attributes of a {type(inst).__name__} (refused)")
    dispatch[pickle.BUILD[0]] = load_build

    def refuse_extension(self):
        raise pickle.UnpicklingError("the file uses pickle's extension registry (refused)")
    for op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[op[0]] = refuse_extension
    del op


def restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# ----------------------------------------------------------------------------------------------------------
# torch.save's legacy format (no zip)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C      # torch.serialization's
PROTOCOL_VERSION = 1001


class _LegacyUnpickler(RestrictedUnpickler):
    """The legacy format's main pickle: storages are persistent ids ('storage', type, key, location, numel,
    view) allocated here once their size fits in what is left of the file; 'module' records (a class and its
    source, for torch's source check) become Placeholder classes."""

    def __init__(self, file, budget: int):
        super().__init__(file)
        self.budget, self.storages = budget, {}

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id:
            raise pickle.UnpicklingError("a persistent id that is not a tuple")
        if saved_id[0] == "module" and len(saved_id) == 4:
            return saved_id[1] if isinstance(saved_id[1], type) and issubclass(saved_id[1], Placeholder) else \
                placeholder_class("module", type(saved_id[1]).__name__)
        if saved_id[0] != "storage" or len(saved_id) != 6:
            raise pickle.UnpicklingError(f"an unknown persistent id {str(saved_id[0])[:40]!r}")
        _, kind, key, _, numel, view = saved_id
        if not isinstance(kind, StorageType):
            raise pickle.UnpicklingError(f"a storage of unknown type ({kind!r:.60})")
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("a storage with an odd key or size")
        size = kind.dtype.itemsize
        if key not in self.storages:
            if numel * size > self.budget:
                raise pickle.UnpicklingError(f"a storage of {numel * size} bytes, more than the file holds")
            self.budget -= numel * size
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(numel * size),
                                                            dtype=kind.dtype, _internal=True)
        root = self.storages[key]
        if root.dtype != kind.dtype:
            raise pickle.UnpicklingError("one storage declared with two element types")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])
                and 0 <= view[1] and 0 <= view[2] and (view[1] + view[2]) * size <= root._untyped_storage.nbytes()):
            raise pickle.UnpicklingError("a storage view outside its storage")
        return torch.storage.TypedStorage(wrap_storage=root._untyped_storage[view[1] * size:(view[1] + view[2]) *
                                                                              size], dtype=kind.dtype, _internal=True)


def read_legacy(data, source: str):
    """A checkpoint in torch.save's legacy format from `data` (bytes, or an mmap of the file): header pickles
    (magic number, protocol, system info), the object, the storage keys, then each storage as an int64 element
    count and its bytes. Returns the object; its tensors hold the file's values."""
    f = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        magic = RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError):
        magic = None
    if magic != MAGIC_NUMBER:
        raise pickle.UnpicklingError("neither a zip archive nor torch.save's legacy format: not a PyTorch checkpoint")
    protocol, info = RestrictedUnpickler(f).load(), RestrictedUnpickler(f).load()
    if protocol != PROTOCOL_VERSION or not isinstance(info, dict):
        raise pickle.UnpicklingError(f"legacy format, unknown protocol {protocol!r:.20}")
    if info.get("little_endian") is not True:
        raise pickle.UnpicklingError("legacy format saved on a big-endian machine (not supported)")
    main = _LegacyUnpickler(f, budget=len(data) - f.tell())
    obj = main.load()
    keys = RestrictedUnpickler(f).load()
    if not isinstance(keys, list) or set(keys) != set(main.storages):
        raise pickle.UnpicklingError("its list of storages does not match the storages it uses")
    at = f.tell()
    for key in keys:
        storage = main.storages[key]
        count = int.from_bytes(data[at:at + 8], "little", signed=True)
        n = storage._untyped_storage.nbytes()                            # (TypedStorage's own methods warn)
        if count * storage.dtype.itemsize != n or at + 8 + n > len(data):
            raise pickle.UnpicklingError(f"storage {key[:20]} holds other than its declared {n} bytes (truncated?)")
        values = torch.empty(0, dtype=torch.uint8).set_(storage._untyped_storage)          # [n] bytes
        values.numpy()[:] = np.frombuffer(data, np.uint8, n, at + 8)
        at += 8 + n
    return obj


# ----------------------------------------------------------------------------------------------------------
# Nesting

MAX_NESTING = 100   # containers in containers; checkpoints need ~30 (NVIDIA's module trees), Python recursion ~1000


def _children(x):
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return list(x)
    if isinstance(x, Placeholder):
        return [x.args, x.kwargs, x.state, x.items]
    return None                                                          # a leaf: tensor, number, string, ...


def nesting(obj, limit: int = MAX_NESTING) -> int:
    """How many containers deep `obj` goes (a leaf: 0), computed without recursion; refuses (UnpicklingError)
    more than `limit` levels and a container that contains itself."""
    if _children(obj) is None:
        return 0
    height, on_path = {}, {id(obj)}
    stack = [[obj, iter(_children(obj)), 1]]                             # [container, children left, its height]
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            kids = _children(child)
            if kids is None:
                continue
            if id(child) in on_path:
                raise pickle.UnpicklingError("an object that contains itself")
            if id(child) in height:
                frame[2] = max(frame[2], 1 + height[id(child)])
            else:
                stack.append([child, iter(kids), 1])
                on_path.add(id(child))
                break
        else:
            stack.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2]
            if stack:
                stack[-1][2] = max(stack[-1][2], 1 + frame[2])
        if stack and len(stack) - 1 + stack[-1][2] > limit:          # the longest path known through the top
            raise pickle.UnpicklingError(f"containers nested more than {limit} deep")
    return height[id(obj)]
