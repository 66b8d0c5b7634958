"""Entry point of the ``clipforge`` command.

Each command group lives in its own module under ``clipforge.cli`` and exposes
``register(subparsers)``, which adds its sub-command(s) and sets ``func`` on the parser to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code. Shared option
types and option sets are in :mod:`clipforge.cli.options`; every leaf command gets
``--log-level`` and ``--debug`` here.

Exit codes: 0 success, 1 bad input found while running (one line ``clipforge CMD: error: ...``),
2 a value refused while parsing (one line naming the option), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Iterator

from .options import ArgumentParser, add_log_option, add_subparsers, configure_logging, missing_extra

# Command-group modules, in the order they appear in --help.
COMMAND_MODULES = ["models", "info", "convert", "demo", "train", "finetune", "eval", "search", "data", "export", "plan", "experiment"]


def iter_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command of the tree as ``(("eval", "zeroshot"), parser)``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        if path:
            yield path, parser
        return
    for action in subs:
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # aliases
                continue
            seen.add(id(sub))
            yield from iter_commands(sub, path + (name,))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="clipforge",
        description="CLIP from scratch: models, checkpoint conversion, training, evaluation and search.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = add_subparsers(parser, dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"clipforge.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"clipforge.cli.{name}":
                continue  # command group not part of this build
            raise
        module.register(sub)
    for _, p in iter_commands(parser):
        if "--log-level" not in p._option_string_actions:
            add_log_option(p)
    return parser


def _error_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e)


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; ``parser`` lets a caller reuse a built parser (tests run hundreds)."""
    parser = parser or build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a value refused (one line already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args)
    command = " ".join(str(v) for v in (args.command, getattr(args, "eval_command", None),
                                        getattr(args, "data_command", None)) if v)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        hint = missing_extra(e)
        if hint is None or getattr(args, "debug", False) or os.environ.get("CLIPFORGE_DEBUG"):
            raise
        print(f"clipforge {command}: error: {hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        # User-facing errors carry a message naming the file/key/shape; no deep traceback.
        if getattr(args, "debug", False) or os.environ.get("CLIPFORGE_DEBUG"):
            raise
        print(f"clipforge {command}: error: {_error_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
