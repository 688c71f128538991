"""Stage prepare: seeded stratified train/val/test split (and few-shot subset) as CSV indexes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from bit_core.config import DataConfig, Params
from bit_core.contracts import read_split_marker
from bit_core.errors import DataError
from bit_core.io import atomic_dir, atomic_write_json
from bit_core.splits import (SPLITS, Sample, few_shot, find_unreadable, scan_folder,
                             stratified_split, write_split)
from tasks.common import log, stage_main


def _scan(raw: Path) -> tuple[list[Sample], list[Sample] | None, list[str]]:
    """(samples to split, official test samples or None, classes) of a fetched data root."""
    if read_split_marker(raw) is None:
        samples, classes = scan_folder(raw)
        return samples, None, classes
    train, classes = scan_folder(raw / "train")
    test, test_classes = scan_folder(raw / "test")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(test_classes) - set(index))
    if unknown:
        raise DataError(f"{raw / 'test'} has classes missing from train: {unknown[:5]}")
    train = [Sample(f"train/{s.path}", s.label) for s in train]
    test = [Sample(f"test/{s.path}", index[test_classes[s.label]]) for s in test]
    return train, test, classes


def _check_readable(raw: Path, samples: list[Sample]) -> None:
    bad = find_unreadable(raw, samples)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{len(bad)} unreadable image(s) under {raw}: {shown}; remove or "
                        "replace them")


def prepare(cfg: DataConfig, raw: Path, out: Path) -> dict:
    """Split the images under `raw` into `out/{train,val,test}.csv` plus `out/classes.json`.

    A source with an official test set keeps it (val then comes from train); otherwise a
    seeded stratified split makes all three. Returns the statistics in `out/stats.json`.
    """
    samples, official_test, classes = _scan(raw)
    if not samples:
        raise DataError(f"no images found under {raw}: check the fetch_data stage")
    _check_readable(raw, samples + (official_test or []))
    labels = [s.label for s in samples]
    test_fraction = 0.0 if official_test is not None else cfg.test_fraction
    parts = stratified_split(labels, cfg.val_fraction, test_fraction, cfg.seed)
    if cfg.shots:
        parts["train"] = few_shot(parts["train"], labels, cfg.shots, cfg.seed)
    chosen = {name: [samples[i] for i in parts[name]] for name in SPLITS}
    if official_test is not None:
        chosen["test"] = official_test
    with Image.open(raw / samples[0].path) as first:
        width, height = first.size
    stats = {"classes": len(classes), "image_height": height, "image_width": width,
             "official_test": official_test is not None,
             **{f"{name}_images": len(chosen[name]) for name in SPLITS}}
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            write_split(tmp / f"{name}.csv", chosen[name])
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
