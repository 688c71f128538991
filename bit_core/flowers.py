"""tf_flowers: TensorFlow's ``flower_photos.tgz`` (3,670 Creative Commons photos of 5 classes,
the data set of TensorFlow's image classification tutorials) as class folders::

    <out>/daisy/<image>.jpg, <out>/dandelion/..., <out>/roses/..., <out>/sunflowers/..., <out>/tulips/...

The archive holds ``flower_photos/<class>/<image>.jpg`` and ``flower_photos/LICENSE.txt`` (the
photographers' attributions), which is not an image and is left out. It has no official split:
the prepare stage splits it, seeded and stratified.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bit_core.archives import DEFAULT_CACHE, safe_extract, verified_archive
from bit_core.errors import DataError
from bit_core.io import atomic_dir
from bit_core.sources import count_images

FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"
# Size and SHA-256 of that file as TensorFlow Datasets pins them for tf_flowers
# (tensorflow_datasets/datasets/tf_flowers/checksums.tsv). No MD5 of it is published; a
# re-packed copy is checked against its own data.md5 instead.
FLOWERS_BYTES = 228_813_984
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS_FOLDER = "flower_photos"


def flowers_archive(*, url: str | None = None, archive: str | Path | None = None,
                    md5: str | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                    progress: bool = True) -> Path:
    """The verified flower_photos.tgz: a local copy, or a (cached, resumable) download.

    Args:
        url: a mirror instead of the official address.
        archive: a local copy to use instead of downloading.
        md5: the MD5 of a re-packed archive; without it the official SHA-256 is required.
        cache_dir: where downloads are kept.
        progress: show a progress bar while downloading.
    """
    return verified_archive("official flower_photos.tgz", FLOWERS_URL, {"sha256": FLOWERS_SHA256},
                            md5=md5, url=url, archive=archive, cache_dir=cache_dir,
                            progress=progress, official_bytes=FLOWERS_BYTES)


def materialize_flowers(out: Path, *, url: str | None = None, archive: str | Path | None = None,
                        md5: str | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                        progress: bool = True) -> int:
    """Write tf_flowers as `out`/<class>/<image> (replaced), all or nothing.

    The archive is verified, then extracted with :func:`safe_extract` inside the temporary folder
    that becomes `out`; the class folders are moved into place and the rest (LICENSE.txt) is
    deleted. Arguments are as in :func:`flowers_archive`.

    Returns:
        The number of images.
    """
    path = flowers_archive(url=url, archive=archive, md5=md5, cache_dir=cache_dir,
                           progress=progress)
    count = 0
    with atomic_dir(out) as tmp:
        extracted = safe_extract(path, tmp / ".archive") / FLOWERS_FOLDER
        if not extracted.is_dir():
            raise DataError(f"{path} has no {FLOWERS_FOLDER}/ folder: it is not flower_photos.tgz; "
                            f"download {FLOWERS_URL} again")
        classes = sorted(p for p in extracted.iterdir() if p.is_dir() and not p.name.startswith("."))
        for class_dir in classes:
            found = count_images(class_dir)
            if not found:
                raise DataError(f"{path}: class folder {class_dir.relative_to(extracted.parent)} "
                                f"has no images: download {FLOWERS_URL} again")
            os.replace(class_dir, tmp / class_dir.name)
            count += found
        if not count:
            raise DataError(f"{path} has no class folders under {FLOWERS_FOLDER}/: download "
                            f"{FLOWERS_URL} again")
        shutil.rmtree(tmp / ".archive")
    return count
