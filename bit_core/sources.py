"""The sources without an archive: the digits that ship inside scikit-learn, and any folder of
class sub-folders, each written as ``<out>/<class>/<image>``; a folder already split into
``train/`` and ``val/`` or ``test/`` keeps its splits.

The archive sources have their own modules: :mod:`bit_core.cifar` and :mod:`bit_core.imagenet`
(both keep their official test set apart, see :func:`bit_core.contracts.read_split_marker`) and
:mod:`bit_core.flowers`, extracted through :mod:`bit_core.archives`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from bit_core.contracts import SPLITS, write_split_marker
from bit_core.errors import DataError
from bit_core.io import atomic_dir, clone_or_copy
from bit_core.splits import images_in


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


def count_images(folder: Path) -> int:
    """How many images :func:`materialize_folder` would take from `folder`."""
    return sum(1 for _ in images_in(folder))


def _subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of `folder`; DataError for a link to a folder that is gone (its
    class would silently be missing)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            raise DataError(f"{path} is a link to {os.readlink(path)}, which does not exist: fix "
                            "the link or remove it")
        if path.is_dir():
            found.append(path)
    return found


# Names a folder of a split takes (matched in any case), as data sets are published: Kaggle's
# Training/ and Testing/, Roboflow's valid/, ImageNet's train/ and val/.
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
               "test": ("test", "testing")}


def split_folders(folder: Path) -> dict[str, str] | None:
    """{split: folder name} of a root already split into ``train/`` and ``val/`` and/or ``test/``,
    each holding class folders; None for a root of class folders.

    The given ``test/`` is the test split, or ``val/`` when there is no ``test/`` (as ImageNet's
    validation set is); a ``val/`` beside ``test/`` is the validation split. Folders with these
    names are class folders when none of them holds sub-folders (CIFAR-100's classes
    include `train`).

    Raises:
        DataError: split and class folders are mixed, or train/ or a held-out folder is missing.
    """
    names = [p.name for p in _subfolders(folder)]
    found: dict[str, list[str]] = {}
    for name in names:
        split = next((s for s, aliases in SPLIT_NAMES.items() if name.lower() in aliases), None)
        if split:
            found.setdefault(split, []).append(name)
    if not any(_subfolders(folder / name) for named in found.values() for name in named):
        return None  # no split folder of class folders: train/, val/ or test/ are classes
    for split, named in found.items():
        if len(named) > 1:
            raise DataError(f"{folder} has {' and '.join(f'{n}/' for n in named)}, which name "
                            f"the same split ({split}): merge them or rename one")
    given = {split: found[split][0] for split in SPLITS if split in found}
    shown = " and ".join(f"{name}/" for name in given.values())  # in train, val, test order
    others = [name for name in names if name not in given.values()]
    if others:
        raise DataError(f"{folder} mixes split folders ({', '.join(given.values())}) and class "
                        f"folders ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): move "
                        "the class folders into train/ and val/ or test/, or the split folders "
                        "out")
    if "train" not in given:
        raise DataError(f"{folder} has {shown} but no train/: add train/<class>/ folders")
    if list(given) == ["train"]:
        raise DataError(f"{folder} has {shown} but no val/ or test/: add one, or set "
                        f"data.folder to {folder / given['train']} to split it seeded")
    if "test" not in given:
        return {"train": given["train"], "test": given["val"]}
    return {split: given[split] for split in SPLITS if split in given}


def _split_classes(folder: Path, splits: dict[str, str]) -> list[str]:
    """The class names every split folder holds (the same in each), sorted."""
    classes = {split: [p.name for p in _subfolders(folder / name)] for split, name in
               splits.items()}
    for split, found in classes.items():
        if not found:
            raise DataError(f"split folder {folder / splits[split]} has no class folders of "
                            f"images: put its images in {folder / splits[split]}/<class>/")
    train = set(classes["train"])
    for split, found in classes.items():
        for lacking, having, missing in ((split, "train", train - set(found)),
                                         ("train", split, set(found) - train)):
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                name = min(missing)
                raise DataError(f"class {name!r}{more} is in {folder / splits[having]} but not "
                                f"in {folder / splits[lacking]}: every split needs the same class "
                                f"folders; add {splits[lacking]}/{name}/ or remove it from the "
                                "other splits")
    return sorted(train)


def _copy_classes(folder: Path, classes: list[str], root: Path, tmp: Path) -> int:
    """Copy the images of `folder`/<class> for each class to the same place under `tmp`."""
    count = 0
    for name in classes:
        found = 0
        for path in images_in(folder / name):
            if not path.exists():
                raise DataError(f"{path} is a link to {os.readlink(path)}, which does not exist: "
                                "fix the link or remove it")
            dest = tmp / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            clone_or_copy(path, dest)
            found += 1
        if not found:
            raise DataError(f"class folder {folder / name} has no images: add some or remove it")
        count += found
    return count


def materialize_folder(folder: str | Path, out: Path) -> int:
    """Snapshot a folder of class sub-folders as `out`/<class>/<image> (replaced).

    A root already split (see :func:`split_folders`), such as ``ImageNet2012/train/<class>/`` and
    ``ImageNet2012/val/<class>/``, keeps its split folders, and a split marker (see
    :func:`bit_core.contracts.read_split_marker`) says which is the test split.

    Files are copied (:func:`bit_core.io.clone_or_copy`: reflinks where the file system has
    them, never hard links to the user's files); files that are not
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
    splits = split_folders(folder)
    with atomic_dir(out) as tmp:
        if splits is None:
            count = _copy_classes(folder, [p.name for p in _subfolders(folder)], folder, tmp)
            if not count:
                raise DataError(f"{folder} has no class sub-folders of images: put each class's "
                                "images in a sub-folder named after it")
            return count
        classes = _split_classes(folder, splits)
        images = {split: _copy_classes(folder / name, classes, folder, tmp)
                  for split, name in splits.items()}
        write_split_marker(tmp, "imagefolder", classes, images, splits=splits)
    return sum(images.values())
