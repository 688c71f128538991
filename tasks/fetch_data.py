"""Stage fetch_data: materialise the configured data source as class folders under --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from bit_core.config import DataConfig, Params
from bit_core.data import DataError, materialize_digits
from bit_core.io import atomic_dir
from tasks.common import log, stage_main


def fetch(cfg: DataConfig, out: Path) -> int:
    """Write the source's images to `out/<class>/<image>`; return how many (atomic: all or none)."""
    if cfg.source != "digits":
        raise DataError(f"data.source {cfg.source!r} is not available in this version: "
                        "use digits")
    with atomic_dir(out) as tmp:
        return materialize_digits(tmp)


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="class-folder root to write")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Fetch the data set named by params.yaml data.source."""
    count = fetch(params.data, args.out)
    log.info("%d images of %s in %s", count, params.data.source, args.out)


def main(argv=None) -> int:
    return stage_main("fetch_data", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
