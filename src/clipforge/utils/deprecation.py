"""Public names that moved: the old spelling keeps working and warns once per process."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_warned: set[str] = set()


def moved(old: str, module: str, name: str) -> Any:
    """``module.name`` (imported when first asked for), with one ``DeprecationWarning`` saying
    ``old`` is now spelled ``module.name``. Imported by name so that a lower layer can keep an old
    alias to a name now owned by a higher one without depending on it."""
    if old not in _warned:
        _warned.add(old)
        warnings.warn(f"{old} is deprecated; use {module}.{name}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(module), name)


__all__ = ["moved"]
