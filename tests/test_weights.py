"""Official .npz checkpoints: strict, all-or-nothing loading; verification; no unpickling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_core import create_model
from bit_core.model import build_model
from bit_core.weights import (WeightsError, load_npz, npz_layout, official_url, read_npz,
                              save_npz, verify_npz)

NAME = "BiT-S-R50x1"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A checkpoint in the official layout with the upstream 1000-class head."""
    torch.manual_seed(0)
    model = build_model(NAME)
    torch.nn.init.normal_(model.fc.weight, std=0.01)
    torch.nn.init.normal_(model.fc.bias, std=0.01)
    path = tmp_path_factory.mktemp("w") / f"{NAME}.npz"
    save_npz(model, path)
    return path, model


def _rewrite(src, dst, edit):
    arrays = dict(np.load(src))
    edit(arrays)
    np.savez(dst, **arrays)
    return dst


def _untouched(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_layout_names_official_keys():
    keys = set(npz_layout(build_model(NAME)))
    assert "resnet/root_block/standardized_conv2d/kernel" in keys
    assert "resnet/block1/unit01/a/proj/standardized_conv2d/kernel" in keys
    assert "resnet/block4/unit03/c/group_norm/beta" in keys
    assert {"resnet/group_norm/gamma", "resnet/head/conv2d/kernel", "resnet/head/conv2d/bias"} <= keys
    assert "resnet/block1/unit02/a/proj/standardized_conv2d/kernel" not in keys


def test_head_loaded_when_classes_match(official):
    path, source = official
    model = create_model(NAME, weights=path)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_head_zeroed_for_fine_tuning_even_when_the_class_count_is_the_upstream_one(official):
    """BiT fine-tunes from a zero head: 1000 classes of one's own are not ImageNet's 1000."""
    path, source = official
    model = create_model(NAME, num_classes=source.num_classes, weights=path)
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    assert torch.equal(model.root.conv.weight, source.root.conv.weight)


def test_head_zeroed_when_classes_differ(official):
    path, source = official
    model = create_model(NAME, num_classes=10, weights=path)
    assert torch.count_nonzero(model.fc.weight) == 0 and model.fc.out_channels == 10
    assert torch.equal(model.root.conv.weight, source.root.conv.weight)


def test_kernels_are_hwio_on_disk(official):
    path, source = official
    kernel = np.load(path)["resnet/root_block/standardized_conv2d/kernel"]
    assert kernel.shape == (7, 7, 3, 64)
    assert np.array_equal(kernel.transpose(3, 2, 0, 1), source.root.conv.weight.detach().numpy())


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("resnet/block2/unit03/b/group_norm/gamma"),
     "missing resnet/block2/unit03/b/group_norm/gamma"),
    (lambda a: a.__setitem__("resnet/extra/thing", np.zeros(3)), "unexpected resnet/extra/thing"),
    (lambda a: a.__setitem__("resnet/block1/unit01/b/standardized_conv2d/kernel",
                             np.zeros((3, 3, 64, 32), np.float32)),
     r"resnet/block1/unit01/b/standardized_conv2d/kernel has shape \(3, 3, 64, 32\), expected "
     r"\(3, 3, 64, 64\)"),
])
def test_bad_keys_and_shapes_name_the_problem(official, tmp_path, edit, message):
    bad = _rewrite(official[0], tmp_path / "bad.npz", edit)
    model = build_model(NAME)
    before = _untouched(model)
    with pytest.raises(WeightsError, match=message):
        load_npz(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing may be loaded half-way"


def test_all_problems_reported_together(official, tmp_path):
    def edit(arrays):
        arrays.pop("resnet/group_norm/beta")
        arrays["resnet/bogus"] = np.zeros(1)
    bad = _rewrite(official[0], tmp_path / "bad.npz", edit)
    with pytest.raises(WeightsError) as err:
        load_npz(build_model(NAME), bad)
    assert "missing resnet/group_norm/beta" in str(err.value)
    assert "unexpected resnet/bogus" in str(err.value)
    assert "\n" not in str(err.value)


def test_pickled_object_array_refused(official, tmp_path):
    bad = _rewrite(official[0], tmp_path / "pickled.npz",
                   lambda a: a.__setitem__("resnet/group_norm/beta",
                                           np.array([{"evil": 1}], dtype=object)))
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        read_npz(bad)


def test_a_file_that_is_no_npz_is_named_so(tmp_path):
    """Not a zip at all (an HTML error page saved as .npz, say): numpy would call it a pickle."""
    bad = tmp_path / "BiT-M-R50x1.npz"
    bad.write_text("<html>403 Forbidden</html>")
    with pytest.raises(WeightsError, match=r"is not an .npz file \(not a zip archive\): delete "
                                           r"it and download the official checkpoint again"):
        read_npz(bad)


def test_truncated_file(official, tmp_path):
    data = official[0].read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        create_model(NAME, weights=bad)


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(WeightsError, match="fetch-weights"):
        read_npz(tmp_path / "nope.npz")


def test_verify_checks_the_variant(official):
    verify_npz(official[0], NAME)
    with pytest.raises(WeightsError, match="for BiT-S-R101x1"):
        verify_npz(official[0], "BiT-S-R101x1")


def test_official_url():
    assert official_url("BiT-M-R50x1") == "https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz"
    with pytest.raises(ValueError):
        official_url("ResNet50")


def test_fetch_official_from_mirror_resumes_and_verifies(official, tmp_path, http_server):
    from bit_core.weights import fetch_official

    data = official[0].read_bytes()
    url = http_server.add(f"/bit_models/{NAME}.npz", data, drop_after=len(data) // 3)
    path = fetch_official(NAME, tmp_path / "cache", url=url, progress=False)
    assert path == tmp_path / "cache" / f"{NAME}.npz" and path.read_bytes() == data
    assert http_server.ranges(f"/bit_models/{NAME}.npz")[-1] == f"bytes={len(data) // 3}-"


def test_fetch_official_rejects_wrong_content(official, tmp_path, http_server):
    from bit_core.weights import fetch_official

    url = http_server.add("/bit_models/BiT-S-R101x1.npz", official[0].read_bytes())
    with pytest.raises(WeightsError, match="BiT-S-R101x1"):
        fetch_official("BiT-S-R101x1", tmp_path, url=url, progress=False)
    assert not (tmp_path / "BiT-S-R101x1.npz").exists()


def test_fetch_official_offline_says_where_to_put_it(tmp_path):
    import socket

    from bit_core.download import DownloadError
    from bit_core.weights import fetch_official

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match=str(tmp_path / f"{NAME}.npz")):
        fetch_official(NAME, tmp_path, url=f"http://127.0.0.1:{port}/{NAME}.npz", progress=False)


def test_fetch_weights_stage_records_the_mirror_without_its_password(official, tmp_path,
                                                                     http_server, repo_root):
    import json

    import yaml

    from bit_core.config import parse_params
    from bit_core.contracts import WEIGHTS_SOURCE
    from tasks.fetch_weights import fetch_weights

    data = official[0].read_bytes()
    url = http_server.add(f"/bit_models/{NAME}.npz", data, basic=("ci", "hunter2"))
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["model"]["name"] = NAME
    raw["weights"].update(source="official", cache_dir=str(tmp_path / "cache"),
                          url=url.replace("://", "://ci:hunter2@"))
    record = fetch_weights(parse_params(raw), tmp_path / "out", progress=False)
    written = (tmp_path / "out" / WEIGHTS_SOURCE).read_text()
    assert record["url"] == url.replace("://", "://ci:***@") == json.loads(written)["url"]
    assert "hunter2" not in written


def test_a_local_weights_file_is_checked_against_its_given_digest(official, tmp_path,
                                                                 repo_root):
    """weights.sha256 with weights.source: file names the file and both digests, and nothing
    is written; the right digest passes."""
    import hashlib

    import yaml

    from bit_core.config import parse_params
    from tasks.fetch_weights import fetch_weights

    path, _ = official
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["model"]["name"] = NAME
    raw["weights"].update(source="file", path=str(path), sha256="0" * 64)
    with pytest.raises(WeightsError, match=rf"{path.name} has SHA-256 [0-9a-f]{{64}}, not "
                                           r"weights.sha256 0{64}: give the right file or digest"):
        fetch_weights(parse_params(raw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    raw["weights"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest().upper()
    assert fetch_weights(parse_params(raw), tmp_path / "out", progress=False)["source"] == "file"


@pytest.mark.parametrize("damage", ["truncated", "not torch", "other model"])
def test_an_unreadable_fine_tuned_checkpoint_is_one_line(tmp_path, damage):
    from bit_core.weights import load_trained

    path = tmp_path / "checkpoint.pt"
    model = build_model(NAME, num_classes=3)
    torch.save({"model": model.state_dict(), "model_name": NAME, "num_classes": 3}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100_000])
    elif damage == "not torch":
        path.write_text("not a checkpoint")
    else:
        torch.save({"model": model.state_dict(), "model_name": "BiT-M-R101x1", "num_classes": 3},
                   path)
    with pytest.raises(WeightsError, match=r"checkpoint.pt is not a fine-tuned checkpoint this "
                                           r"pipeline can read \(\w+\): re-run the finetune"):
        load_trained(path)
