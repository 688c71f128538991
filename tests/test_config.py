"""params.yaml validation: the repo's file is valid; typos, wrong types, missing sections are clear."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
import yaml

from bit_core.config import ConfigError, load_params
from flows.overrides import apply_overrides


@pytest.fixture
def params_file(tmp_path, repo_root):
    path = tmp_path / "params.yaml"
    path.write_text((repo_root / "params.yaml").read_text())
    return path


def _edit(path, edit):
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_are_valid(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.data.source == "digits" and params.weights.source == "none"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["train"].__setitem__("batchsize", 8), r"unknown key 'train.batchsize'"),
    (lambda d: d["train"].__setitem__("batch", "many"), r"train.batch = 'many'"),
    (lambda d: d.pop("export"), r"missing section or key 'export'"),
    (lambda d: d["model"].__setitem__("name", "BiT-M-R51x1"), r"unknown model 'BiT-M-R51x1'"),
    (lambda d: d["train"].__setitem__("batch_split", 5), r"not divisible by batch_split"),
    (lambda d: d["weights"].__setitem__("source", "file"), r"needs weights.path"),
    (lambda d: d["data"].__setitem__("source", "mnist"), r"data.source = 'mnist'"),
    (lambda d: d["data"].__setitem__("url", "ftp://ci:pw@h/c.tgz"),
     r"data.url = 'ftp://ci:\*\*\*@h/c.tgz': use an http\(s\) URL, or data.archive for a local"),
    (lambda d: d["weights"].__setitem__("url", "/srv/BiT-M-R50x1.npz"),
     r"weights.url = '/srv/BiT-M-R50x1.npz': use an http\(s\) URL, or weights.path for a local"),
])
def test_bad_params_one_line_naming_the_key(params_file, edit, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_params(_edit(params_file, edit))
    assert "\n" not in str(err.value)
    assert str(params_file) in str(err.value)


def test_non_http_mirror_is_one_line_from_the_stage_entry(params_file, tmp_path, repo_root):
    _edit(params_file, lambda d: d["data"].update(
        source="cifar10", url="ftp://ci:hunter2@mirror.example/cifar-10-python.tar.gz"))
    env = {**os.environ, "BIT_PARAMS": str(params_file), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "tasks.fetch_data", "--out", str(tmp_path / "raw")],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: fetch_data: {params_file}: data.url = 'ftp://ci:***@")
    assert "use an http(s) URL, or data.archive" in proc.stderr and "hunter2" not in proc.stderr


def test_broken_yaml(params_file):
    params_file.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(params_file)
    with pytest.raises(ConfigError, match="not valid YAML at line"):  # an override reads it too
        apply_overrides(params_file, ["train.batch=8"])
    assert params_file.read_text() == "train: [unclosed\n"


@pytest.mark.parametrize("content, message", [
    ("", "is empty: restore it"),
    (None, "is not a YAML text file: give params.yaml"),
    (b"\xff\xfe\x00binary", "is not a YAML text file: give params.yaml"),
])
def test_a_params_file_that_is_no_yaml_is_one_line(tmp_path, content, message):
    path = tmp_path / "params.yaml"
    path.mkdir() if content is None else \
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_params(path)


def test_overrides_keep_comments_and_validate(params_file):
    params = apply_overrides(params_file, ["train.batch=64", "evaluate.batch_sizes=[1, 2]"])
    assert params.train.batch == 64 and params.evaluate.batch_sizes == [1, 2]
    text = params_file.read_text()
    assert "# The only configuration of the pipeline." in text
    assert load_params(params_file).train.batch == 64


def test_overrides_write_the_file_as_a_person_would(params_file):
    before = params_file.read_text().splitlines()
    apply_overrides(params_file, ["train.schedule=[5, 10]", "train.mixup_alpha=null",
                                  "train.stop_after=3"])
    after = params_file.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2, changed
    assert any(re.match(r"  schedule: \[5, 10\] +# warm-up", b) for _, b in changed)
    assert any(re.match(r"  stop_after: 3 +# ", b) for _, b in changed)
    assert any(re.match(r"  mixup_alpha: null +# ", line) for line in after)


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=3", "unknown key 'train.batchsize'"),
    ("train.batch=abc", "train.batch = 'abc'"),
    ("nosection.key=1", "no section 'nosection'"),
    ("train.batch", "not key=value"),
    ("train.batch=[1,", "the value is not valid YAML: close its brackets"),
    ("export.parity_batches=[]", r"export.parity_batches = \[\]: List should have at least 1"),
    ("evaluate.batch_sizes=[0, 4]", "evaluate.batch_sizes.0 = 0: Input should be greater"),
])
def test_bad_override_leaves_file_untouched(params_file, override, message):
    before = params_file.read_text()
    with pytest.raises(ConfigError, match=message):
        apply_overrides(params_file, [override])
    assert params_file.read_text() == before


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "flowers"])
def test_presets_apply_and_validate(params_file, name):
    from flows.overrides import preset_overrides

    params = apply_overrides(params_file, preset_overrides(name))
    assert params.data.source in ("cifar10", "cifar100", "imagenet", "flowers")
    assert params.weights.source == "official" and params.train.schedule is None
    assert "# The only configuration of the pipeline." in params_file.read_text()


RECIPE = ("resolution", "precrop", "flip", "batch", "base_lr", "momentum", "weight_decay",
          "schedule", "mixup_alpha")  # what the BiT-HyperRule and the paper's recipes decide


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "flowers"])
def test_a_preset_sets_the_whole_recipe_whatever_was_there(params_file, tmp_path, name):
    """A preset decides every training value of the paper's recipe (no weight decay, momentum
    0.9, the HyperRule's sizes, schedule and mixup), so a run after another recipe or after
    `-S` changes trains the same as one from the default params.yaml."""
    from flows.overrides import preset_overrides

    changed = tmp_path / "changed.yaml"
    changed.write_text(params_file.read_text())
    fresh = apply_overrides(params_file, preset_overrides(name)).train
    apply_overrides(changed, ["train.resolution=64", "train.precrop=72", "train.flip=false",
                              "train.batch=96", "train.base_lr=0.1", "train.momentum=0.5",
                              "train.weight_decay=0.01", "train.schedule=[5, 10]",
                              "train.mixup_alpha=0.4"])
    after = apply_overrides(changed, preset_overrides(name)).train
    assert {k: getattr(after, k) for k in RECIPE} == {k: getattr(fresh, k) for k in RECIPE}
    assert fresh.weight_decay == 0.0 and fresh.momentum == 0.9


def test_a_preset_leaves_nothing_of_an_earlier_one_but_the_hosts_settings(params_file):
    """data.shots from a few-shot run changes the HyperRule's schedule and mixup, and the
    imagenet preset's 8 processes need 8 devices: neither outlives the next preset. Where
    downloads are cached and how nodes meet are the host's, and stay."""
    from flows.overrides import preset_overrides

    apply_overrides(params_file, preset_overrides("imagenet") + [
        "data.shots=5", "data.url=https://mirror.example/imagenet.tar", "train.stop_after=2",
        "weights.cache_dir=/data/cache", "train.rdzv_endpoint=head:29400"])
    after = apply_overrides(params_file, preset_overrides("cifar10"))
    assert (after.data.shots, after.data.url, after.train.processes, after.train.stop_after) == \
        (None, None, 1, None)
    assert (after.weights.cache_dir, after.train.rdzv_endpoint) == ("/data/cache", "head:29400")


