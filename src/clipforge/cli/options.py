"""What every command shares: the parser class (one-line errors, defaults in ``--help``), the
validating argument types, and the option sets of commands that run a model.

One rule for every command: a bad value is refused before any work starts, with one line that
names the option (``clipforge embed: error: argument --batch-size: must be an integer >= 1, got
'0'``), exit code 2 for values argparse refuses and 1 for inputs found bad later. Lists are
comma-separated everywhere (``--ks 1,5,10``); the other spelling is accepted with one rule: a list
option also takes several words or repeats, all joined (``--ks 1 5 10``, ``--ks 1,5 --ks 10``), so a
value never contains a comma: a shard list inside one data spec of a list option uses ``::``.
``--workers`` is always data-loading processes; decoding threads are ``--decode-threads``
(``embed``), torch threads ``--threads``.

Shared options of commands that run a model (``train``, ``demo``, ``eval *``, ``embed``,
``search``, ``serve``, ``data score|dedup|split``):

``--model``        a checkpoint path; an architecture name only with ``--random-init`` (inference)
                   or to train from scratch (``train``/``demo``, where ``--init``/``--pretrained``
                   or a checkpoint path given to ``--model`` starts from weights)
``--device``       auto | cpu | cuda | cuda:N | mps (auto: CUDA, then MPS, else CPU; under torchrun
                   each rank takes cuda:LOCAL_RANK)
``--precision``    open_clip's names (see :mod:`clipforge.precision`); inference casts the weights
``--trust-torchscript``  load a TorchScript archive the restricted reader refuses with
                   ``torch.jit.load`` (runs the archive's code; only for files you trust)
``--batch-size``   items per forward pass
``--workers``      data-loading worker *processes* (only where a loader has them: train, demo)
``--progress/--no-progress``, ``--log-level``
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..device import DEVICE_CHOICES, check_device_spec
from ..precision import INFERENCE_PRECISIONS, TRAIN_PRECISION_CHOICES
from ..tokenizer import DEFAULT_OVERLAP, LONG_TEXT_MODES

LOG_LEVELS = ("debug", "info", "warning", "error")

# Importable name -> the extra that installs it (a missing extra is one line naming it).
# Keep in step with [project.optional-dependencies] in pyproject.toml (tests/cli/test_inputs.py checks it).
EXTRAS = {"faiss": "search", "fastapi": "search", "uvicorn": "search", "multipart": "search",
          "python_multipart": "search", "pyarrow": "search", "starlette": "search", "pydantic": "search",
          "onnx": "onnx", "onnxruntime": "onnx", "fsspec": "remote", "pymilvus": "milvus", "milvus_lite": "milvus", "wandb": "wandb"}


# --- parser ---------------------------------------------------------------------------------------

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option with a real default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "%(default)" in help or "default" in help.lower() or not action.option_strings:
            return help
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or default == []:
            return help
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{help} (default: {'on' if default else 'off'})"
        return f"{help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) that name the option, and shown defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_subparsers(parser: argparse.ArgumentParser, **kwargs: Any) -> Any:
    """``parser.add_subparsers`` whose sub-parsers are :class:`ArgumentParser` too."""
    kwargs.setdefault("parser_class", ArgumentParser)
    return parser.add_subparsers(**kwargs)


# --- value types ----------------------------------------------------------------------------------

def _number(kind: type, lo: float | None, lo_open: bool, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, 1, False, "an integer >= 1")
non_negative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a number > 0")
non_negative_float = _number(float, 0.0, False, "a number >= 0")
any_int = _number(int, None, False, "an integer")
any_float = _number(float, None, False, "a number")


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = any_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1] (thresholds on cosine-like scores may be exactly 0 or 1)."""
    value = any_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def comma_list(item: Callable[[str], Any] = str, *, nonempty: bool = True) -> Callable[[str], list[Any]]:
    """``"1,5,10"`` -> ``[1, 5, 10]`` (each item through ``item``); empty lists refused."""
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in str(text).split(",")]
        if any(p == "" for p in parts[:-1]) or (nonempty and not any(parts)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list (a,b,c), got {text!r}")
        out = []
        for p in (p for p in parts if p):
            try:
                out.append(item(p))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"item {p!r}: {e}") from None
        return out

    parse.__name__ = "comma-separated list"
    return parse


