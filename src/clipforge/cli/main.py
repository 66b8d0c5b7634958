"""Entry point of the ``clipforge`` command.

Each command group lives in its own module under ``clipforge.cli`` and exposes
``register(subparsers)``, which adds its sub-command(s) and sets ``func`` on the parser to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Command-group modules, in the order they appear in --help.
COMMAND_MODULES = ["models", "convert", "demo", "train", "eval", "search", "data", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="CLIP from scratch: models, checkpoint conversion, training, evaluation and search.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"clipforge.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"clipforge.cli.{name}":
                continue  # command group not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        # User-facing errors carry a message naming the file/key/shape; no deep traceback.
        if getattr(args, "debug", False) or __import__("os").environ.get("CLIPFORGE_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"clipforge {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
