"""Nightly retraining: which inputs a nightly run refreshes, and what it needs to start.

The nightly runs themselves (one that retrains and records a DVC experiment, one with nothing
to do) run in tests/test_integration.py, on the integration tier's pipeline.
"""

from __future__ import annotations

import pytest

from flows.dag import changing_sources
from flows.pipeline import PreflightError, check_git_checkout


def test_only_changeable_sources_this_host_has_are_refreshed(tmp_path):
    base = {"data": {"source": "digits", "folder": None},
            "weights": {"source": "none", "path": None}}
    assert changing_sources(base) == []
    assert changing_sources({**base, "data": {"source": "cifar10", "folder": None},
                             "weights": {"source": "official", "path": None}}) == []
    (tmp_path / "photos").mkdir()
    (tmp_path / "w.npz").write_bytes(b"")
    mine = {"data": {"source": "imagefolder", "folder": str(tmp_path / "photos")},
            "weights": {"source": "file", "path": str(tmp_path / "w.npz")}}
    assert changing_sources(mine) == ["fetch_data", "fetch_weights"]
    elsewhere = {"data": {"source": "imagefolder", "folder": str(tmp_path / "theirs")},
                 "weights": {"source": "file", "path": str(tmp_path / "theirs.npz")}}
    assert changing_sources(elsewhere) == []  # another host's: DVC restores what it fetched


def test_nightly_needs_a_git_commit(tmp_path):
    with pytest.raises(PreflightError, match="git repository with a commit"):
        check_git_checkout(tmp_path)



@pytest.mark.slow
def test_a_refresh_that_finds_the_same_images_made_nothing_new(tmp_path, repo_root):
    """Each flow run reads a user's image folder again; only when its images changed does the
    refresh count as a stage that ran (else every run would record a new experiment)."""
    import subprocess

    from PIL import Image
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.overrides import apply_overrides
    from flows.pipeline import refresh_sources
    from tasks import environment
    from tests.conftest import BIN, make_clone

    photos = tmp_path / "photos"
    for i in range(4):
        (photos / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i * 60, 0, 0)).save(photos / f"c{i % 2}" / f"{i}.png")
    repo = make_clone(repo_root, tmp_path / "repo", [])
    params = apply_overrides(repo / "params.yaml", ["data.source=imagefolder",
                                                    f"data.folder={photos}"]).model_dump()
    subprocess.run([str(BIN / "dvc"), "repro", "-q", "fetch_data"], cwd=repo, check=True,
                   env=environment.tool_env(), capture_output=True)

    @flow
    def refresh() -> list[tuple[str, bool]]:
        return [(r["stage"], r["ran"]) for r in refresh_sources(str(repo), params)]

    with prefect_test_harness(server_startup_timeout=120):
        assert refresh() == []
        Image.new("RGB", (4, 4), (0, 0, 255)).save(photos / "c0" / "new.png")
        assert refresh() == [("fetch_data", True)]
    assert (repo / "data/raw/c0/new.png").is_file()
