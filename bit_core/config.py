"""Typed view of params.yaml: one section per pipeline stage, unknown keys and wrong types refused.

params.yaml is the only configuration. Each stage reads its own section; every effective value
is written there (``null`` means "derive it by the BiT-HyperRule"), so ``dvc params diff`` and the
MLflow run show what really ran.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from bit_core.redact import redact
from bit_core.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _distinct(sizes: list[int]) -> list[int]:
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{sizes} has duplicates: list each size once")
    return sizes


BatchSizes = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1),
                       AfterValidator(_distinct)]


def _mirror_url(local_key: str) -> AfterValidator:
    """A validator admitting only http(s) URLs; a local file goes in `local_key` instead."""

    def check(url: str | None) -> str | None:
        if url and not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"use an http(s) URL, or {local_key} for a local file")
        return url

    return AfterValidator(check)


def _host_port(endpoint: str | None) -> str | None:
    """host:port, the form torchrun's rendezvous endpoint takes."""
    if endpoint is None:
        return None
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("write it as host:port, e.g. 10.0.0.1:29400")
    return endpoint


class DataConfig(_Section):
    """Where images come from and how they are split."""

    source: Literal["digits", "cifar10", "cifar100", "flowers", "imagefolder", "imagenet"] = "digits"
    url: Annotated[str | None, _mirror_url("data.archive")] = None  # mirror of the archive
    archive: str | None = None  # a local copy of the downloadable archive
    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$")  # url/archive MD5 when not the official file
    folder: str | None = None  # imagefolder: class sub-folders, or train/ and val/ or test/ of them
    imagenet_dir: str | None = None  # imagenet: directory holding the ILSVRC2012 archives
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    shots: int | None = Field(None, ge=1)  # few-shot: examples per class in train
    dedupe: bool = False  # leave out of train the images whose exact content is held out
    unreadable: Literal["refuse", "skip"] = "refuse"  # images PIL cannot open: stop, or leave out

    @model_validator(mode="after")
    def _location_for_source(self) -> DataConfig:
        if self.source == "imagefolder" and not self.folder:
            raise ValueError("source 'imagefolder' needs data.folder: set it to a directory of "
                             "class sub-folders")
        if self.source == "imagenet" and not self.imagenet_dir:
            raise ValueError("source 'imagenet' needs data.imagenet_dir: set it to the folder "
                             "holding the ILSVRC2012 archives")
        return self


class ModelConfig(_Section):
    """Which BiT variant."""

    name: str = "BiT-M-R50x1"

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        from bit_core.variants import get_variant

        get_variant(self.name)
        return self


class WeightsConfig(_Section):
    """Pretrained weights: none (train from scratch), official (download), or a local file."""

    source: Literal["none", "official", "file"] = "none"
    path: str | None = None  # source=file: a local .npz
    url: Annotated[str | None, _mirror_url("weights.path")] = None  # source=official: a mirror
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")  # expected digest, when known
    cache_dir: str = "~/.cache/bit-pipeline"

    @model_validator(mode="after")
    def _path_for_file(self) -> WeightsConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs weights.path: set it to a local .npz")
        return self