class ListAction(argparse.Action):
    """A list option: comma-separated values, also accepted as several words or a repeated option
    (all joined: ``--shots 1,2,4`` = ``--shots 1 2 4`` = ``--shots 1,2 --shots 4``). Items go through
    ``item``; ``count`` fixes the length. A data spec that is itself a list of shards uses ``::``."""

    def __init__(self, option_strings: Sequence[str], dest: str, item: Callable[[str], Any] = str,
                 count: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", "+")
        kwargs.setdefault("metavar", "A,B")
        super().__init__(option_strings, dest, **kwargs)
        self.item, self.count = item, count

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        words = values if isinstance(values, list) else [values]
        items: list[Any] = []
        for word in words:
            try:
                items.extend(comma_list(self.item)(word))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentError(self, str(e)) from None
        current = getattr(namespace, self.dest, None)
        if isinstance(current, list) and current is not self.default:
            items = current + items
        if self.count is not None and len(items) != self.count:
            raise argparse.ArgumentError(self, f"expected {self.count} comma-separated values, got {len(items)}")
        setattr(namespace, self.dest, items)


def device_spec(text: str) -> str:
    try:
        return check_device_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonempty_str(text: str) -> str:
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def shift_list(text: str) -> str:
    """``--shifts``: ``all`` or known shift names (``name:severity``), checked while parsing so a typo
    is refused before any features are computed."""
    from ..eval.shifts import parse_shifts  # the eval commands that take --shifts import it anyway

    text = nonempty_str(text)
    try:
        parse_shifts(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def existing_file(text: str) -> str:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def existing_dir(text: str) -> str:
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"folder not found: {text}")
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return text


def existing_path(text: str) -> str:
    if not text or not Path(text).exists():
        raise argparse.ArgumentTypeError(f"not found: {text}")
    return text


def _check_creatable(p: Path, text: str) -> None:
    """The nearest existing ancestor of ``p`` must be a writable folder."""
    parent = p.parent if str(p.parent) else Path(".")
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {text}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {parent} is not writable")


def output_dir(text: str) -> str:
    """A folder to write into: may exist (re-runs resume) but must not be a file; creatable."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    p = Path(text)
    if p.exists():
        if not p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is an existing file (expected a folder to write into)")
        if not os.access(p, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write into {text}: folder is not writable")
        return text
    _check_creatable(p, text)
    return text


def output_file(text: str) -> str:
    """A file to (over)write: must not be an existing folder; its folder must be creatable."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing folder (expected a file path)")
    if p.exists():
        if not os.access(p, os.W_OK) or not os.access(p.parent if str(p.parent) else ".", os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot overwrite {text}: not writable")
        return text
    _check_creatable(p, text)
    return text


def output_path(text: str) -> str:
    """A file or folder to write (kind decided by the command, e.g. by suffix): creatable."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must not be empty")
    p = Path(text)
    if p.exists():
        target = p if p.is_dir() else p.parent
        if not os.access(target if str(target) else ".", os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text}: not writable")
        return text
    _check_creatable(p, text)
    return text


def require_nonempty(count: int | None, option: str, value: Any, what: str = "items") -> None:
    """A collection named by ``option`` that turned out empty is an error, not a run over nothing."""
    if count == 0:
        raise ValueError(f"{option} {value}: no {what} found")


# --- option sets ------------------------------------------------------------------------------------

def add_device_option(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--device", type=device_spec, default=default, metavar="DEVICE",
                   help=f"{DEVICE_CHOICES}; auto = CUDA if available, then MPS, else CPU (under torchrun: "
                        f"cuda:LOCAL_RANK)" + ("" if default else " (default auto)"))


def add_precision_option(p: argparse.ArgumentParser, mode: str, default: str | None = "fp32") -> None:
    """``mode='train'``: open_clip's training names; ``'inference'``: weight casts and ``auto``."""
    if mode == "train":
        help = ("open_clip's names and meaning: fp32; bf16/fp16 cast the matmul weights; pure_bf16/pure_fp16 "
                "cast every weight; amp_bf16 (= amp_bfloat16) bfloat16 autocast; amp float16 autocast + grad "
                "scaler (CUDA); auto = amp_bf16 where bf16 pays (this CPU's stored matmul probe, or a CUDA GPU "
                "with bf16), else fp32 (CPU) / amp (GPU). Formerly 'bf16' meant autocast: that is now amp_bf16")
        choices: Sequence[str] = TRAIN_PRECISION_CHOICES
    else:
        help = ("weights cast for inference: fp32 (exact to 1e-4), bf16/fp16 (the matmul weights, as in training; "
                "~1e-2), pure_bf16/pure_fp16 (every weight), "
                "int8 (CPU: dynamic int8 Transformer products, for large collections; more drift than bf16), "
                "auto (a reduced precision only where a measured matmul probe finds it >= 1.3x faster here)")
        choices = INFERENCE_PRECISIONS
    p.add_argument("--precision", choices=choices, default=default, metavar="PRECISION",
                   help=help + f" [{' | '.join(choices)}]" + ("" if default else " (default fp32)"))


def add_progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on stderr")


def add_log_option(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--log-level`` (unset: Python's default, warnings and errors) and ``--debug``."""
    if "--log-level" not in p._option_string_actions:
        p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=default,
                       help="logging level of clipforge's messages" + ("" if default else " (default: warning)"))
    if "--debug" not in p._option_string_actions:
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_trust_torchscript_option(p: argparse.ArgumentParser) -> None:
    """``--trust-torchscript``: the explicit opt-in to ``torch.jit.load`` (which runs archive code)."""
    p.add_argument("--trust-torchscript", action="store_true",
                   help="a TorchScript .pt the restricted reader cannot read is loaded with torch.jit.load, which "
                        "RUNS CODE FROM THE FILE: only for files you trust (better: convert it once with "
                        "clipforge convert SRC DST --to clipforge --trust-torchscript). OpenAI's released "
                        "archives need no opt-in: their tensors are read without running anything")


def add_inference_model_options(p: argparse.ArgumentParser, *, required: bool = True,
                                batch_size: int | None = 64) -> None:
    """The options of a command that loads a model for inference (checkpoint or ``--random-init``)."""
    p.add_argument("--model", required=required, default=None, metavar="CKPT",
                   help="checkpoint path (any format clipforge reads); an architecture name only with --random-init")
    p.add_argument("--random-init", action="store_true",
                   help="--model is an architecture name: use untrained weights (smoke tests; results meaningless)")
    p.add_argument("--seed-init", type=any_int, default=0, help="seed of the --random-init weights")
    add_trust_torchscript_option(p)
    add_device_option(p)
    add_precision_option(p, "inference")
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per forward pass")


def add_long_text_options(p: argparse.ArgumentParser, default: str, what: str = "texts") -> None:
    """``--long-text`` / ``--long-text-overlap``: what happens to text longer than the model's context."""
    p.add_argument("--long-text", choices=LONG_TEXT_MODES, default=default,
                   help=f"{what} longer than the model's context (77 tokens): error (refuse, naming the text and "
                        f"its length), truncate (keep the first 77 tokens; a warning says how many were cut), "
                        f"chunks (embed windows of whole words and average them by length: nothing is lost, "
                        f"one text-tower pass per window)")
    p.add_argument("--long-text-overlap", type=non_negative_int, default=DEFAULT_OVERLAP, metavar="TOKENS",
                   help="--long-text chunks: tokens shared by consecutive windows (at most 37)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:  # type: ignore[override]
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(args: argparse.Namespace) -> None:
    """``--log-level`` for the ``clipforge`` loggers: one stderr handler, the root logger untouched."""
    level = getattr(args, "log_level", None)
    if not level:
        return
    log = logging.getLogger("clipforge")
    log.setLevel(level.upper())
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """``"install clipforge[search]"``-style hint for a missing optional package, if it is one."""
    if getattr(e, "install_hint", None):  # clipforge.families.MissingDependency says it all
        return str(e.install_hint)  # type: ignore[attr-defined]
    root = (e.name or "").split(".")[0]
    extra = EXTRAS.get(root)
    if extra is None:
        return None
    return f"this command needs the optional package {root!r}: pip install 'clipforge[{extra}]'"


def load_model_arg(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, preprocess)`` for ``--model``/``--random-init``/``--device``/``--precision``."""
    import sys

    from ..loading import load_for_inference

    model, preprocess = load_for_inference(args.model, device=args.device, precision=args.precision,
                                           random_init=args.random_init, seed=args.seed_init,
                                           trust_torchscript=getattr(args, "trust_torchscript", False))
    if args.random_init:
        print(f"note: {args.model} with random weights (seed {args.seed_init}): results are meaningless",
              file=sys.stderr)
    if getattr(args, "long_text", None) == "chunks":  # the bound depends on the model's context length
        ctx, overlap = int(model.context_length), args.long_text_overlap
        most = max(ctx - 2, 0) // 2
        if not 0 <= overlap <= most:
            raise ValueError(f"--long-text-overlap {overlap}: must be in 0..{most} tokens (half a window of "
                             f"this model's {ctx}-token context)")
    return model, preprocess


__all__ = [
    "ArgumentParser", "HelpFormatter", "add_subparsers", "positive_int", "non_negative_int", "positive_float",
    "non_negative_float", "any_int", "any_float", "fraction", "unit_interval", "comma_list", "device_spec",
    "nonempty_str", "shift_list", "ListAction", "existing_file", "existing_dir", "existing_path", "output_dir", "output_file", "output_path",
    "require_nonempty", "add_device_option", "add_precision_option", "add_progress_option", "add_log_option",
    "add_inference_model_options", "add_trust_torchscript_option", "add_long_text_options", "configure_logging", "missing_extra", "load_model_arg",
]
