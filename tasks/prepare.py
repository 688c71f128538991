"""Stage prepare: seeded stratified train/val/test split (and few-shot subset) as CSV indexes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from bit_core.config import DataConfig, Params
from bit_core.data import (SPLITS, DataError, find_unreadable, few_shot, scan_folder,
                           stratified_split, write_split)
from bit_core.io import atomic_dir, atomic_write_json
from tasks.common import log, stage_main


def prepare(cfg: DataConfig, raw: Path, out: Path) -> dict:
    """Split the images under `raw` into `out/{train,val,test}.csv` plus `out/classes.json`.

    Returns the statistics written to `out/stats.json`.
    """
    samples, classes = scan_folder(raw)
    if not samples:
        raise DataError(f"no images found under {raw}: check the fetch_data stage")
    bad = find_unreadable(raw, samples)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} unreadable image(s) under {raw}: {shown}; remove or "
                        "replace them")
    parts = stratified_split([s.label for s in samples], cfg.val_fraction, cfg.test_fraction,
                             cfg.seed)
    if cfg.shots:
        parts["train"] = few_shot(parts["train"], [s.label for s in samples], cfg.shots, cfg.seed)
    with Image.open(raw / samples[0].path) as first:
        width, height = first.size
    stats = {"classes": len(classes), "image_height": height, "image_width": width,
             **{f"{name}_images": int(len(parts[name])) for name in SPLITS}}
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            write_split(tmp / f"{name}.csv", [samples[i] for i in parts[name]])
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
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
