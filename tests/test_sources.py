"""Tests of bit_core.sources on generated archives in the real formats (no mocks, 127.0.0.1)."""

from __future__ import annotations

import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
import scipy.io
from PIL import Image

from bit_core.config import DataConfig
from bit_core.contracts import read_split_marker
from bit_core.errors import DataError
from bit_core.archives import safe_extract
from bit_core.cifar import load_pickle, materialize_cifar
from bit_core.imagenet import materialize_imagenet
from tasks.fetch_data import fetch
from tests.archives import CIFAR10_NAMES, md5, py2_pickle, tar_bytes
from tests.conftest import BIN
from tests.http_fixtures import ArchiveServer

def _batch(rng: np.random.Generator, n: int, labels_key: bytes, classes: int) -> tuple[dict, list]:
    """A CIFAR batch dict as in the real files (bytes keys, N x 3072 uint8 planes), its labels."""
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, classes, size=n)]
    batch = {b"batch_label": b"generated batch", labels_key: labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch, labels


def _expected(batches: list[tuple[dict, list]], names: list[bytes]) -> list[tuple[str, np.ndarray]]:
    """(class name, HxWxC pixels) of every image of some batches, in order."""
    out = []
    for batch, labels in batches:
        pixels = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out += [(names[label].decode(), image) for image, label in zip(pixels, labels)]
    return out


def _cifar10(seed: int = 0, replace: dict[str, bytes] | None = None) -> tuple[bytes, dict]:
    """A cifar-10-python.tar.gz in the real layout (Python 2 pickles), and the expected images."""
    rng = np.random.default_rng(seed)
    train = [_batch(rng, 2, b"labels", 10) for _ in range(5)]
    test = [_batch(rng, 3, b"labels", 10)]
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": py2_pickle(b)
               for i, (b, _) in enumerate(train)}
    members["cifar-10-batches-py/test_batch"] = py2_pickle(test[0][0])
    members["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {b"num_cases_per_batch": 2, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    members.update(replace or {})
    return tar_bytes(members), {"train": _expected(train, CIFAR10_NAMES),
                           "test": _expected(test, CIFAR10_NAMES)}


def _assert_pngs(out: Path, expected: dict[str, list[tuple[str, np.ndarray]]]) -> None:
    for split, images in expected.items():
        found = sorted(p.relative_to(out / split).as_posix() for p in (out / split).rglob("*.png"))
        assert found == sorted(f"{name}/{i:05d}.png" for i, (name, _) in enumerate(images))
        for index, (name, pixels) in enumerate(images):
            with Image.open(out / split / name / f"{index:05d}.png") as image:
                assert image.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(image), pixels)


def _no_leftovers(parent: Path) -> None:
    """No temporary or partial sibling folders are left behind."""
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


# --- CIFAR ---------------------------------------------------------------------------------------

def test_cifar10_download_resumes_after_a_drop_and_writes_the_official_split(
        http_server: ArchiveServer, tmp_path: Path) -> None:
    archive, expected = _cifar10()
    drop = len(archive) // 2
    url = http_server.add("/cifar-10-python.tar.gz", archive, drop_after=drop)
    out, cache = tmp_path / "data" / "raw", tmp_path / "cache"

    count = materialize_cifar("cifar10", out, url=url, md5=md5(archive), cache_dir=cache,
                              progress=False)

    assert count == 13
    assert http_server.ranges("/cifar-10-python.tar.gz") == [None, f"bytes={drop}-"]
    assert (cache / "cifar-10-python.tar.gz").read_bytes() == archive
    _assert_pngs(out, expected)
    marker = read_split_marker(out)
    assert marker["source"] == "cifar10" and marker["splits"] == {"train": "train", "test": "test"}
    assert marker["classes"] == [n.decode() for n in CIFAR10_NAMES]
    assert marker["images"] == {"train": 10, "test": 3}
    _no_leftovers(out.parent)

    materialize_cifar("cifar10", out, url=url, md5=md5(archive), cache_dir=cache, progress=False)
    assert len(http_server.ranges("/cifar-10-python.tar.gz")) == 2  # served from the cache


