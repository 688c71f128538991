"""Stage fetch_weights: resolve the configured pretrained weights and record what was used."""

from __future__ import annotations

import argparse
from pathlib import Path

from bit_core.config import Params
from bit_core.contracts import WEIGHTS_FILE, WEIGHTS_SOURCE
from bit_core.io import (atomic_dir, atomic_write_json, clone_or_copy, file_digest,
                         link_or_copy)
from bit_core.errors import WeightsError
from bit_core.redact import redact
from bit_core.weights import fetch_official, official_url, verify_npz
from tasks.common import log, stage_main

def fetch_weights(params: Params, out: Path, progress: bool = True) -> dict:
    """Put the weights named by params into `out/weights.npz` (or none) and describe them."""
    cfg, name = params.weights, params.model.name
    record = {"source": cfg.source, "model": name}
    with atomic_dir(out) as tmp:
        if cfg.source != "none":
            if cfg.source == "official":
                src = fetch_official(name, Path(cfg.cache_dir), url=cfg.url, sha256=cfg.sha256,
                                     progress=progress)
                record["url"] = redact(cfg.url or official_url(name))  # logged and kept
                link_or_copy(src, tmp / WEIGHTS_FILE)  # from the download cache
            else:
                src = Path(cfg.path).expanduser()
                verify_npz(src, name)
                record["path"] = str(src)
                clone_or_copy(src, tmp / WEIGHTS_FILE)  # the user's own file: never linked
            record["sha256"] = file_digest(tmp / WEIGHTS_FILE)
            if cfg.sha256 and record["sha256"] != cfg.sha256.lower():
                raise WeightsError(f"{record.get('path') or 'the download'} has SHA-256 "
                                   f"{record['sha256']}, not weights.sha256 {cfg.sha256}: give "
                                   "the right file or digest")
        atomic_write_json(tmp / WEIGHTS_SOURCE, record)
    return record


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory for weights.npz")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Resolve weights: none, the official checkpoint, or a local file."""
    record = fetch_weights(params, args.out)
    log.info("weights: %s", record)


def main(argv=None) -> int:
    return stage_main("fetch_weights", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
