"""The prepare stage: stratified splits, given test and validation sets, few-shot, unreadable
images, and the data report (counts, sizes, exact duplicates and leakage)."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from bit_core.config import DataConfig
from bit_core.contracts import DATA_METRICS, DataMetrics, write_split_marker
from bit_core.errors import DataError
from bit_core.splits import few_shot, read_split, stratified_split
from tasks.prepare import prepare
from tests.conftest import tiny_onnx


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
    stats = prepare(DataConfig(val_fraction=0.2), raw, tmp_path / "out", tmp_path / "report")
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
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) under .*raw: b/broken.png; "
                                        r"remove or replace them, or set data.unreadable: skip"):
        prepare(DataConfig(), raw, tmp_path / "out", tmp_path / "report")
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


def test_a_truncated_jpeg_is_unreadable_before_training_meets_it(tmp_path):
    """Its header is whole, so PIL opens and verifies it; only decoding finds the missing end,
    as the data loader would, mid-epoch."""
    raw = tmp_path / "raw"
    _images(raw, ["a", "b"], 4)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(raw / "a" / "cut.jpg", quality=90)
    whole = (raw / "a" / "cut.jpg").read_bytes()
    (raw / "a" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    with Image.open(raw / "a" / "cut.jpg") as image:
        image.verify()  # what the check alone would have passed
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) under .*raw: a/cut.jpg; "):
        prepare(DataConfig(), raw, tmp_path / "out", tmp_path / "report")
    stats = prepare(DataConfig(unreadable="skip"), raw, tmp_path / "out", tmp_path / "report")
    assert stats["train_images"] + stats["val_images"] + stats["test_images"] == 8
    rows = (tmp_path / "report" / "unreadable.csv").read_text().splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("a/cut.jpg,image file is truncated ("), rows


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
    with pytest.raises(DataError, match="class 'bus' has 3 training images, fewer than shots=5"):
        few_shot(np.arange(6), labels, 5, seed=0, classes=["bus", "car"])


def _metrics(report) -> DataMetrics:
    return DataMetrics.read(report / DATA_METRICS, "prepare")


def test_a_given_validation_split_is_kept_too(tmp_path):
    raw = tmp_path / "raw"
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        _images(raw / split, ["cat", "dog"], n)
    write_split_marker(raw, "imagefolder", ["cat", "dog"], {"train": 12, "val": 4, "test": 6},
                       splits={"train": "train", "val": "val", "test": "test"})
    stats = prepare(DataConfig(val_fraction=0.5), raw, tmp_path / "out", tmp_path / "report")
    assert (stats["train_images"], stats["val_images"], stats["test_images"]) == (12, 4, 6)
    assert {s.path.split("/")[0] for s in read_split(tmp_path / "out/val.csv")} == {"val"}
    assert "The validation and test splits are as the source gives" in \
        (tmp_path / "report/report.md").read_text()


def test_a_class_missing_from_a_given_split_is_named(tmp_path):
    raw = tmp_path / "raw"
    _images(raw / "train", ["cat", "dog"], 2)
    _images(raw / "val", ["cat"], 2)
    write_split_marker(raw, "imagefolder", ["cat", "dog"], {"train": 4, "test": 2},
                       splits={"train": "train", "test": "val"})
    with pytest.raises(DataError, match=r"class 'dog' is in .*raw/train but not in .*raw/val: "):
        prepare(DataConfig(), raw, tmp_path / "out", tmp_path / "report")


def _leaky(raw):
    """An official split where test/cat/0.png and test/dog/1.png are copies of train images
    (train/cat/0.png, and train/dog/1.png twice), with two sizes and an unreadable file."""
    _images(raw / "train", ["cat", "dog"], 6)
    _images(raw / "test", ["cat", "dog"], 3, size=(9, 7))
    for name in ("cat/0.png", "dog/1.png"):
        shutil.copyfile(raw / "train" / name, raw / "test" / name)
    shutil.copyfile(raw / "train/dog/1.png", raw / "train/dog/1-again.png")
    (raw / "train/cat/broken.jpg").write_bytes(b"\xff\xd8 not really")
    write_split_marker(raw, "cifar10", ["cat", "dog"], {"train": 13, "test": 6})


def test_the_report_finds_leakage_and_dedupe_removes_it_from_train(tmp_path):
    raw, out, report = tmp_path / "raw", tmp_path / "out", tmp_path / "report"
    _leaky(raw)
    cfg = DataConfig(val_fraction=0.0, unreadable="skip")

    stats = prepare(cfg, raw, out, report)

    metrics = _metrics(report)
    assert (metrics.images_train, metrics.images_val, metrics.images_test) == (13, 0, 6)
    assert stats["train_images"] == 13 and metrics.unreadable == 1
    assert (metrics.test_in_train, metrics.removed_from_train) == (3, 0)
    assert (metrics.duplicate_groups_across_splits, metrics.duplicates_within_splits) == (2, 1)
    assert (metrics.width_min, metrics.width_max, metrics.height_median) == (6, 9, 5)
    assert sorted(report.iterdir()) == sorted(report / name for name in (
        "classes.csv", "classes.png", "duplicates.csv", "metrics.json", "report.md", "sizes.csv",
        "unreadable.csv"))
    assert (report / "classes.csv").read_text().splitlines() == [
        "class,train,val,test,total", "cat,6,0,3,9", "dog,7,0,3,10"]
    assert (report / "sizes.csv").read_text().splitlines() == [
        "width,height,images", "6,5,15", "9,7,4"]  # the two test copies of train images are 6 x 5
    assert (report / "unreadable.csv").read_text().splitlines()[1:] == [
        "train/cat/broken.jpg,cannot identify image file,skipped"]
    duplicates = (report / "duplicates.csv").read_text().splitlines()
    assert [line.split(",")[1:4] for line in duplicates[1:]] == [
        ["train", "train/cat/0.png", "cat"], ["test", "test/cat/0.png", "cat"],
        ["train", "train/dog/1-again.png", "dog"], ["train", "train/dog/1.png", "dog"],
        ["test", "test/dog/1.png", "dog"]]
    text = (report / "report.md").read_text()
    assert "**Leakage**: 3 train images also in test, 0 also in validation; " \
           "kept in train (data.dedupe: true removes them)." in text
    assert "| train/cat/broken.jpg | cannot identify image file |" in text
    assert (report / "classes.png").read_bytes()[:4] == b"\x89PNG"

    prepare(cfg.model_copy(update={"dedupe": True}), raw, out, report)

    train = {s.path for s in read_split(out / "train.csv")}
    assert len(train) == 10 and not train & {"train/cat/0.png", "train/dog/1.png",
                                             "train/dog/1-again.png"}
    assert (_metrics(report).test_in_train, _metrics(report).removed_from_train) == (3, 3)
    assert json.loads((out / "stats.json").read_text())["train_images"] == 10
    assert [line.rsplit(",", 1)[1] for line in
            (report / "duplicates.csv").read_text().splitlines()[1:]] == [
        "removed from train", "", "removed from train", "removed from train", ""]


def test_16_bit_grayscale_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG (Pillow's mode I;16) reaches training and `bit predict` as the same
    picture at 8 bits, not clipped at 255 to nearly all white."""
    from bit_core.data import ImageListDataset
    from bit_core.serving import decode
    from bit_core.splits import Sample

    deep = (np.arange(32 * 48).reshape(32, 48) * 42).astype(np.uint16)  # 0 .. 64,470
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    expected = np.repeat(np.rint(deep / 257.0)[..., None], 3, axis=2)
    trained = ImageListDataset(tmp_path, [Sample("deep.png", 0)])[0][0]
    served = decode((tmp_path / "deep.png").read_bytes())
    for image in (trained, served):
        assert image.mode == "RGB"
        assert np.abs(np.asarray(image, np.float64) - expected).max() <= 1