def test_cifar100_fine_labels_from_python3_protocol2_pickles(http_server: ArchiveServer,
                                                             tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    names = [f"class_{i:02d}".encode() for i in range(100)]
    train, test = _batch(rng, 6, b"fine_labels", 100), _batch(rng, 4, b"fine_labels", 100)
    for batch, _ in (train, test):
        batch[b"coarse_labels"] = [0] * len(batch[b"data"])
    archive = tar_bytes({"cifar-100-python/train": pickle.dumps(train[0], protocol=2),
                    "cifar-100-python/test": pickle.dumps(test[0], protocol=2),
                    "cifar-100-python/meta": pickle.dumps(
                        {b"fine_label_names": names, b"coarse_label_names": [b"all"]},
                        protocol=2)})
    url = http_server.add("/c100.tar.gz", archive)
    out = tmp_path / "raw"

    assert materialize_cifar("cifar100", out, url=url, md5=md5(archive),
                             cache_dir=tmp_path / "cache", progress=False) == 10

    _assert_pngs(out, {"train": _expected([train], names), "test": _expected([test], names)})
    assert read_split_marker(out)["classes"] == [n.decode() for n in names]


def test_wrong_md5_is_rejected_and_nothing_is_written(http_server: ArchiveServer,
                                                      tmp_path: Path) -> None:
    archive, _ = _cifar10()
    url = http_server.add("/cifar-10-python.tar.gz", archive)
    out, cache = tmp_path / "raw", tmp_path / "cache"

    with pytest.raises(DataError, match=r"md5 mismatch .*expected 0{32}"):
        materialize_cifar("cifar10", out, url=url, md5="0" * 32, cache_dir=cache, progress=False)
    assert not out.exists() and list(cache.iterdir()) == []

    local = tmp_path / "cifar-10-python.tar.gz"  # a local copy checked against the official md5
    local.write_bytes(archive)
    out.mkdir()
    (out / "kept.txt").write_text("earlier output")
    with pytest.raises(DataError, match=rf"{local} has md5 {md5(archive)}, expected c58f3010"):
        fetch(DataConfig(source="cifar10", archive=str(local)), out, cache_dir=cache)
    assert [p.name for p in out.iterdir()] == ["kept.txt"]
    _no_leftovers(tmp_path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_any_other_global_is_refused_unexecuted(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2)
    archive, _ = _cifar10(replace={"cifar-10-batches-py/data_batch_3": evil})
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    out = tmp_path / "raw"

    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR python batch .*global "
                                        r"(posix|os)\.system is not allowed"):
        materialize_cifar("cifar10", out, archive=path, md5=md5(archive))

    assert not marker.exists() and not out.exists()
    _no_leftovers(tmp_path)
    builtin = tmp_path / "builtin.pkl"
    builtin.write_bytes(pickle.dumps({b"x": print}, protocol=2))
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.print is not allowed"):
        load_pickle(builtin)



class _ObjectDtype:
    """numpy's pickle of dtype('O'), its flags cleared: an object array numpy would build
    from raw bytes, so that the bytes are used as pointers."""

    def __reduce__(self):
        rebuild, args, state = np.dtype("O").__reduce__()
        return rebuild, args, (*state[:-1], 0)


class _PointerArray:
    def __reduce__(self):
        rebuild, args, (version, _, _, fortran, _) = np.empty(2, np.uint8).__reduce__()
        return rebuild, args, (version, (2,), _ObjectDtype(), fortran, b"AAAAAAAA" * 2)


def test_an_array_whose_bytes_would_be_pointers_is_refused_not_built(tmp_path: Path) -> None:
    evil = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": _PointerArray()},
                        protocol=2)
    archive, _ = _cifar10(replace={"cifar-10-batches-py/data_batch_2": evil})
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    code = ("import sys; from bit_core.cifar import materialize_cifar; "
            "materialize_cifar('cifar10', sys.argv[1], archive=sys.argv[2], md5=sys.argv[3], "
            "progress=False)")
    # a subprocess: numpy building that array crashes the interpreter (segmentation fault)
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "raw"), str(path),
                             md5(archive)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result
    assert re.search(r"DataError: .*data_batch_2 is not a CIFAR python batch \(numpy.dtype "
                     r"'O8' is not a plain numeric type\)", result.stderr), result.stderr
    assert not (tmp_path / "raw").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("labels", [[b"x", b"y"], [0.5, 1.0], [[0], [1, 2]], b"01"])
