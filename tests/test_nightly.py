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