def _trained_and_served(folder, name):
    from bit_core.data import ImageListDataset
    from bit_core.serving import decode
    from bit_core.splits import Sample

    return (ImageListDataset(folder, [Sample(name, 0)])[0][0],
            decode((folder / name).read_bytes()))


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """A phone stores a portrait photo as a landscape picture with EXIF orientation 6 (turn
    90 degrees clockwise): training, the data report and `bit predict` all see it upright."""
    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:20] = (250, 0, 0)  # a red top third
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 60 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "cls").mkdir()
    stored.save(tmp_path / "cls" / "portrait.jpg", exif=exif, quality=95)
    for image in _trained_and_served(tmp_path, "cls/portrait.jpg"):
        assert image.size == (40, 60)
        top, bottom = np.asarray(image)[:15].mean((0, 1)), np.asarray(image)[-15:].mean((0, 1))
        assert top[0] > 200 > 50 > top[1] and bottom.max() < 50
    from bit_core.datareport import inspect_images
    from bit_core.splits import Sample

    table = inspect_images(tmp_path, [Sample("cls/portrait.jpg", 0)])
    assert (table.widths[0], table.heights[0]) == (40, 60)


def test_transparent_pixels_are_white_whatever_colour_is_stored_under_them(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # all transparent, black stored underneath
    rgba[:4, :, :] = (0, 0, 255, 255)  # an opaque blue top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(rgba, "RGBA").convert("P")  # a GIF-like palette with transparency
    palette.info["transparency"] = palette.getpixel((0, 7))
    palette.save(tmp_path / "palette.png", transparency=palette.getpixel((0, 7)))
    assert Image.open(tmp_path / "palette.png").mode == "P"
    for name in ("rgba.png", "palette.png"):
        for image in _trained_and_served(tmp_path, name):
            pixels = np.asarray(image)
            assert image.mode == "RGB"
            assert (pixels[:4] == (0, 0, 255)).all() and (pixels[4:] == 255).all(), name


def test_floating_point_images_are_refused_at_prepare_and_by_predict(tmp_path):
    """A 32-bit float TIFF has no stated range (0..1? 0..255?): prepare names it unreadable,
    before any training, and `bit predict` says why."""
    from bit_core.serving import ImageError, decode

    raw = tmp_path / "raw"
    _images(raw, ["a", "b"], 4)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(raw / "a" / "float.tif")
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) under .*raw: a/float.tif; "):
        prepare(DataConfig(), raw, tmp_path / "out", tmp_path / "report")
    with pytest.raises(ImageError, match=r"^x.tif: a 32-bit floating-point image, whose range is "
                                         r"unknown: save it as an 8- or 16-bit image$"):
        decode((raw / "a" / "float.tif").read_bytes(), "x.tif")


