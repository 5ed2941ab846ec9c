"""atomic_io: the one write-beside-then-rename used by the run directory (checkpoint, run_files) and the logit cache."""
from __future__ import annotations

import pytest

from smskd_fast.training.atomic_io import write_atomic, write_bytes_atomic


def test_write_bytes_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "header.json"
    path.write_bytes(b"old")
    write_bytes_atomic(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["header.json"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_removes_the_temporary_and_re_raises(tmp_path, error):
    path = tmp_path / "shard.npy"
    path.write_bytes(b"old")

    def write(handle):
        handle.write(b"half of the new")
        raise error

    with pytest.raises(type(error)) as raised:
        write_atomic(path, write)
    assert raised.value is error
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.npy"]


def test_the_temporary_file_is_in_the_target_folder(tmp_path):
    seen = []
    write_atomic(tmp_path / "a.bin", lambda handle: seen.append(handle.name))
    assert seen == [str(tmp_path / "a.bin.tmp")]
    assert (tmp_path / "a.bin").read_bytes() == b""
