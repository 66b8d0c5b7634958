"""Files written atomically get the mode any other tool would give them: 0666 minus the umask for
new files, the existing mode for replaced ones (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from clipforge.utils import atomic_write_bytes, write_json
from clipforge.utils.io import current_umask


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    write_json(tmp_path / "config.json", {"a": 1})
    atomic_write_bytes(tmp_path / "sub" / "blob.bin", b"x")
    assert _mode(tmp_path / "config.json") == expected
    assert _mode(tmp_path / "sub" / "blob.bin") == expected
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})
    os.chmod(target, 0o640)
    write_json(target, {"v": 2})
    assert _mode(target) == 0o640
    assert target.read_text().strip().endswith("}")


def test_saved_model_is_readable_by_others(tmp_path, umask, micro_vit):
    """The issue's example: final.safetensors of a run folder another user must be able to read."""
    from clipforge.checkpoints import save_model

    umask(0o022)
    save_model(micro_vit, tmp_path / "final.safetensors")
    assert _mode(tmp_path / "final.safetensors") == 0o644