def test_labels_that_are_not_integers_are_refused_in_one_line(tmp_path: Path, labels) -> None:
    bad = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2)
    archive, _ = _cifar10(replace={"cifar-10-batches-py/test_batch": bad})
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    with pytest.raises(DataError, match=r"test_batch: 'labels' does not give one label in 0\.\.9 "
                                        r"per image: use the official archive"):
        materialize_cifar("cifar10", tmp_path / "raw", archive=path, md5=md5(archive))


def test_arrays_of_every_plain_layout_are_rebuilt_exactly(tmp_path: Path) -> None:
    arrays = {b"c": np.arange(12, dtype="<i8").reshape(3, 4),
              b"f": np.asfortranarray(np.arange(12, dtype=">i4").reshape(3, 4)),
              b"u": np.arange(7, dtype=np.uint8), b"e": np.zeros((0, 3), np.float32)}
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        loaded = load_pickle(path)
        for key, array in arrays.items():
            got = loaded[key.decode()]
            assert got.dtype == array.dtype and np.array_equal(got, array)

# --- safe extraction -----------------------------------------------------------------------------

def _hostile(kind: str, outside: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        good = tarfile.TarInfo("ok/first.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        if kind in ("dotdot", "absolute"):
            name = "ok/../../outside/evil" if kind == "dotdot" else str(outside / "evil")
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        else:
            link = tarfile.TarInfo("ok/link")
            link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            link.linkname = str(outside) if kind == "symlink" else "ok/first.txt"
            tar.addfile(link)
            if kind == "symlink":  # then write through it
                through = tarfile.TarInfo("ok/link/evil")
                through.size = 4
                tar.addfile(through, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.mark.parametrize("kind,reason", [("dotdot", "a '..' component"),
                                         ("absolute", "an absolute path"),
                                         ("symlink", "a link"), ("hardlink", "a link")])
def test_hostile_members_are_refused_and_nothing_lands_outside(tmp_path: Path, kind: str,
                                                               reason: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "in" / "hostile.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(_hostile(kind, outside))
    dest = tmp_path / "work" / "dest"

    with pytest.raises(DataError, match=rf"{archive}: member .* has {reason}; refusing"):
        safe_extract(archive, dest)

    assert list(outside.iterdir()) == []
    assert list((tmp_path / "work").iterdir()) == []  # neither dest nor its temporary sibling


@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w", "tar")])
def test_truncated_archive_is_reported_by_path_without_partial_output(
        tmp_path: Path, mode: str, suffix: str) -> None:
    blob = np.random.default_rng(2).bytes(120_000)  # incompressible
    data = tar_bytes({"top/a.bin": blob, "top/b.bin": blob[::-1]}, mode)
    archive = tmp_path / f"broken.{suffix}"
    archive.write_bytes(data[: len(data) * 2 // 3])  # cut inside top/b.bin
    dest = tmp_path / "dest"

    with pytest.raises(DataError, match=rf"{archive} is truncated or corrupt .*download it again"):
        safe_extract(archive, dest)

    assert sorted(p.name for p in tmp_path.iterdir()) == [archive.name]



def test_damage_only_the_gzip_checksum_shows_is_refused(tmp_path: Path) -> None:
    """tarfile stops reading before the gzip trailer: a flipped bit in the compressed data can
    extract "fine" with other bytes. The stream is read to its end, where gzip checks its CRC."""
    import gzip

    good = tar_bytes({"a/0": b"x" * 5000, "a/1": bytes(range(256)) * 40})
    for i in range(20, len(good) - 8):  # the first damage tarfile alone reads through
        bad = bytearray(good)
        bad[i] ^= 1
        try:
            with tarfile.open(fileobj=io.BytesIO(bytes(bad)), mode="r:*") as tar:
                [tar.extractfile(m).read() for m in tar if m.isfile()]
            gzip.decompress(bytes(bad))
        except gzip.BadGzipFile:
            break
        except Exception:  # noqa: BLE001 - damage tarfile notices by itself
            continue
    else:
        pytest.fail("no damage that only the CRC shows")
    (tmp_path / "bad.tgz").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"bad.tgz is truncated or corrupt \(.*\): delete it and "
                                        r"download it again$"):
        safe_extract(tmp_path / "bad.tgz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_archive_setting_that_names_a_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match=r"data.archive .*cifar-10-batches-py is a folder: give the "
                                        r"archive file itself \(cifar-10-python.tar.gz\)"):
        materialize_cifar("cifar10", tmp_path / "raw", archive=tmp_path / "cifar-10-batches-py")

# --- ILSVRC-2012 ---------------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850"]  # ILSVRC2012_ID 1, 2, 3
VAL_IDS = [2, 1, 3, 3, 2]  # ground truth of ILSVRC2012_val_00000001.JPEG ...


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _meta_mat(path: Path) -> None:
    """data/meta.mat as in the devkit: a column of synset structs, leaves first, then a parent."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    rows = [(i + 1, wnid, f"class {i}, alias {i}", "a leaf", 0, np.zeros((1, 0)), 0, 2)
            for i, wnid in enumerate(WNIDS)]
    rows.append((4, "n00000001", "entity", "the root", 3, np.array([[1, 2, 3]], float), 1, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for index, row in enumerate(rows):
        synsets[index, 0] = tuple(np.array([[v]], float) if isinstance(v, int) else v
                                  for v in row)
    scipy.io.savemat(path, {"synsets": synsets})


def _imagenet(folder: Path) -> dict[str, str]:
    """The three ILSVRC2012 archives in their real layouts; returns their md5s."""
    folder.mkdir(parents=True, exist_ok=True)
    inner = {f"{w}.tar": tar_bytes({f"{w}_{k}.JPEG": _jpeg((40 * i, 10 * k, 0)) for k in (1, 2)}, "w")
             for i, w in enumerate(WNIDS)}
    (folder / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(inner, "w"))
    (folder / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(
        {f"ILSVRC2012_val_{n:08d}.JPEG": _jpeg((0, 0, 40 * n)) for n in range(1, 6)}, "w"))
    mat = folder / "meta.mat"
    _meta_mat(mat)
    (folder / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes({
        "ILSVRC2012_devkit_t12/data/meta.mat": mat.read_bytes(),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt":
            "".join(f"{i}\n" for i in VAL_IDS).encode(),
        "ILSVRC2012_devkit_t12/COPYING": b"devkit"}))
    mat.unlink()
    return {key: md5((folder / name).read_bytes()) for key, name in (
        ("train", "ILSVRC2012_img_train.tar"), ("val", "ILSVRC2012_img_val.tar"),
        ("devkit", "ILSVRC2012_devkit_t12.tar.gz"))}


def test_imagenet_class_folders_and_no_work_the_second_time(tmp_path: Path) -> None:
    archives, out = tmp_path / "ilsvrc", tmp_path / "data" / "raw"
    md5s = _imagenet(archives)

    with pytest.raises(DataError, match=r"ILSVRC2012_img_val.tar has md5 .*download it again"):
        materialize_imagenet(archives, out, checksums={**md5s, "val": "f" * 32})
    assert materialize_imagenet(archives, out, checksums=md5s) == 11

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.JPEG"))
    assert files == sorted([f"train/{w}/{w}_{k}.JPEG" for w in WNIDS for k in (1, 2)] + [
        f"test/{WNIDS[i - 1]}/ILSVRC2012_val_{n:08d}.JPEG" for n, i in enumerate(VAL_IDS, 1)])
    with Image.open(out / "test" / WNIDS[1] / "ILSVRC2012_val_00000001.JPEG") as image:
        assert image.getpixel((4, 4))[2] > 20  # the first val image, labelled 2 -> n01443537
    marker = read_split_marker(out)
    assert marker["source"] == "imagenet" and marker["classes"] == WNIDS
    assert marker["images"] == {"train": 6, "test": 5}
    assert marker["class_names"][WNIDS[0]] == "class 0, alias 0"
    _no_leftovers(out.parent)

    before = (out.stat().st_ino, (out / "split.json").stat().st_mtime_ns)
    assert materialize_imagenet(archives, out, checksums={"train": "0" * 32}) == 11  # not re-read
    assert (out.stat().st_ino, (out / "split.json").stat().st_mtime_ns) == before


def test_imagenet_resumes_without_the_class_a_stopped_run_was_extracting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped mid-class (SIGKILL, no clean-up) leaves that class's temporary folder in
    the work folder; the next run extracts the class again and the folder is gone, not carried
    into data/raw as a hidden class nor counted in the split marker."""
    import bit_core.imagenet as imagenet

    archives, out = tmp_path / "ilsvrc", tmp_path / "data" / "raw"
    md5s = _imagenet(archives)
    real = imagenet.safe_extract

    def stopped(name, dest, fileobj=None):
        if Path(dest).name == WNIDS[1]:  # the second class: half-written, as a kill leaves it
            left = Path(dest).parent / f".{WNIDS[1]}.x1y2z3"
            left.mkdir()
            (left / f"{WNIDS[1]}_1.JPEG").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(name, dest, fileobj)

    monkeypatch.setattr(imagenet, "safe_extract", stopped)
    with pytest.raises(KeyboardInterrupt):
        materialize_imagenet(archives, out, checksums=md5s)
    monkeypatch.setattr(imagenet, "safe_extract", real)
    assert materialize_imagenet(archives, out, checksums=md5s) == 11
    assert read_split_marker(out)["images"] == {"train": 6, "test": 5}
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(WNIDS)
    _no_leftovers(out.parent)


def test_imagenet_starts_again_from_a_work_folder_whose_record_a_kill_cut_short(
        tmp_path: Path) -> None:
    archives, out = tmp_path / "ilsvrc", tmp_path / "data" / "raw"
    md5s = _imagenet(archives)
    work = out.parent / f".{out.name}.imagenet-partial"
    (work / "train").mkdir(parents=True)
    (work / "archives.json").write_text('{"archives": {"train": [12')  # half-written
    assert materialize_imagenet(archives, out, checksums=md5s) == 11
    _no_leftovers(out.parent)


def test_imagenet_missing_archive_says_where_to_get_it(tmp_path: Path) -> None:
    archives = tmp_path / "ilsvrc"
    _imagenet(archives)
    (archives / "ILSVRC2012_img_val.tar").unlink()
    out = tmp_path / "raw"

    with pytest.raises(DataError, match=rf"{archives}/ILSVRC2012_img_val.tar not found: download "
                       rf"it from https://image-net.org/ \(login required\) and put it in "
                       rf"{archives}$"):
        fetch(DataConfig(source="imagenet", imagenet_dir=str(archives)), out)
    with pytest.raises(ValidationError, match="needs data.imagenet_dir"):
        DataConfig(source="imagenet")
    assert not out.exists()


# --- image folders -------------------------------------------------------------------------------

def test_image_folder_snapshot_skips_non_images(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "cat").mkdir(parents=True)
    (src / "dog" / "nested").mkdir(parents=True)
    (src / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(src / "cat" / "a.png")
    (src / "cat" / "b.JPG").write_bytes(_jpeg((0, 255, 0)))
    (src / "cat" / "broken.png").write_bytes(b"not a png")  # copied; prepare reports it
    (src / "cat" / "notes.txt").write_text("skip me")
    (src / "cat" / ".hidden.png").write_bytes(b"skip me")
    (src / "dog" / "nested" / "c.jpeg").write_bytes(_jpeg((0, 0, 255)))
    (src / "dog" / "Thumbs.db").write_bytes(b"skip me")
    (src / ".thumbnails" / "x.png").write_bytes(b"skip me")
    (src / "README.md").write_text("skip me")
    out = tmp_path / "data" / "raw"

    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == 4

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["cat/a.png", "cat/b.JPG", "cat/broken.png", "dog/nested/c.jpeg"]
    assert (out / "cat" / "b.JPG").read_bytes() == (src / "cat" / "b.JPG").read_bytes()
    assert (out / "cat" / "a.png").stat().st_ino != (src / "cat" / "a.png").stat().st_ino
    (src / "cat" / "a.png").unlink()
    assert (out / "cat" / "a.png").is_file()  # a snapshot: survives the source's removal
    _no_leftovers(out.parent)

    with pytest.raises(ValidationError, match="needs data.folder"):
        DataConfig(source="imagefolder")
    with pytest.raises(DataError, match="overlaps the output"):
        fetch(DataConfig(source="imagefolder", folder=str(out)), out)
    assert (out / "cat" / "a.png").is_file()



def test_a_dvc_cache_of_link_type_leaves_the_users_images_alone(tmp_path: Path) -> None:
    """A worker's DVC cache links (reflink, hardlink, symlink): had data/raw hard links to the
    user's images, committing it would take those very files into the cache and make them
    read-only."""
    from tasks import environment

    src = tmp_path / "photos"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "a.png").write_bytes(_jpeg((255, 0, 0)))
    (src / "cat" / "a.png").chmod(0o644)
    repo = tmp_path / "repo"
    repo.mkdir()
    env = environment.tool_env()
    dvc = [str(BIN / "dvc")]
    code = f"from bit_core.sources import materialize_folder; materialize_folder({str(src)!r}, 'raw')"
    for args in (["git", "init", "-q"], [*dvc, "init", "-q"],
                 [*dvc, "config", "cache.type", "hardlink,symlink"],
                 [*dvc, "stage", "add", "-q", "-n", "fetch", "-o", "raw",
                  f"{sys.executable} -c \"{code}\""], [*dvc, "repro", "-q"]):
        subprocess.run(args, cwd=repo, env=env, check=True, capture_output=True)
    user = (src / "cat" / "a.png").stat()
    assert (user.st_mode & 0o777, user.st_nlink) == (0o644, 1)
    assert (repo / "raw" / "cat" / "a.png").read_bytes() == (src / "cat" / "a.png").read_bytes()

def test_image_folder_links_are_followed_to_their_files_but_not_round_loops(
        tmp_path: Path) -> None:
    """A class folder or an image that is a relative link is snapshotted as the file it points
    to (a link copied as it is would point nowhere from data/raw), and a link back to a folder
    above it is not walked round and round (each turn would add the same images again, under
    the wrong class)."""
    src, pool = tmp_path / "photos", tmp_path / "pool"
    _tree(pool, ["dog/b.png", "dog/d.png", "bird/e.png"])
    _tree(src, ["cat/a.png"])
    (src / "dog").symlink_to("../pool/dog")
    (src / "cat" / "c.png").symlink_to("../../pool/bird/e.png")
    (src / "cat" / "up").symlink_to("..")
    out = tmp_path / "data" / "raw"

    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == 4

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["cat", "cat/a.png", "cat/c.png", "dog", "dog/b.png", "dog/d.png"]
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert (out / "cat/c.png").read_bytes() == (pool / "bird/e.png").read_bytes()
    _no_leftovers(out.parent)

    (src / "cat" / "gone.png").symlink_to("nowhere.png")
    with pytest.raises(DataError, match=r"gone.png is a link to nowhere.png, which does not "
                                        r"exist: fix the link or remove it"):
        fetch(DataConfig(source="imagefolder", folder=str(src)), out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == files


# --- image folders already split -------------------------------------------------------------------

def _tree(root: Path, paths: list[str]) -> Path:
    """A small PNG of its own colour at each path; a path ending in / is an empty folder."""
    for index, name in enumerate(paths):
        if name.endswith("/"):
            (root / name).mkdir(parents=True, exist_ok=True)
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5, 4), (index * 10 % 256, 0, 0)).save(root / name)
    return root


def test_a_folder_split_into_train_and_val_keeps_val_as_the_test_split(tmp_path: Path) -> None:
    src = _tree(tmp_path / "ImageNet2012", ["train/n01/a.png", "train/n01/b.png",
                                            "train/n02/c.png", "val/n01/d.png", "val/n02/e.png"])
    (src / "train" / "n02" / "notes.txt").write_text("not an image")
    out = tmp_path / "data" / "raw"

    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == 5

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["split.json", "train/n01/a.png", "train/n01/b.png", "train/n02/c.png",
                     "val/n01/d.png", "val/n02/e.png"]
    assert (out / "val/n01/d.png").read_bytes() == (src / "val/n01/d.png").read_bytes()
    marker = read_split_marker(out)
    assert marker["splits"] == {"train": "train", "test": "val"}
    assert marker["classes"] == ["n01", "n02"] and marker["images"] == {"train": 3, "test": 2}
    _no_leftovers(out.parent)


def test_a_folder_with_val_and_test_gives_both(tmp_path: Path) -> None:
    src = _tree(tmp_path / "photos", [f"{split}/{c}/{i}.png" for split in ("train", "val", "test")
                                      for c in ("cat", "dog") for i in range(2)])
    out = tmp_path / "raw"

    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == 12
    assert read_split_marker(out)["splits"] == {"train": "train", "val": "val", "test": "test"}


@pytest.mark.parametrize("paths", [
    ["train/a.png", "test/b.png"],
    ["bus/a.png", "car/b.png", "train/c.png"],  # CIFAR-100's vehicles, exported as folders
])
def test_class_folders_named_like_splits_stay_classes(tmp_path: Path, paths: list[str]) -> None:
    src = _tree(tmp_path / "photos", paths)
    out = tmp_path / "raw"

    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == len(paths)
    assert read_split_marker(out) is None
    assert sorted(p.name for p in out.iterdir()) == sorted(p.split("/")[0] for p in paths)



@pytest.mark.parametrize("paths,splits", [
    (["Training/glioma/a.png", "Training/notumor/b.png", "Testing/glioma/c.png",
      "Testing/notumor/d.png"], {"train": "Training", "test": "Testing"}),
    (["train/cat/a.png", "train/dog/b.png", "valid/cat/c.png", "valid/dog/d.png",
      "TEST/cat/e.png", "TEST/dog/f.png"], {"train": "train", "val": "valid", "test": "TEST"}),
])
def test_split_folders_are_known_by_the_names_data_sets_publish_them_under(
        tmp_path: Path, paths: list[str], splits: dict[str, str]) -> None:
    """Kaggle's Training/ and Testing/ are splits, not two classes whose images are sub-folders."""
    src = _tree(tmp_path / "photos", paths)
    out = tmp_path / "raw"
    assert fetch(DataConfig(source="imagefolder", folder=str(src)), out) == len(paths)
    marker = read_split_marker(out)
    assert marker["splits"] == splits and len(marker["classes"]) == 2


def test_two_folders_of_one_split_and_a_broken_class_link_are_one_line_errors(
        tmp_path: Path) -> None:
    src = _tree(tmp_path / "photos", ["train/cat/a.png", "val/cat/b.png", "Validation/cat/c.png"])
    with pytest.raises(DataError, match=r"photos has Validation/ and val/, which name the same "
                                        r"split \(val\): merge them or rename one$"):
        fetch(DataConfig(source="imagefolder", folder=str(src)), tmp_path / "raw")
    src = _tree(tmp_path / "flat", ["cat/a.png", "dog/b.png"])
    (src / "bird").symlink_to(tmp_path / "gone" / "bird")
    with pytest.raises(DataError, match=r"flat/bird is a link to .*gone/bird, which does not "
                                        r"exist: fix the link or remove it$"):
        fetch(DataConfig(source="imagefolder", folder=str(src)), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


SPLIT = ["train/cat/a.png", "train/dog/b.png", "val/cat/c.png", "val/dog/d.png"]


@pytest.mark.parametrize("paths,message", [
    (SPLIT + ["bird/e.png"],
     r"photos mixes split folders \(train, val\) and class folders \(bird\): move the class "
     r"folders into train/ and val/ or test/, or the split folders out$"),
    (SPLIT + ["train/owl/e.png"],
     r"class 'owl' is in .*photos/train but not in .*photos/val: every split needs the same "
     r"class folders; add val/owl/ or remove it from the other splits$"),
    (SPLIT + ["val/owl/e.png", "val/emu/f.png"],
     r"class 'emu' \(and 1 more\) is in .*photos/val but not in .*photos/train: "),
    (SPLIT[:3] + ["val/dog/"],
     r"class folder .*photos/val/dog has no images: add some or remove it$"),
    (SPLIT[:2] + ["val/flat.png"],
     r"split folder .*photos/val has no class folders of images: put its images in "
     r".*photos/val/<class>/$"),
    (SPLIT[2:] + ["test/cat/e.png", "test/dog/f.png"],
     r"photos has val/ and test/ but no train/: add train/<class>/ folders$"),
    (SPLIT[:2],
     r"photos has train/ but no val/ or test/: add one, or set data.folder to .*photos/train to "
     r"split it seeded$"),
])
def test_a_badly_split_folder_is_refused_in_one_line_and_nothing_is_written(
        tmp_path: Path, paths: list[str], message: str) -> None:
    src = _tree(tmp_path / "photos", paths)
    out = tmp_path / "data" / "raw"
    out.mkdir(parents=True)
    (out / "kept.txt").write_text("earlier output")

    with pytest.raises(DataError, match=message) as err:
        fetch(DataConfig(source="imagefolder", folder=str(src)), out)

    assert "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["kept.txt"]
    _no_leftovers(out.parent)


# --- tf_flowers ------------------------------------------------------------------------------------

FLOWER_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def _flower_photos(per_class: int = 2) -> bytes:
    """flower_photos.tgz in the official layout: flower_photos/<class>/<id>_<secret>_n.jpg and
    flower_photos/LICENSE.txt, with folder entries, gzip-compressed."""
    members = {f"flower_photos/{name}/{1000 + 10 * c + i}_5f2e8ee07{c}_n.jpg":
               _jpeg((50 * c, 20 * i, 100)) for c, name in enumerate(FLOWER_CLASSES)
               for i in range(per_class)}
    members["flower_photos/LICENSE.txt"] = b"All images in this archive are licensed under the " \
                                           b"Creative Commons By-Attribution License...\n"
    return tar_bytes(members)


def test_flowers_download_resumes_and_leaves_out_the_licence(http_server: ArchiveServer,
                                                             tmp_path: Path) -> None:
    archive = _flower_photos()
    drop = len(archive) // 2
    url = http_server.add("/mirror/flower_photos.tgz", archive, drop_after=drop)
    out, cache = tmp_path / "data" / "raw", tmp_path / "cache"
    cfg = DataConfig(source="flowers", url=url, md5=md5(archive))

    assert fetch(cfg, out, cache_dir=cache, progress=False) == 10

    assert http_server.ranges("/mirror/flower_photos.tgz") == [None, f"bytes={drop}-"]
    assert (cache / "flower_photos.tgz").read_bytes() == archive
    assert sorted(p.name for p in out.iterdir()) == FLOWER_CLASSES
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) == 10 and all(f.endswith("_n.jpg") for f in files)  # no LICENSE.txt
    assert read_split_marker(out) is None  # no official split: prepare draws all three
    _no_leftovers(out.parent)


def test_flowers_must_match_the_published_sha256_unless_given_an_md5(http_server: ArchiveServer,
                                                                     tmp_path: Path) -> None:
    archive = _flower_photos(1)
    url = http_server.add("/flower_photos.tgz", archive)
    out, cache = tmp_path / "raw", tmp_path / "cache"

    with pytest.raises(DataError, match=r"sha256 mismatch for .*flower_photos.tgz: expected "
                                        r"4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e"):
        fetch(DataConfig(source="flowers", url=url), out, cache_dir=cache, progress=False)
    with pytest.raises(DataError, match=r"md5 mismatch .*expected 0{32}"):
        fetch(DataConfig(source="flowers", url=url, md5="0" * 32), out, cache_dir=cache,
              progress=False)
    assert not out.exists() and list(cache.iterdir()) == []

    local = tmp_path / "flower_photos.tgz"
    local.write_bytes(archive)
    with pytest.raises(DataError, match=rf"^{local} has sha256 [0-9a-f]{{64}}, expected 4c54ace7.* "
                       rf"\({len(archive)} bytes, the official file has 228813984: truncated\?\): "
                       r"it is not the official flower_photos.tgz; download "
                       r"http://download.tensorflow.org/example_images/flower_photos.tgz again, "
                       r"or set data.md5 for a re-packed archive$"):
        fetch(DataConfig(source="flowers", archive=str(local)), out)
    with pytest.raises(DataError, match=rf"^{local} has md5 {md5(archive)}, not data.md5 0{{32}}: "
                       r"fix data.md5, or the file \(truncated or changed\?\)$"):
        fetch(DataConfig(source="flowers", archive=str(local), md5="0" * 32), out)
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_a_truncated_flowers_archive_is_refused_without_output(tmp_path: Path) -> None:
    archive = _flower_photos(3)
    local = tmp_path / "flower_photos.tgz"
    local.write_bytes(archive[: len(archive) * 2 // 3])  # its md5 given: extraction finds the cut
    out = tmp_path / "raw"

    with pytest.raises(DataError, match=rf"{local} is truncated or corrupt .*download it again$"):
        fetch(DataConfig(source="flowers", archive=str(local), md5=md5(local.read_bytes())), out)

    assert not out.exists()
    _no_leftovers(tmp_path)
