"""Stage fetch_data: materialise the configured data source as class folders under --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from bit_core.archives import DEFAULT_CACHE
from bit_core.config import DataConfig, Params
from bit_core.errors import DataError
from bit_core.io import atomic_dir
from bit_core.cifar import CIFAR, materialize_cifar
from bit_core.flowers import materialize_flowers
from bit_core.imagenet import materialize_imagenet
from bit_core.sources import materialize_digits, materialize_folder
from tasks.common import log, stage_main


def fetch(cfg: DataConfig, out: Path, *, cache_dir: Path = DEFAULT_CACHE,
          progress: bool = True) -> int:
    """Write the configured source's images under `out`; return how many (all or none).

    Sources with an official test set (CIFAR, ImageNet) are written as `out/train/<class>/...`,
    `out/test/<class>/...` and `out/split.json`, an image folder already split as its own split
    folders and `out/split.json`; the others as `out/<class>/<image>`.

    Args:
        cfg: the data section of params.yaml.
        out: the data root to (re)create.
        cache_dir: where downloaded archives are kept.
        progress: show download progress bars.
    """
    if cfg.source == "digits":
        with atomic_dir(out) as tmp:
            return materialize_digits(tmp)
    if cfg.source in CIFAR:
        return materialize_cifar(cfg.source, out, url=cfg.url, archive=cfg.archive, md5=cfg.md5,
                                 cache_dir=cache_dir, progress=progress)
    if cfg.source == "flowers":
        return materialize_flowers(out, url=cfg.url, archive=cfg.archive, md5=cfg.md5,
                                   cache_dir=cache_dir, progress=progress)
    if cfg.source == "imagefolder":
        return materialize_folder(cfg.folder, out)
    if cfg.source == "imagenet":
        return materialize_imagenet(cfg.imagenet_dir, out)
    raise DataError(f"data.source {cfg.source!r} is unknown: use digits, cifar10, cifar100, "
                    "flowers, imagefolder or imagenet")


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
