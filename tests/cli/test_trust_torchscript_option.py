"""Every command that loads a checkpoint for inference, describes, converts or exports one takes
``--trust-torchscript`` (the explicit opt-in to ``torch.jit.load``), off by default."""

from __future__ import annotations

from clipforge.cli.main import build_parser, iter_commands

# Commands whose --model (or positional checkpoint) is read through clipforge.load / load_model.
EXPECTED = {("info",), ("convert",), ("export",), ("embed",), ("search",), ("serve",), ("eval", "zeroshot"),
            ("eval", "retrieval"), ("eval", "linear-probe"), ("eval", "fewshot"), ("eval", "robustness"),
            ("eval", "suite"), ("data", "score"), ("data", "dedup"), ("data", "split"), ("train",), ("finetune",)}


def test_trust_torchscript_on_every_model_loading_command():
    commands = dict(iter_commands(build_parser()))
    with_option = {path for path, p in commands.items() if "--trust-torchscript" in p._option_string_actions}
    assert EXPECTED <= with_option, EXPECTED - with_option
    for path in with_option:
        action = commands[path]._option_string_actions["--trust-torchscript"]
        assert action.default is False and "RUNS CODE" in action.help, path
    # The shared model options bring it: every command with --random-init has it too.
    for path, p in commands.items():
        if "--random-init" in p._option_string_actions:
            assert "--trust-torchscript" in p._option_string_actions, path
