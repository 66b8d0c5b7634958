"""The optional libraries the families are built on, imported when a family model is built, with
one line saying what to install when they are missing (no traceback)."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "pip install 'clipforge[families]'"


class MissingDependency(ModuleNotFoundError):
    """A family model needs a library this environment lacks; the message says which extra
    (``install_hint``: what the CLI prints as its one line)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message, name=name)
        self.install_hint = message


def require(module: str, why: str) -> ModuleType:
    """``import module`` or raise :class:`MissingDependency` in one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # timm imports torchvision at import time: name the missing piece, not only timm.
        missing = getattr(e, "name", None) or module
        raise MissingDependency(f"{why} needs {module!r} ({missing!r} is not importable); "
                                f"install the families extra: {EXTRA}", module) from None