class TrainConfig(_Section):
    """Fine-tuning; null values follow the BiT-HyperRule."""

    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    resolution: int | None = Field(None, ge=8)  # crop size
    precrop: int | None = Field(None, ge=8)  # resize before the random crop
    flip: bool = True
    batch: int = Field(512, ge=1)
    batch_split: int = Field(1, ge=1)
    base_lr: float = Field(0.003, gt=0)  # per 512 images; lr = base_lr * batch / 512
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: list[int] | None = None  # step boundaries: warm-up end, decays..., last = stop
    mixup_alpha: float | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool | None = None
    compile: bool | None = None  # torch.compile the training step; null: on for long runs on cpu/cuda
    stop_after: int | None = Field(None, ge=1)  # end early (a smoke run); the schedule is unchanged
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # 0: only the final checkpoint
    workers: int = Field(0, ge=0)
    processes: int = Field(1, ge=1)  # data-parallel processes per host (torchrun + DDP)
    nodes: int = Field(1, ge=1)  # hosts training together, each running `processes` processes
    rdzv_endpoint: Annotated[str | None, AfterValidator(_host_port)] = None  # nodes > 1: host:port, or BIT_RDZV_ENDPOINT
    rdzv_id: str = Field("bit-finetune", min_length=1)  # the same on every node of one run
    join_timeout: int = Field(600, ge=1)  # seconds all nodes have to join the rendezvous
    peer_timeout: int = Field(60, ge=1)  # seconds without a sign of life before a process is lost

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch % self.batch_split:
            raise ValueError(f"batch {self.batch} is not divisible by batch_split "
                             f"{self.batch_split}: choose a divisor")
        if self.schedule is not None and (len(self.schedule) < 2 or self.schedule != sorted(
                set(self.schedule))):
            raise ValueError("schedule must list at least two increasing step numbers")
        if self.precrop and self.resolution and self.precrop < self.resolution:
            raise ValueError("precrop must be at least resolution")
        world = self.nodes * self.processes
        if (self.batch // self.batch_split) % world:
            raise ValueError(f"micro-batch {self.batch // self.batch_split} (batch / batch_split) "
                             f"is not divisible by {world} processes (nodes x processes): change "
                             "train.batch")
        return self


class ExportConfig(_Section):
    """ONNX export and its parity check."""

    opset: int = Field(17, ge=13, le=18)  # ATC reads opsets up to 18
    parity_batches: list[Annotated[int, Field(ge=1)]] = Field([1, 3, 8], min_length=1)
    atol: float = Field(1e-4, gt=0)  # parity tolerance: atol + rtol x largest |logit|
    rtol: float = Field(1e-4, ge=0)
    simplify: bool = True


class CompileConfig(_Section):
    """ONNX -> Ascend OM with ATC."""

    soc_version: str | None = None  # e.g. Ascend310P3; null: read from `npu-smi info`
    batch_sizes: BatchSizes = [1, 4, 8, 16, 32, 64]
    dynamic_batch: bool = False
    atc: str = "atc"  # executable name or path

    @model_validator(mode="after")
    def _batches(self) -> CompileConfig:
        if self.dynamic_batch and not 2 <= len(self.batch_sizes) <= 100:
            raise ValueError("dynamic_batch needs 2 to 100 batch sizes (ATC's gears)")
        return self


class OpenVINOConfig(_Section):
    """ONNX -> OpenVINO IR for x86-64 CPUs (fp32, and int8 by NNCF post-training quantization)."""

    build: bool = True  # false: build no IR (the stage records why)
    int8: bool = True  # also an int8 IR, calibrated on training images
    calibration_images: int = Field(300, ge=1)  # training images NNCF calibrates on


class EvaluateConfig(_Section):
    """Accuracy and speed of every back-end."""

    batch_sizes: BatchSizes = [1, 4, 8, 16, 32, 64]
    warmup: int = Field(2, ge=0)
    repeats: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    threads: int | None = Field(None, ge=1)
    compiled: bool = True  # torch.compile rows, where the device has fast bf16/fp16 (slow to build)


class TrackingConfig(_Section):
    """MLflow."""

    experiment: str = Field("bit-pipeline", min_length=1)


class RegistryConfig(_Section):
    """MLflow Model Registry: champion / challenger."""

    model_name: str = Field("bit-classifier", pattern=r"^[^/:]+$")  # MLflow refuses / and :
    metric: str = "onnxruntime_top1"  # a key of reports/eval/metrics.json; higher is better
    margin: float = 0.0  # promote when new >= champion + margin


class Params(_Section):
    """The whole params.yaml."""

    data: DataConfig
    model: ModelConfig
    weights: WeightsConfig
    train: TrainConfig
    export: ExportConfig
    compile: CompileConfig
    openvino: OpenVINOConfig
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    registry: RegistryConfig


def _first_error(err: ValidationError, source: str) -> str:
    """One line for the first problem; the value shown is redacted (it may be a URL with a
    password)."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key {key!r}: remove it or fix its spelling"
    if kind == "missing":
        return f"{source}: missing section or key {key!r}: add it (see the README)"
    value, msg = first.get("input"), msg.removeprefix("Value error, ")
    if isinstance(value, dict):  # a rule about the whole section: its values would only clutter
        return redact(f"{source}: {key}: {msg}")
    return redact(f"{source}: {key} = {value!r}: {msg}")


class DuplicateKey(yaml.YAMLError):
    """A mapping names a key twice (PyYAML keeps the last; DVC refuses the file)."""


class _UniqueKeys(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, SafeLoader's to merge
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader refuses it, in one line
                break
            if key in seen:
                raise DuplicateKey(f"key {key!r} is given twice (line "
                                   f"{key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params_text(path: str | Path = "params.yaml") -> object:
    """params.yaml parsed but not yet validated; ConfigError with a one-line message when it is
    missing, unreadable or not YAML."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), _UniqueKeys)  # noqa: S506 - a SafeLoader
    except DuplicateKey as err:
        raise ConfigError(f"{path}: {err}: keep one of them") from None
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run from the repository root") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a YAML text file: give params.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: fix the syntax") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with a one-line message."""
    return parse_params(load_params_text(path), str(path))


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate already-parsed YAML; raise ConfigError naming `source` and the key."""
    if raw is None:
        raise ConfigError(f"{source} is empty: restore it (git checkout {source})")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_first_error(err, source)) from None
