"""Swapping a module's class for its fast subclass, in place.

A fast class subclasses the plain one, overrides methods only and adds no Parameters or buffers,
so changing the class of the live module keeps its Parameters (optimizers and DDP keep working),
state_dict keys, hooks and ``isinstance`` checks; nothing is copied.
"""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """Give ``module`` the class ``cls`` (a subclass of its class, or a base class of it)."""
    if not (issubclass(cls, type(module)) or issubclass(type(module), cls)):
        raise TypeError(f"cannot swap {type(module).__name__} for {cls.__name__}: not a sub- or base class")
    module.__class__ = cls
    return module
