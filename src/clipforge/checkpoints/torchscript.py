"""Reading the weights of a TorchScript archive without running it.

``torch.jit.load`` executes the archive's TorchScript (a scripted ``__setstate__`` runs while the
file is read), so a ``.pt`` file from anywhere could print, write files or never return. OpenAI's
released checkpoints are such archives, and all they hold that we need is tensors:

- ``<root>/data.pkl``: the module tree, pickled. Each module is an object of a ``__torch__.*``
  class whose state is a dict of its attributes; tensors point (persistent ids) at storages.
- ``<root>/data/<key>``: one raw storage per record (little-endian by ``<root>/byteorder``).
- ``<root>/code/**.py``: the classes' TorchScript source. Read as text, never run: each class
  line is followed by ``__parameters__ = [...]`` and ``__buffers__ = [...]``, which say which
  tensor attributes ``state_dict()`` holds (a class without a ``__buffers__`` line: every other
  tensor attribute counts as a buffer).

:func:`read_torchscript` unpickles ``data.pkl`` with a whitelist (tensor rebuilding, storage
types, ``OrderedDict``, TorchScript's type tags; every ``__torch__`` class becomes a plain
placeholder) and walks the tree as ``torch.jit.load(path).state_dict()`` would, giving the same
keys and values. Anything it cannot read that way (another global, a module with its own
``__setstate__``, a state that is not a dict) is refused with :class:`UntrustedTorchScript`:
only an explicit ``trust_torchscript=True`` hands the file to ``torch.jit.load``.
"""

from __future__ import annotations

import ast
import math
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Storage classes a TorchScript pickle names -> the dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
# Source text read from one archive at most (OpenAI's ViT-L/14 holds well under 1 MB): a compressed
# code member cannot make the reader inflate gigabytes.
MAX_SOURCE_BYTES = 64 << 20
_CLASS = re.compile(r"class\s+(\w+)\s*\(\s*([\w.]+)\s*\)\s*:")
_SLOTS = re.compile(r"\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")
_SETSTATE = re.compile(r"\s+def\s+__setstate__\s*\(")


class UntrustedTorchScript(ValueError):
    """A TorchScript archive the restricted reader cannot read without running its code."""


@dataclass
class _ClassDecl:
    """What the archive's source declares about one class (read as text, never run)."""

    base: str
    parameters: tuple[str, ...] = ()
    buffers: tuple[str, ...] | None = None  # None: no ``__buffers__`` line (older printers)
    setstate: bool = False


class _Refused(Exception):
    """Internal: why the restricted reader stopped (turned into :class:`UntrustedTorchScript`)."""


class _ScriptObject:
    """Stand-in for an object of a ``__torch__`` class: its name and its pickled state, nothing run."""

    qualname = ""
    state: Any = None  # NEWOBJ makes the object without __init__; BUILD sets the state

    def __init__(self) -> None:  # REDUCE would call this with arguments: refused (TypeError)
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _type_tag(value: Any, _type: str) -> Any:
    return value


def _as_list(value: Any) -> list[Any]:
    return list(value)


