"""TorchScript archives are read without running their code (``checkpoints.torchscript``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.checkpoints import UntrustedTorchScript, read_checkpoint
from clipforge.checkpoints.torchscript import read_torchscript
from clipforge.cli.main import main as cli_main

from conftest import micro_config


class Hostile(torch.nn.Module):
    """A module whose scripted ``__setstate__`` writes a file: ``torch.jit.load`` runs it."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 3))
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t()

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        torch.save(torch.ones(1), state[1])  # the side effect: a file written at load time
        self.w = state[0]
        self.target = state[1]
        self.training = state[2]


class Holder(torch.nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.inner = Hostile(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.proj(x))


class Odd(torch.nn.Module):
    """Layouts a state dict walk must get right: tied weights, a strided view, None bias, buffers
    (persistent or not: TorchScript keeps both), a plain tensor attribute (not in the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4, bias=False)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)])
        self.heads = torch.nn.ModuleDict({"x": torch.nn.Linear(4, 4)})
        self.bn = torch.nn.BatchNorm1d(4)
        self.register_buffer("steps", torch.arange(3))
        self.register_buffer("scratch", torch.ones(3), persistent=False)
        self.plain = torch.zeros(2)
        self.view = torch.nn.Parameter(torch.randn(8, 8)[:, ::2])
        self.tied = torch.nn.Linear(4, 4)
        self.tied2 = torch.nn.Linear(4, 4)
        self.tied2.weight = self.tied.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        for m in self.blocks:
            x = m(x)
        return self.tied2(self.tied(x)) + self.heads["x"](x) + self.plain.sum() + self.scratch.sum()


def _hostile(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.pt"
    torch.jit.script(Holder(str(marker))).save(str(path))
    assert not marker.exists()
    return path, marker


def _assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].stride() == v.stride(), k
        assert torch.equal(got[k], v), k


def test_scripted_setstate_does_not_run(tmp_path, capsys):
    path, marker = _hostile(tmp_path)
    with pytest.raises(UntrustedTorchScript) as e:
        clipforge.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "__setstate__" in msg
    assert "trust_torchscript=True" in msg and "--trust-torchscript" in msg and "clipforge convert" in msg
    assert not marker.exists()
    (tmp_path / "texts.txt").write_text("a dog\na cat\n")
    for argv in (["info", str(path)], ["info", str(path), "--json"],
                 ["embed", "--texts", str(tmp_path / "texts.txt"), "--model", str(path), "--out", str(tmp_path / "emb")]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--trust-torchscript" in err, err
        assert not marker.exists()
    # The archive really is hostile: torch.jit.load runs its __setstate__ ...
    torch.jit.load(str(path))
    assert marker.exists()
    marker.unlink()
    # ... and so does the explicit opt-in, which is torch.jit.load (not a CLIP, so refused after).
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        clipforge.load(path, trust_torchscript=True)
    assert marker.exists()


def test_safe_reader_equals_jit_load_on_a_traced_clipforge_model(tmp_path):
    for kind, size in (("vit", 32), ("resnet", 64)):
        model = clipforge.create_model(micro_config(kind), seed=0).eval()
        traced = torch.jit.trace_module(model, {"encode_image": torch.randn(2, 3, size, size),
                                                "encode_text": clipforge.tokenize(["a dog", "a cat"])},
                                        check_trace=False)
        path = tmp_path / f"{kind}.pt"
        traced.save(str(path))
        ref = torch.jit.load(str(path)).state_dict()
        got = read_torchscript(path)
        _assert_same(ref, got)
        _assert_same(model.state_dict(), got)


def test_safe_reader_equals_jit_load_on_odd_layouts(tmp_path):
    path = tmp_path / "odd.pt"
    torch.jit.script(Odd()).save(str(path))
    ref = torch.jit.load(str(path)).state_dict()
    got = read_torchscript(path)
    _assert_same(ref, got)
    assert "plain" not in got and "a.bias" not in got and "scratch" in got
    assert got["tied.weight"].data_ptr() == got["tied2.weight"].data_ptr()  # one storage, as torch reads it


def test_fp16_archive_reads_and_loads(tmp_path):
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    traced = torch.jit.trace_module(model, {"encode_text": clipforge.tokenize(["a dog"])}, check_trace=False)
    traced.half().save(str(tmp_path / "half.pt"))
    got = read_torchscript(tmp_path / "half.pt")
    _assert_same(torch.jit.load(str(tmp_path / "half.pt")).state_dict(), got)
    assert got["visual.conv1.weight"].dtype == torch.float16


def _rewrite(src: Path, dst: Path, edit, deflate=lambda name: False) -> None:
    """Copy a zip archive, passing each member's bytes through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if deflate(info.filename):
                info.compress_type = zipfile.ZIP_DEFLATED
            if data is not None:
                zout.writestr(info, data)


@pytest.mark.parametrize("case,reason", [
    ("global", "refers to os.system"), ("missing_storage", "data/0 is missing"),
    ("compressed_storage", "data/0 is compressed"),
    ("short_storage", "holds 32 bytes, its tensors need 36"), ("out_of_bounds", "reaches past its storage"),
    ("broadcast", "has more elements than its storage"), ("no_code", "has no source in the archive"),
    ("hidden_setstate", "stored by its own __getstate__")])
def test_tampered_archives_are_refused_in_one_line(tmp_path, case, reason):
    marker = tmp_path / "side_effect"
    path = tmp_path / "m.pt"
    torch.jit.script(Holder(str(marker))).save(str(path))
    bad = tmp_path / "bad.pt"

    def edit(name: str, data: bytes) -> bytes | None:
        if case == "global" and name.endswith("/data.pkl"):  # a pickle global outside the whitelist
            return data.replace(b"collections\nOrderedDict", b"os\nsystem")
        if case == "missing_storage" and "/data/" in name:
            return None
        if case == "short_storage" and name.endswith("/data/0"):
            return data[:-4]
        if case == "out_of_bounds" and name.endswith("/data.pkl"):  # a tensor larger than its storage
            return data.replace(b"(K\x03K\x03t", b"(K\x09K\x03t", 1)
        if case == "broadcast" and name.endswith("/data.pkl"):  # 2^30 x 3 elements over a 9-element storage
            return data.replace(b"(K\x03K\x03t(K\x03K\x01t", b"(J\x00\x00\x00@K\x03t(K\x00K\x01t", 1)
        if case == "no_code" and "/code/" in name and name.endswith(".py"):
            return b"# nothing here\n"
        if case == "hidden_setstate" and "/code/" in name and name.endswith(".py"):
            return data.replace(b"def __setstate__", b"def __unset_tate__")  # state is a tuple all the same
        return data

    _rewrite(path, bad, edit, deflate=lambda name: case == "compressed_storage" and name.endswith("/data/0"))
    with pytest.raises(UntrustedTorchScript) as e:
        read_checkpoint(bad)
    assert "\n" not in str(e.value) and "--trust-torchscript" in str(e.value) and reason in str(e.value)
    assert not marker.exists()


def test_archive_without_buffer_declarations_still_loads(tmp_path):
    """Source without ``__buffers__`` lines: every non-parameter tensor attribute is read (BatchNorm
    statistics included), and the model loads with the same weights."""
    model = clipforge.create_model(micro_config("resnet"), seed=0).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
    traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False)
    traced.save(str(tmp_path / "rn.pt"))

    def edit(name: str, data: bytes) -> bytes:
        if "/code/" in name and name.endswith(".py"):
            return b"\n".join(ln for ln in data.split(b"\n") if b"__buffers__" not in ln)
        return data

    _rewrite(tmp_path / "rn.pt", tmp_path / "old.pt", edit)
    got = clipforge.load_model(tmp_path / "old.pt", config=model.config)
    for k, v in model.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