def test_a_key_given_twice_is_one_line_naming_it(params_file):
    from bit_core.config import load_params

    text = params_file.read_text().replace("  batch: 48\n", "  batch: 48\n  batch: 64\n", 1)
    params_file.write_text(text)
    line = text.splitlines().index("  batch: 64") + 1
    for read in (lambda: load_params(params_file),
                 lambda: apply_overrides(params_file, ["train.seed=1"])):
        with pytest.raises(ConfigError, match=rf"params.yaml: key 'batch' is given twice \(line "
                                              rf"{line}\): keep one of them$"):
            read()


def test_yaml_merge_keys_still_load_and_a_list_as_key_is_one_line(tmp_path):
    from bit_core.config import load_params_text

    (tmp_path / "merge.yaml").write_text("base: &b\n  x: 1\ndata:\n  <<: *b\n  x: 2\n")
    assert load_params_text(tmp_path / "merge.yaml") == {"base": {"x": 1}, "data": {"x": 2}}
    (tmp_path / "odd.yaml").write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match=r"odd.yaml: not valid YAML at line 1: fix the syntax$"):
        load_params_text(tmp_path / "odd.yaml")


def test_unknown_preset(params_file):
    from flows.overrides import preset_overrides

    with pytest.raises(ConfigError, match="unknown preset 'cifar11'.*cifar10"):
        preset_overrides("cifar11")
    with pytest.raises(ConfigError, match="unknown preset '../params'"):  # a name, not a path
        preset_overrides("../params")


