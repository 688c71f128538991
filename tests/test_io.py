"""Atomic outputs: nothing half-written, and files with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bit_core.io import atomic_dir, atomic_write_json, atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_umask_mode_not_mkstemps_0600(tmp_path: Path):
    old = os.umask(0o022)
    try:
        assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        assert _mode(tmp_path / "d") == 0o755
    finally:
        os.umask(old)


def test_each_output_follows_the_umask_of_its_time(tmp_path: Path):
    old = os.umask(0o022)
    try:
        assert _mode(atomic_write_text(tmp_path / "first.txt", "x")) == 0o644
        os.umask(0o077)
        assert _mode(atomic_write_text(tmp_path / "second.txt", "x")) == 0o600
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        assert _mode(tmp_path / "d") == 0o700
        os.umask(0o002)
        assert _mode(atomic_write_text(tmp_path / "third.txt", "x")) == 0o664
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporaries(tmp_path: Path):
    target = atomic_write_json(tmp_path / "m.json", {"a": 1})

    class Boom(Exception):
        pass

    def broken(tmp: Path):
        tmp.write_text("half")
        raise Boom

    from bit_core.io import atomic_write

    with pytest.raises(Boom):
        atomic_write(target, broken)
    with pytest.raises(Boom), atomic_dir(tmp_path / "dir") as tmp:
        (tmp / "f").write_text("half")
        raise Boom
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
