"""Stage prepare: seeded stratified train/val/test split (and few-shot subset) as CSV indexes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from bit_core.config import DataConfig, Params
from bit_core.errors import DataError
from bit_core.io import atomic_dir, atomic_write_json
from bit_core.splits import (SPLITS, Sample, few_shot_samples, find_unreadable, scan_root,
                             split_root, write_split)
from tasks.common import log, stage_main


def _check_readable(raw: Path, samples: list[Sample]) -> None:
    bad = find_unreadable(raw, samples)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} unreadable image(s) under {raw}: {shown}; remove or "
                        "replace them")


def prepare(cfg: DataConfig, raw: Path, out: Path) -> dict:
    """Split the images under `raw` into `out/{train,val,test}.csv` plus `out/classes.json`.

    The splits a source gives (CIFAR's and ImageNet's official test sets, a folder's own val/ or
    test/) are kept and the others drawn from the rest, seeded and stratified. Returns the
    statistics in `out/stats.json`.
    """
    data = scan_root(raw)
    if not data.pool:
        raise DataError(f"no images found under {raw}: check the fetch_data stage")
    _check_readable(raw, data.samples())
    splits = split_root(data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    if cfg.shots:
        splits["train"] = few_shot_samples(splits["train"], cfg.shots, cfg.seed)
    with Image.open(raw / data.pool[0].path) as first:
        width, height = first.size
    stats = {"classes": len(data.classes), "image_height": height, "image_width": width,
             "official_test": "test" in data.given,
             **{f"{name}_images": len(splits[name]) for name in SPLITS}}
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            write_split(tmp / f"{name}.csv", splits[name])
        (tmp / "classes.json").write_text(json.dumps(data.classes, indent=1) + "\n")
        atomic_write_json(tmp / "stats.json", stats)
    return stats


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", type=Path, required=True, help="class-folder root")
    parser.add_argument("--out", type=Path, required=True, help="directory for the split CSVs")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Split the fetched images."""
    stats = prepare(params.data, args.raw, args.out)
    log.info("split %s into %s", args.raw, stats)


def main(argv=None) -> int:
    return stage_main("prepare", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
