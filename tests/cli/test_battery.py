"""Every sub-command, discovered from the argparse tree, gets the same battery of bad values: each
is refused with exit code != 0 and ONE line on stderr that names the option, never a traceback.

New commands and options are covered automatically: the probes are chosen by the option's
validating type (positive int, output folder, existing file, ...), and a meta-test refuses raw
``type=int``/``type=float`` options, which would let ``0`` and ``-1`` through.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from clipforge.cli import options as o
from clipforge.cli.main import build_parser, iter_commands, main

PARSER = build_parser()
COMMANDS = list(iter_commands(PARSER))
UNWRITABLE = Path("/proc/sys/clipforge-test/out")  # EROFS even for root
CAN_TEST_UNWRITABLE = Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK)


def _ids(cmds):
    return [" ".join(path) for path, _ in cmds]


def _bad_values(action: argparse.Action, tmp: Path) -> list[str]:
    """Values this option must refuse, chosen by its validating type."""
    a_file, a_dir, missing = tmp / "file.txt", tmp / "folder", tmp / "missing" / "nothing"
    t = action.type
    if isinstance(action, o.ListAction):
        bad = ["1,,2"]
        if action.item in (o.positive_int, o.non_negative_int):
            bad += ["-1", "x"] + (["0"] if action.item is o.positive_int else [])
        if action.item is o.existing_file:
            bad += [str(missing)]
        return bad
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return ["no-such-choice"]
    table = {
        o.positive_int: ["0", "-1", "x", "1.5"],
        o.non_negative_int: ["-1", "x"],
        o.any_int: ["x", "1.5"],
        o.positive_float: ["0", "-1", "nan", "x"],
        o.non_negative_float: ["-0.5", "inf"],
        o.any_float: ["x", "nan"],
        o.fraction: ["0", "1", "1.5"],
        o.unit_interval: ["-0.1", "1.1"],
        o.device_spec: ["gpu", "cuda:x"],
        o.nonempty_str: [" "],
        o.existing_file: [str(missing), str(a_dir)],
        o.existing_dir: [str(missing), str(a_file)],
        o.existing_path: [str(missing)],
        o.output_dir: [str(a_file), str(a_file / "sub")] + ([str(UNWRITABLE)] if CAN_TEST_UNWRITABLE else []),
        o.output_file: [str(a_dir)] + ([str(UNWRITABLE)] if CAN_TEST_UNWRITABLE else []),
        o.output_path: [str(a_file / "sub")] + ([str(UNWRITABLE)] if CAN_TEST_UNWRITABLE else []),
    }
    if t in table:
        return table[t]
    name = getattr(t, "__name__", "")
    if name == "memory_size":
        return ["lots", "0", "-1G"]
    if name == "_c_value":
        return ["0", "x"]
    if name == "_variant":
        return ["novalue", "=spec"]
    return []


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "file.txt").write_text("hello\n")
    (tmp_path / "folder").mkdir()
    return tmp_path


def test_every_command_is_discovered():
    names = set(_ids(COMMANDS))
    # the ones the issue names, so a broken discovery cannot pass by finding nothing
    assert {"train", "demo", "embed", "index", "search", "serve", "eval zeroshot", "eval suite", "data score",
            "data dedup", "convert", "export", "models"} <= names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=_ids(COMMANDS))
def test_no_unvalidated_numbers_and_all_options_documented(path, parser):
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        assert a.help, f"{' '.join(path)} {a.option_strings or a.dest}: no help text"
        assert a.type not in (int, float), \
            f"{' '.join(path)} {a.option_strings}: raw {a.type.__name__} accepts 0 and negatives; use cli.options types"


@pytest.mark.parametrize("path,parser", COMMANDS, ids=_ids(COMMANDS))
def test_defaults_are_shown_in_help(path, parser):
    fmt = parser._get_formatter()
    for a in parser._actions:
        if not a.option_strings or a.default in (None, False, [], argparse.SUPPRESS) or a.help == argparse.SUPPRESS:
            continue
        text = fmt._get_help_string(a) % {"default": a.default, "prog": parser.prog}
        assert "default" in text.lower(), f"{' '.join(path)} {a.option_strings[0]}: default not shown"
    assert "default" in parser.format_help()


@pytest.mark.parametrize("path,parser", COMMANDS, ids=_ids(COMMANDS))
def test_bad_values_give_one_line_naming_the_option(path, parser, paths, capsys):
    probed = 0
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS and not a.option_strings:
            continue
        option = max(a.option_strings, key=len)
        for bad in _bad_values(a, paths):
            code = main([*path, option, bad], parser=PARSER)
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            where = f"{' '.join(path)} {option} {bad!r}"
            assert code != 0, f"{where}: accepted"
            assert "Traceback" not in err, f"{where}: traceback\n{err}"
            assert len(lines) == 1, f"{where}: expected one line, got\n{err}"
            assert any(s in lines[0] for s in a.option_strings), f"{where}: option not named: {lines[0]}"
            probed += 1
    assert probed >= 1, f"{' '.join(path)}: no option was probed"


def test_list_options_accept_commas_and_words():
    ns = PARSER.parse_args(["eval", "retrieval", "--model", "m", "--dataset", "d", "--ks", "1,5", "10"])
    assert ns.ks == [1, 5, 10]
    ns = PARSER.parse_args(["eval", "retrieval", "--model", "m", "--dataset", "d"])
    assert ns.ks == [1, 5, 10]
    ns = PARSER.parse_args(["train", "--betas", "0.9,0.95"])
    assert ns.betas == [0.9, 0.95]
    ns = PARSER.parse_args(["train", "--betas", "0.9", "0.95"])  # the old space-separated form
    assert ns.betas == [0.9, 0.95]
    ns = PARSER.parse_args(["eval", "fewshot", "--model", "m", "--shots", "1,2", "--shots", "4"])
    assert ns.shots == [1, 2, 4]


def test_shared_model_options_everywhere():
    """Every command that runs a model takes --device (default auto) and --precision."""
    runs_model = {"train", "demo", "embed", "search", "serve", "data score", "data dedup", "data split"} | \
        {n for n in _ids(COMMANDS) if n.startswith("eval ")}
    for path, parser in COMMANDS:
        name = " ".join(path)
        if name not in runs_model:
            continue
        opts = parser._option_string_actions
        assert "--device" in opts and "--precision" in opts, name
        assert opts["--device"].default in ("auto", None), name  # train: None = TrainConfig's "auto"
        if name != "train":
            assert opts["--device"].default == "auto", name
        if "--progress" in opts:
            assert "--no-progress" in opts, name
