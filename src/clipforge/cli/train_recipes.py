"""The ``clipforge train`` flags of the training recipes (docs/recipes.md), open_clip_train's
names where it has one; each sets the TrainConfig field of the same name."""

from __future__ import annotations

import argparse
from typing import Any

from .options import non_negative_float


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training recipes (docs/recipes.md)")
    g.add_argument("--force-patch-dropout", "--patch-dropout", dest="patch_dropout", type=non_negative_float,
                   metavar="P", help="drop this fraction of each training image's patch tokens (FLIP; ViT only; "
                                     "off at eval; default 0)")


def _bool_flag(g: Any, name: str, help: str, dest: str | None = None) -> None:
    kw = {"dest": dest} if dest else {}
    g.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help, **kw)
