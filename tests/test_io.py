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
def test_a_full_disk_is_one_line_naming_the_output_and_the_fix(tmp_path: Path, repo_root,
                                                               monkeypatch, capsys):
    """No space left (/dev/full answers every write so) ends a stage in one line, exit 2, with
    what it was writing removed."""
    import shutil

    from bit_core.io import atomic_dir
    from tasks.common import stage_main

    monkeypatch.setenv("BIT_PARAMS", str(repo_root / "params.yaml"))
    (tmp_path / "photo.png").write_bytes(b"\0" * 100_000)
    out = tmp_path / "out"

    def copy(args, params):
        with atomic_dir(args.out) as tmp:
            (tmp / "first.png").write_bytes(b"fine")
            shutil.copy2(tmp_path / "photo.png", "/dev/full")

    def outputs(parser):
        parser.add_argument("--out", type=Path)

    for run in (copy,):
        assert stage_main("demo", outputs, run, argv=["--out", str(out)]) == 2
        assert capsys.readouterr().err == (
            f"error: demo: No space left on device: writing {out}: free space on that file "
            "system, or move the data, the DVC cache or TMPDIR to a larger one\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    with pytest.raises(IsADirectoryError):  # not the host's: the stage's own traceback
        stage_main("demo", outputs, lambda args, params: open(tmp_path, "rb"), argv=[])


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path: Path, repo_root):
    """torch's own file writer turns a failed write into "unexpected pos"; a checkpoint goes
    through a Python file, so the cause (here a file-size limit, as a full disk would) is
    named. The stage runs in a process of its own, the limit set there."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from bit_core.io import atomic_torch_save\n"
        "from tasks.common import stage_main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "def run(args, params):\n"
        "    atomic_torch_save({'w': torch.zeros(1 << 20)}, args.out / 'checkpoint.pt')\n"
        "sys.exit(stage_main('finetune', lambda p: p.add_argument('--out', type=Path), run,\n"
        "                    ['--out', sys.argv[1]]))\n")
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=repo_root,
                          env={**os.environ, "BIT_PARAMS": str(repo_root / "params.yaml")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: finetune: File too large: writing {tmp_path / 'out'}: a limit "
                           "on file size (the file system's, or `ulimit -f`) is in the way: "
                           "raise it, or write to another file system\n")
    assert list((tmp_path / "out").iterdir()) == []