def test_an_image_too_large_to_decode_safely_is_named_not_a_traceback(tmp_path):
    from bit_core.serving import ImageError, decode

    big = tmp_path / "big.png"
    Image.new("1", (13_400, 13_400)).save(big)  # 179.6 M pixels: Pillow's decompression bomb
    with pytest.raises(ImageError, match=r"^big.png: too large \(Image size \(179560000 pixels\) "
                                         r"exceeds limit"):
        decode(big.read_bytes(), "big.png")

def test_hidden_files_in_a_fetched_root_are_not_images(tmp_path):
    """An archive's ``._photo.png`` (macOS metadata) and ``.ipynb_checkpoints/`` copies are not
    images of the data set, whichever source brought them into data/raw."""
    raw = tmp_path / "raw"
    _images(raw, ["daisy", "roses"], 4)
    (raw / "daisy" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (raw / "roses" / ".ipynb_checkpoints").mkdir()
    shutil.copy(raw / "roses" / "0.png", raw / "roses" / ".ipynb_checkpoints" / "0-ckpt.png")
    (raw / ".cache").mkdir()  # a hidden folder is no class either
    stats = prepare(DataConfig(val_fraction=0.25, test_fraction=0.25), raw, tmp_path / "out",
                    tmp_path / "report")
    assert stats["train_images"] + stats["val_images"] + stats["test_images"] == 8
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["daisy", "roses"]


def test_a_class_left_without_training_images_is_refused(tmp_path):
    """Skipping unreadable images (or data.dedupe) can empty a class of training images while
    it stays a class: the model could never learn it, so prepare stops and names it."""
    raw = tmp_path / "raw"
    _images(raw, ["bus", "car", "tram"], 4)
    for i in range(4):
        (raw / "car" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"class 'car' has no training image left of .*raw: add "
                                        r"readable images of it, or remove its folder"):
        prepare(DataConfig(unreadable="skip"), raw, tmp_path / "out", tmp_path / "report")
    assert not (tmp_path / "out").exists()


def test_a_file_name_that_is_not_utf8_is_named_in_one_line(tmp_path):
    raw = tmp_path / "raw"
    _images(raw, ["a", "b"], 4)
    shutil.copy(raw / "a" / "0.png", os.fsencode(raw / "a") + b"/caf\xe9.png")  # Latin-1 é
    with pytest.raises(DataError, match=r"the name b'a/caf\\xe9.png' is not UTF-8 text: rename"):
        prepare(DataConfig(), raw, tmp_path / "out", tmp_path / "report")
    assert not (tmp_path / "out").exists()


def test_an_empty_test_split_is_refused(tmp_path):
    raw = tmp_path / "raw"
    _images(raw, ["a", "b"], 4)
    with pytest.raises(DataError, match=r"the test split of .*raw is empty: set data.test_fraction "
                                        r"above 0 \(or give a test/ folder\)"):
        prepare(DataConfig(test_fraction=0.0), raw, tmp_path / "out", tmp_path / "report")
    assert not (tmp_path / "out").exists()


def test_a_damaged_exif_block_does_not_stop_an_image_that_decodes(tmp_path):
    """Some cameras and editors write an EXIF block that is not valid TIFF: the picture is used
    as stored, in training and by the served model (which reads it twice: decode, preprocess)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4), (200, 10, 10)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    payload = b"Exif\0\0" + bytes(range(1, 10))
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "odd.jpg").write_bytes(jpeg[:2] + segment + jpeg[2:])
    for image in _trained_and_served(tmp_path, "cls/odd.jpg"):
        assert image.size == (8, 4) and image.mode == "RGB"
    from bit_core.serving import ImageClassifier

    classifier = ImageClassifier(tiny_onnx(tmp_path / "tiny.onnx"))
    assert classifier.classify([_trained_and_served(tmp_path, "cls/odd.jpg")[1]])[0].classes[0] \
        == "a"


def test_transparent_pixels_of_a_16_bit_image_are_white_too(tmp_path):
    deep = np.array([[32896, 0], [0, 0]], np.uint16)  # mid grey, and 0 marked transparent
    Image.fromarray(deep).save(tmp_path / "deep.png", transparency=0)
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    for image in _trained_and_served(tmp_path, "deep.png"):
        assert np.asarray(image)[..., 0].tolist() == [[128, 255], [255, 255]]


def test_base64_text_wrapped_in_lines_decodes(tmp_path):
    """`base64` without -w0 and Python's encodebytes wrap lines at 76 characters."""
    import base64

    from bit_core.serving import ImageError, decode

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buffer, format="PNG")
    wrapped = base64.encodebytes(buffer.getvalue()).decode()
    assert "\n" in wrapped.strip()
    assert decode(wrapped).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError, match="not base64-encoded image bytes"):
        decode("not base64 at all!")
