"""Pickled data read without running code: an unpickler that builds only the types a data file needs and
refuses every other global in one line (a pickle names a callable and its arguments, so an unchecked load
of a crafted file runs whatever it names).

Two readers use it: :func:`load_npy` (``.npy`` files of Python objects: image-level labels) and
:func:`torchscript_tensors` (the tensors of a TorchScript archive such as OpenAI's CLIP ``.pt`` files,
read from its pickled attributes without loading, compiling or running its code).
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import WeakclipError

# numpy's own pickling of arrays, dtypes and scalars (``numpy.core`` before numpy 2, ``numpy._core`` since).
_NUMPY = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype")}
_WHAT_NPY = "dicts, lists, strings, numbers and numpy arrays"


class RefusedGlobal(Exception):
    """A pickle named a global outside the allowed set."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, find: Callable[[str, str], object], persistent: Callable | None = None):
        super().__init__(io.BytesIO(data))
        self._find = find
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> object:
        return self._find(module, name)

    def persistent_load(self, pid: object) -> object:
        if self._persistent is None:
            raise RefusedGlobal("a persistent reference")
        return self._persistent(pid)


def _global(module: str, name: str) -> object:
    return getattr(importlib.import_module(module), name)


def _numpy_only(module: str, name: str) -> object:
    if (module, name) in _NUMPY:
        return _global(module, name)
    raise RefusedGlobal(f"{module}.{name}")


def load_npy(path: Path) -> object:
    """The object in a ``.npy`` file: a plain array, or for an object array (a pickle) its content built
    from dicts, lists, strings, numbers and numpy arrays only; anything else is refused in one line
    naming the file and the type, before anything is built."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            data = f.read()
    except (OSError, ValueError) as exc:
        raise WeakclipError(f"{path}: not a readable .npy file ({exc})") from None
    try:
        array = _Unpickler(data, _numpy_only).load()
    except RefusedGlobal as exc:
        raise WeakclipError(f"{path}: refused: its pickle names {exc}, which would run code; a labels .npy may "
                            f"hold only {_WHAT_NPY}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt pickle raises many types
        raise WeakclipError(f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise WeakclipError(f"{path}: not a readable .npy file (the pickle is not the array its header describes)")
    return array


# What a TorchScript pickle names besides its own classes: the tensor rebuild, ordered dicts, and the
# helpers that return their argument as it is (list type tags).
_TORCHSCRIPT = {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")} | {
    ("torch.jit._pickle", n) for n in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                                        "restore_type_tag")}


class _ScriptObject:
    """Stands for a TorchScript class instance (``__torch__.*``): keeps its attributes, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


# The typed storages a TorchScript pickle names (``torch.FloatStorage``, ...) and their element types.
_STORAGES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
             "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
             "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
             "BoolStorage": torch.bool}


def torchscript_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a TorchScript archive's module attributes, by dotted attribute path
    (``visual.conv1.weight``), read from its ``data.pkl`` without loading its code; refused in one line
    when the pickle names anything but TorchScript classes, tensors and storages."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise WeakclipError(f"{path}: not a TorchScript archive (no <name>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        data = zf.read(pkl[0])
        classes: dict[str, type] = {}

        def find(module: str, name: str) -> object:
            if module.startswith("__torch__.") or module == "__torch__":
                return classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {}))
            if (module, name) in _TORCHSCRIPT:
                return _global(module, name)
            if module == "torch" and name in _STORAGES:
                return name
            raise RefusedGlobal(f"{module}.{name}")

        def persistent(pid: object) -> object:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], str)):
                raise RefusedGlobal(f"the persistent reference {pid!r}")
            _, storage_name, key, _, numel = pid
            dtype = _STORAGES.get(storage_name)
            raw = zf.read(f"{prefix}data/{key}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)

        try:
            root = _Unpickler(data, find, persistent).load()
        except RefusedGlobal as exc:
            raise WeakclipError(f"{path}: refused: its pickle names {exc}, which would run code; a TorchScript "
                                f"CLIP archive holds only modules and tensors") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt archive raises many types
            raise WeakclipError(f"{path}: cannot read TorchScript CLIP archive ({type(exc).__name__}: {exc})") from None
    out: dict[str, Tensor] = {}

    def walk(obj: object, prefix: str) -> None:
        if isinstance(obj, Tensor):
            out[prefix[:-1]] = obj
        elif isinstance(obj, _ScriptObject) and isinstance(getattr(obj, "state", None), dict):
            for key, value in obj.state.items():
                walk(value, f"{prefix}{key}.")

    walk(root, "")
    return out
