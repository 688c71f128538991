"""Stage prepare: seeded stratified train/val/test split (and few-shot subset) as CSV indexes,
and the data report of what the splits hold."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bit_core.config import DataConfig, Params
from bit_core.datareport import (DataReport, duplicate_groups, held_out_in_train,
                                 inspect_images, write_report)
from bit_core.errors import DataError
from bit_core.io import atomic_dir, atomic_write_json
from bit_core.splits import (SPLITS, DataRoot, few_shot_samples, scan_root, split_root,
                             write_split)
from tasks.common import log, stage_main


def _readable(raw: Path, data: DataRoot, cfg: DataConfig, unreadable: dict[str, str]) -> DataRoot:
    """`data` without the unreadable images when data.unreadable is skip; else refuse them."""
    if not unreadable:
        return data
    shown = ", ".join(list(unreadable)[:5]) + (f" and {len(unreadable) - 5} more"
                                                if len(unreadable) > 5 else "")
    if cfg.unreadable == "refuse":
        raise DataError(f"{len(unreadable)} unreadable image(s) under {raw}: {shown}; remove or "
                        "replace them, or set data.unreadable: skip to leave them out")
    log.warning("left out %d unreadable image(s): %s", len(unreadable), shown)
    return data.without(set(unreadable))


def prepare(cfg: DataConfig, raw: Path, out: Path, report: Path) -> dict:
    """Split the images under `raw` into `out/{train,val,test}.csv` plus `out/classes.json` and
    `out/stats.json`, and write the data report into `report`.

    The splits a source gives (CIFAR's and ImageNet's official test sets, a folder's own val/ or
    test/) are kept and the others drawn from the rest, seeded and stratified. Every image is
    opened once, for the report and the readability check. With data.dedupe, train images whose
    exact content is also a validation or test image are left out of train, before data.shots
    picks its k per class. Returns the statistics in `out/stats.json`.
    """
    data = scan_root(raw)
    if not data.pool:
        raise DataError(f"no images found under {raw}: check the fetch_data stage")
    start = time.perf_counter()
    table = inspect_images(raw, data.samples())
    log.info("opened %d images in %.1f s", len(table.rows) + len(table.unreadable),
             time.perf_counter() - start)
    data = _readable(raw, data, cfg, table.unreadable)
    splits = split_root(data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    groups = duplicate_groups(splits, table)
    leaked = held_out_in_train(groups)
    removed = leaked["val"] | leaked["test"] if cfg.dedupe else set()
    splits["train"] = [s for s in splits["train"] if s.path not in removed]
    if cfg.shots:
        splits["train"] = few_shot_samples(splits["train"], cfg.shots, cfg.seed, data.classes)
    if not splits["train"]:
        raise DataError(f"no training images are left of {raw}: lower data.val_fraction or "
                        "data.test_fraction, or add images")
    if not splits["test"]:
        raise DataError(f"the test split of {raw} is empty: set data.test_fraction above 0 "
                        "(or give a test/ folder), so that evaluate has images to measure")
    untrained = sorted(set(data.classes) - {data.classes[s.label] for s in splits["train"]})
    if untrained:  # unreadable images left out, or data.dedupe, took all of a class's
        more = f" (and {len(untrained) - 1} more)" if len(untrained) > 1 else ""
        raise DataError(f"class {untrained[0]!r}{more} has no training image left of {raw}: "
                        "add readable images of it, or remove its folder")
    metrics = write_report(report, DataReport(data.classes, splits, tuple(data.given), table,
                                              groups, removed, cfg.shots))
    stats = {"classes": len(data.classes), "image_height": metrics.height_median,
             "image_width": metrics.width_median, "official_test": "test" in data.given,
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
    parser.add_argument("--report", type=Path, required=True, help="directory for the data report")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Split the fetched images and report on them."""
    stats = prepare(params.data, args.raw, args.out, args.report)
    log.info("split %s into %s; data report in %s", args.raw, stats, args.report)


def main(argv=None) -> int:
    return stage_main("prepare", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