class _Unpickler(pickle._Unpickler):  # the Python unpickler: its dispatch table can be narrowed
    """Unpickles ``data.pkl`` allowing only what a module tree of tensors needs."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, archive: "_Archive") -> None:
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return _type_tag
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                       "build_tensorlist"):
            return _as_list
        if (module == "__torch__" or module.startswith("__torch__.")) and not module.startswith("__torch__.torch.classes"):
            return self.archive.placeholder(f"{module}.{name}")
        raise _Refused(f"its pickle refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise _Refused(f"unexpected persistent id {str(pid)[:80]}")
        return self.archive.storage(pid[2], pid[1].dtype, pid[4])

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _ScriptObject):
            raise _Refused(f"its pickle sets the state of a {type(inst).__name__}")
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` with every index checked against the storage."""
    if not isinstance(storage, torch.Tensor) or hooks:
        raise _Refused("a tensor record is not a plain storage view")
    ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    if not ok or not all(type(i) is int and i >= 0 for i in (offset, *size, *stride)):
        raise _Refused(f"a tensor has an invalid layout (size {size}, stride {stride}, offset {offset})")
    if all(s > 0 for s in size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= storage.numel():
            raise _Refused(f"a tensor of size {tuple(size)} reaches past its storage of {storage.numel()} elements")
        # Weights never repeat their storage (stride 0): a tiny record must not become a huge tensor.
        if math.prod(size) > storage.numel():
            raise _Refused(f"a tensor of size {tuple(size)} has more elements than its storage "
                           f"({storage.numel()})")
    return torch.as_strided(storage, size, stride, offset)


class _Archive:
    """The zip, its declared classes and its storages (each read once, on first use)."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self.zf = zf
        roots = {n.split("/", 1)[0] for n in zf.namelist()}
        if len(roots) != 1:
            raise _Refused("its entries do not share one root folder")
        self.root = roots.pop()
        names = set(zf.namelist())
        if f"{self.root}/data.pkl" not in names:
            raise _Refused("it has no data.pkl (an old TorchScript format)")
        self.stored(f"{self.root}/data.pkl")
        order = f"{self.root}/byteorder"
        if order in names and zf.read(order).strip() != sys.byteorder.encode():
            raise _Refused(f"its byte order is {zf.read(order).strip().decode(errors='replace')!r}")
        self.classes = self._declarations(names)
        self.placeholders: dict[str, type[_ScriptObject]] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def _declarations(self, names: set[str]) -> dict[str, _ClassDecl]:
        code = f"{self.root}/code/"
        classes: dict[str, _ClassDecl] = {}
        budget = MAX_SOURCE_BYTES
        for name in sorted(n for n in names if n.startswith(code) and n.endswith(".py")):
            module = name[len(code):-3].replace("/", ".")
            current: _ClassDecl | None = None
            with self.zf.open(name) as f:
                text = f.read(budget + 1)
            budget -= len(text)
            if budget < 0:
                raise _Refused(f"its source is larger than {MAX_SOURCE_BYTES >> 20} MB")
            for line in text.decode("utf-8", errors="replace").splitlines():
                if m := _CLASS.match(line):
                    current = classes.setdefault(f"{module}.{m.group(1)}", _ClassDecl(m.group(2)))
                elif current is not None and (m := _SLOTS.match(line)):
                    try:
                        value = ast.literal_eval(m.group(2))
                    except (ValueError, SyntaxError):
                        raise _Refused(f"{name}: unreadable {m.group(1)}") from None
                    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                        raise _Refused(f"{name}: {m.group(1)} is not a list of names")
                    if m.group(1) == "__parameters__":
                        current.parameters = tuple(value)
                    else:
                        current.buffers = tuple(value)
                elif current is not None and _SETSTATE.match(line):
                    current.setstate = True
        return classes

    def placeholder(self, qualname: str) -> type[_ScriptObject]:
        if qualname not in self.classes:
            raise _Refused(f"class {qualname} has no source in the archive")
        if qualname not in self.placeholders:
            self.placeholders[qualname] = type("ScriptObject", (_ScriptObject,), {"qualname": qualname})
        return self.placeholders[qualname]

    def stored(self, name: str) -> zipfile.ZipInfo:
        """The member ``name``, which must be stored uncompressed (as torch writes tensors and
        ``data.pkl``): its size is then bytes on disk, never a decompression bomb."""
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise _Refused(f"{name.split('/', 1)[-1]} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"{name.split('/', 1)[-1]} is compressed (torch stores it uncompressed)")
        return info

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key in self.storages:
            if self.storages[key].dtype != dtype:
                raise _Refused(f"storage data/{key} is read as two dtypes")
            return self.storages[key]
        if "/" in key or key in ("", ".", ".."):
            raise _Refused(f"storage key {key!r} is not a record name")
        info = self.stored(f"{self.root}/data/{key}")
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if numel < 0 or info.file_size != nbytes:
            raise _Refused(f"storage data/{key} holds {info.file_size} bytes, its tensors need {nbytes}")
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        with self.zf.open(info) as f:
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise _Refused(f"storage data/{key} is truncated")
                got += n
        t = torch.frombuffer(buf, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        self.storages[key] = t
        return t


def _state_dict(archive: _Archive, root: Any) -> dict[str, torch.Tensor]:
    """Walk the module tree as ``ScriptModule.state_dict()`` does: parameters, buffers, children."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def is_module(obj: Any) -> bool:
        return isinstance(obj, _ScriptObject) and archive.classes[obj.qualname].base == "Module"

    def walk(obj: _ScriptObject, prefix: str) -> None:
        if id(obj) in seen:
            raise _Refused(f"module {prefix.rstrip('.') or 'root'} appears twice in the tree")
        seen.add(id(obj))
        decl = archive.classes[obj.qualname]
        if decl.setstate:
            raise _Refused(f"its class {obj.qualname} defines __setstate__ (code that runs when it is loaded)")
        if not isinstance(obj.state, dict):
            raise _Refused(f"module {obj.qualname} is stored by its own __getstate__")
        buffers = decl.buffers
        if buffers is None:  # not declared: every other tensor attribute (converters drop non-weights)
            buffers = tuple(k for k, v in obj.state.items() if isinstance(v, torch.Tensor) and k not in decl.parameters)
        for kind in (decl.parameters, buffers):
            for name in kind:
                if name not in obj.state:
                    raise _Refused(f"{prefix}{name} is declared but not stored")
                value = obj.state[name]
                if value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise _Refused(f"{prefix}{name} is not a tensor")
                out[prefix + name] = value
        for name, value in obj.state.items():
            if is_module(value):
                walk(value, f"{prefix}{name}.")

    if not is_module(root):
        raise _Refused("its data.pkl does not hold a module")
    walk(root, "")
    return out


def read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (``torch.jit.load(path).state_dict()``'s keys and
    values), read without running any of its code; :class:`UntrustedTorchScript` when it cannot be."""
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(zf)
            with zf.open(f"{archive.root}/data.pkl") as f:
                root = _Unpickler(f, archive).load()
            return _state_dict(archive, root)
    except _Refused as e:
        reason = str(e)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError, RuntimeError, UnicodeDecodeError) as e:
        reason = f"{type(e).__name__}: {e}"[:200]
    raise UntrustedTorchScript(
        f"{path}: TorchScript archive the restricted reader cannot read without running its code "
        f"({reason}); if you trust this file, load it with trust_torchscript=True (CLI: --trust-torchscript), "
        f"or convert it once: clipforge convert {path} model.safetensors --to clipforge --trust-torchscript")


def load_trusted(path: Path) -> dict[str, torch.Tensor]:
    """``torch.jit.load(path).state_dict()``: runs the archive's code; only on an explicit opt-in."""
    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception as e:  # TorchScript raises its own error types
        raise ValueError(f"cannot read TorchScript archive {path}: {e}") from None


__all__ = ["read_torchscript", "load_trusted", "UntrustedTorchScript", "STORAGE_DTYPES"]