@pytest.mark.parametrize("override, message", [
    ("data.source=imagefolder", "yaml: data: source 'imagefolder' needs data.folder"),
    ("data.source=imagenet", "source 'imagenet' needs data.imagenet_dir"),
    ("compile.batch_sizes=[1, 1]", r"yaml: compile.batch_sizes = \[1, 1\]: \[1, 1\] has duplicates: "
                                   r"list each size once"),
    ("evaluate.batch_sizes=[4, 8, 4]", r"evaluate.batch_sizes = \[4, 8, 4\]: .* has duplicates"),
    ("registry.margin=.nan", r"registry.margin = nan: Input should be a finite number"),
    ("train.base_lr=.inf", r"train.base_lr = inf: Input should be a finite number"),
    ("registry.model_name=team/bit", r"registry.model_name = 'team/bit': String should match"),
    ("tracking.experiment=''", r"tracking.experiment = '': String should have at least 1"),
    ("weights.sha256=xyz", r"weights.sha256 = 'xyz': String should match pattern"),
    ("compile.batch_sizes=[]", "compile.batch_sizes"),
    ("compile.batch_sizes=[0, 4]", "compile.batch_sizes.0"),
    ("train.rdzv_endpoint=node-a", "train.rdzv_endpoint = 'node-a': write it as host:port"),
    ("train.processes=5", r"micro-batch 48 \(batch / batch_split\) is not divisible by 5 proc"),
    ("train.seed=-1", r"train.seed = -1: .*greater than or equal to 0"),
    ("data.seed=-3", r"data.seed = -3: .*greater than or equal to 0"),
    ("train.schedule.0=5", r"train.schedule is not a section: set it whole, e.g. -S "
                           r"'train.schedule=<value>'"),
])
def test_settings_that_cannot_work_are_refused_in_one_line(params_file, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        apply_overrides(params_file, [override])
    assert "\n" not in str(err.value)


def test_dynamic_batch_needs_gears(params_file):
    with pytest.raises(ConfigError, match="2 to 100 batch sizes"):
        apply_overrides(params_file, ["compile.dynamic_batch=true", "compile.batch_sizes=[8]"])


def test_overrides_keep_the_files_mode_and_write_through_a_link(params_file, tmp_path):
    """params.yaml may hold a mirror's password (chmod 600), or be a link to a shared one."""
    params_file.chmod(0o600)
    apply_overrides(params_file, ["train.seed=5"])
    assert stat.S_IMODE(params_file.stat().st_mode) == 0o600
    link = tmp_path / "linked.yaml"
    link.symlink_to(params_file)
    apply_overrides(link, ["train.seed=6"])
    assert link.is_symlink() and "seed: 6" in params_file.read_text()