def test_trust_torchscript_and_convert_are_the_way_out(tmp_path, capsys):
    """An archive the restricted reader refuses (here: a storage stored compressed, which torch
    itself reads) loads with the opt-in, and `convert --trust-torchscript` makes a file that then
    needs no opt-in."""
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    traced = torch.jit.trace_module(model, {"encode_text": clipforge.tokenize(["a dog"])}, check_trace=False)
    traced.save(str(tmp_path / "plain.pt"))
    path = tmp_path / "zipped.pt"
    _rewrite(tmp_path / "plain.pt", path, lambda name, data: data, deflate=lambda name: name.endswith("/data/0"))
    assert cli_main(["info", str(path)]) == 1
    assert "--trust-torchscript" in capsys.readouterr().err
    trusted = clipforge.load_model(path, config=model.config, trust_torchscript=True)
    _assert_same(model.state_dict(), trusted.state_dict())
    out = tmp_path / "converted.safetensors"
    assert cli_main(["convert", str(path), str(out), "--to", "clipforge", "--trust-torchscript"]) == 1  # no config
    capsys.readouterr()
    (tmp_path / "config.json").write_text(model.config.to_json())  # the config beside it, as a release would have
    assert cli_main(["convert", str(path), str(out), "--to", "clipforge", "--trust-torchscript"]) == 0
    capsys.readouterr()
    _assert_same(model.state_dict(), clipforge.load_model(out).state_dict())
    assert cli_main(["info", str(out)]) == 0


def test_train_init_and_finetune_model_take_the_opt_in(tmp_path, capsys):
    """`train --init` and `finetune --model` read a refused archive only with --trust-torchscript."""
    model = clipforge.create_model(micro_config("vit"), seed=0).eval()
    traced = torch.jit.trace_module(model, {"encode_text": clipforge.tokenize(["a dog"])}, check_trace=False)
    traced.save(str(tmp_path / "plain.pt"))
    path = tmp_path / "zipped.pt"
    _rewrite(tmp_path / "plain.pt", path, lambda name, data: data, deflate=lambda name: name.endswith("/data/0"))
    (tmp_path / "config.json").write_text(model.config.to_json())
    train = ["train", "--init", str(path), "--data", "builtin:scenes?n=32&size=32", "--steps", "1", "--batch-size", "8",
             "--no-progress", "--threads", "1", "--device", "cpu"]
    assert cli_main([*train, "--out", str(tmp_path / "t1")]) == 1
    assert "--trust-torchscript" in capsys.readouterr().err
    assert cli_main([*train, "--out", str(tmp_path / "t2"), "--trust-torchscript"]) == 0
    capsys.readouterr()
    finetune = ["finetune", "--model", str(path), "--dataset", "builtin:scenes-seen_colour_shape?n_per_class=4&size=32",
                "--steps", "1", "--batch-size", "8", "--wise-alphas", "0,1", "--shifts", "grayscale", "--no-progress",
                "--threads", "1", "--device", "cpu"]
    assert cli_main([*finetune, "--out", str(tmp_path / "f1")]) == 1
    assert "--trust-torchscript" in capsys.readouterr().err
    assert cli_main([*finetune, "--out", str(tmp_path / "f2"), "--trust-torchscript"]) == 0
