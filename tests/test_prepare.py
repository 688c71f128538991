"""The prepare stage: stratified splits, given test and validation sets, few-shot, unreadable
images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bit_core.config import DataConfig
from bit_core.contracts import write_split_marker
from bit_core.errors import DataError
from bit_core.splits import few_shot, read_split, stratified_split
from tasks.prepare import prepare


def _images(root, classes, per_class, size=(6, 5)):
    """`per_class` PNGs of `size` in each class folder, no two alike."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (i * 20 % 255, c * 40 % 255, 0)).save(root / name / f"{i}.png")


def test_official_test_split_is_kept(tmp_path):
    raw = tmp_path / "raw"
    _images(raw / "train", ["cat", "dog"], 10)
    _images(raw / "test", ["cat", "dog"], 3)
    write_split_marker(raw, "cifar10", ["cat", "dog"], {"train": 20, "test": 6})
    stats = prepare(DataConfig(val_fraction=0.2), raw, tmp_path / "out")
    assert stats["official_test"] and stats["test_images"] == 6
    assert stats["train_images"] == 16 and stats["val_images"] == 4
    test = read_split(tmp_path / "out/test.csv")
    assert all(s.path.startswith("test/") for s in test)
    assert sorted({s.label for s in test}) == [0, 1]
    assert all(s.path.startswith("train/") for s in read_split(tmp_path / "out/train.csv"))
    assert (stats["image_width"], stats["image_height"]) == (6, 5)


def test_unreadable_image_named(tmp_path):
    raw = tmp_path / "raw"
    _images(raw, ["a", "b"], 4)
    (raw / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b/broken.png"):
        prepare(DataConfig(), raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_few_shot_is_seeded():
    labels = np.repeat(np.arange(5), 20)
    train = stratified_split(labels, 0.1, 0.2, seed=0)["train"]
    first, again = few_shot(train, labels, 5, seed=1), few_shot(train, labels, 5, seed=1)
    other = few_shot(train, labels, 5, seed=2)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.bincount(labels[first]).tolist() == [5] * 5
    # pinned: numpy's PCG64 streams are specified, so every machine picks these
    assert first[:6].tolist() == [0, 7, 8, 12, 17, 25]


def test_few_shot_too_many_shots():
    labels = np.repeat(np.arange(2), 3)
    with pytest.raises(DataError, match="fewer than shots=5"):
        few_shot(np.arange(6), labels, 5, seed=0)


def test_a_given_validation_split_is_kept_too(tmp_path):
    raw = tmp_path / "raw"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _images(raw / split, ["cat", "dog"], n)
    write_split_marker(raw, "imagefolder", ["cat", "dog"], {"train": 12, "val": 4, "test": 6},
                       splits={"train": "train", "val": "val", "test": "test"})
    stats = prepare(DataConfig(val_fraction=0.5), raw, tmp_path / "out")
    assert (stats["train_images"], stats["val_images"], stats["test_images"]) == (12, 4, 6)
    assert {s.path.split("/")[0] for s in read_split(tmp_path / "out/val.csv")} == {"val"}


def test_a_class_missing_from_a_given_split_is_named(tmp_path):
    raw = tmp_path / "raw"
    _images(raw / "train", ["cat", "dog"], 2)
    _images(raw / "val", ["cat"], 2)
    write_split_marker(raw, "imagefolder", ["cat", "dog"], {"train": 4, "test": 2},
                       splits={"train": "train", "test": "val"})
    with pytest.raises(DataError, match=r"class 'dog' is in .*raw/train but not in .*raw/val: "):
        prepare(DataConfig(), raw, tmp_path / "out")
