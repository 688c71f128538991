"""The sources without an archive: the digits that ship inside scikit-learn, and any folder of
class sub-folders, each written as ``<out>/<class>/<image>``.

The archive sources have their own modules: :mod:`bit_core.cifar` and :mod:`bit_core.imagenet`
(both keep their official test set apart, see :func:`bit_core.contracts.read_split_marker`),
extracted through :mod:`bit_core.archives`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from bit_core.errors import DataError
from bit_core.io import atomic_dir, link_or_copy


def materialize_digits(out: Path) -> int:
    """Write scikit-learn's handwritten digits (1797 8x8 images, shipped in the package) as PNGs.

    Returns the number of images written. Pixel values 0..16 are scaled to 0..255.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = Path(out) / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return len(pixels)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def materialize_folder(folder: str | Path, out: Path) -> int:
    """Snapshot a folder of class sub-folders as `out`/<class>/<image> (replaced).

    Files are hard-linked when `out` is on the same file system, else copied; files that are not
    images by their suffix, hidden files and hidden folders are skipped. Whether each image
    decodes is checked later, by the prepare step.

    Returns:
        The number of images.
    """
    folder, out = Path(folder).expanduser(), Path(out)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: fix data.folder")
    source, target = folder.resolve(), out.resolve()
    if source == target or target in source.parents or source in target.parents:
        raise DataError(f"data.folder {folder} overlaps the output {out}: keep the images "
                        "elsewhere")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    count = 0
    with atomic_dir(out) as tmp:
        for class_dir in classes:
            found = 0
            for parent, dirs, files in os.walk(class_dir, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = Path(parent) / name
                    if not _is_image(path):
                        continue
                    dest = tmp / path.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(path, dest)
                    found += 1
            if not found:
                raise DataError(f"class folder {class_dir} has no images: add some or remove it")
            count += found
        if not count:
            raise DataError(f"{folder} has no class sub-folders of images: put each class's "
                            "images in a sub-folder named after it")
    return count
