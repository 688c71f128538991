"""Nightly retraining: which inputs a nightly run refreshes, and what it needs to start.

The nightly runs themselves (one that retrains and records a DVC experiment, one with nothing
to do) run in tests/test_integration.py, on the integration tier's pipeline.
"""

from __future__ import annotations

import pytest

from flows.dag import changing_sources
from flows.pipeline import PreflightError, check_git_checkout


def test_only_changeable_sources_are_refreshed():
    base = {"data": {"source": "digits"}, "weights": {"source": "none"}}
    assert changing_sources(base) == []
    assert changing_sources({**base, "data": {"source": "cifar10"},
                             "weights": {"source": "official"}}) == []
    assert changing_sources({"data": {"source": "imagefolder"},
                             "weights": {"source": "file"}}) == ["fetch_data", "fetch_weights"]


def test_nightly_needs_a_git_commit(tmp_path):
    with pytest.raises(PreflightError, match="git repository with a commit"):
        check_git_checkout(tmp_path)
