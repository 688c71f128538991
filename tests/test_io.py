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


def test_a_stage_stopped_by_sigterm_removes_what_it_was_writing(tmp_path: Path, repo_root):
    """SIGTERM (how a flow or a scheduler stops a stage) ends a stage as Ctrl-C does: one line,
    exit 143, and the half-written output's temporary folder removed, not left beside it."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bit_core.io import atomic_dir\n"
        "from tasks.common import stage_main\n"
        "def run(args, params):\n"
        "    with atomic_dir(args.out) as tmp:\n"
        "        (tmp / 'half.txt').write_text('half')\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(120)\n"
        "sys.exit(stage_main('demo', lambda p: p.add_argument('--out', type=Path), run,\n"
        "                    ['--out', sys.argv[1]]))\n")
    work = tmp_path / "work"
    work.mkdir()
    stage = subprocess.Popen([sys.executable, "-c", script, str(work / "out")], cwd=repo_root,
                             env={**os.environ, "BIT_PARAMS": str(repo_root / "params.yaml")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stage.stdout.readline() == "writing\n"
        stage.send_signal(signal.SIGTERM)
        _, err = stage.communicate(timeout=30)
    finally:
        stage.kill()
        stage.wait()
    assert stage.returncode == 143
    assert err == "error: demo: stopped by SIGTERM; nothing half-written is left: run it again\n"
    assert list(work.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_naming_the_file_and_the_fix(tmp_path: Path, repo_root,
                                                              monkeypatch, capsys):
    """No space left (/dev/full answers every write so) ends a stage in one line, exit 2, with
    what it was writing removed."""
    import errno

    from bit_core.io import atomic_dir
    from tasks.common import host_error, stage_main

    monkeypatch.setenv("BIT_PARAMS", str(repo_root / "params.yaml"))

    def run(args, params):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "first.png").write_bytes(b"fine")
            with open("/dev/full", "wb") as full:
                full.write(b"\0" * 65536)

    assert stage_main("fetch_data", lambda parser: None, run, argv=[]) == 2
    assert capsys.readouterr().err == (
        "error: fetch_data: No space left on device: free space on that file system, or move the "
        "data, the DVC cache or TMPDIR to a larger one\n")
    assert list(tmp_path.iterdir()) == []
    copying = OSError(errno.ENOSPC, "No space left on device", "/photos/a.png", None,
                      "data/.raw.x/a.png")  # as shutil's copy of one file to another says it
    assert host_error(copying).startswith("No space left on device: /photos/a.png -> "
                                          "data/.raw.x/a.png: free space on that file system")
    with pytest.raises(IsADirectoryError):  # not the host's: the stage's own traceback
        stage_main("fetch_data", lambda parser: None,
                   lambda args, params: open(tmp_path, "rb"), argv=[])
