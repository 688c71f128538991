"""What one stage hands to the next: the file names it writes and the typed records in them.

A stage that writes one of these files and a stage that reads it both import the name and the
record from here, so a rename or a new field cannot reach one side only. Records are validated
when read: a manifest from another version of the code fails with one line, not later with a
KeyError, and a status is an enum member, never a string matched by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bit_core.errors import ContractError, DataError

# --- file names inside the stages' output directories ---------------------------------------------

CHECKPOINT = "checkpoint.pt"  # models/finetuned, models/resume
WEIGHTS_FILE = "weights.npz"  # models/pretrained
WEIGHTS_SOURCE = "source.json"  # models/pretrained
ONNX_FILE = "model.onnx"  # models/onnx
OM_MANIFEST = "manifest.json"  # models/om
IR_MANIFEST = "manifest.json"  # models/openvino
SPLIT_MARKER = "split.json"  # data/raw of a source with official train/ and test/ folders
DATA_METRICS = "metrics.json"  # reports/data: the prepare stage's data report numbers
EVALUATION = "metrics.json"  # reports/eval, and in a registered model: the evaluation's numbers
MLFLOW_RUN = "mlflow_run.json"  # models/finetuned (and models/resume while a run is unfinished)

# --- what a flow that starts the fine-tune on several hosts hands each node -----------------------
# (in its environment, in place of train.rdzv_endpoint and train.rdzv_id; flows/nodes.py)

ENDPOINT_ENV = "BIT_RDZV_ENDPOINT"  # host:port of the rendezvous
RDZV_ID_ENV = "BIT_RDZV_ID"  # the run's own meeting name
NODE_RANK_ENV = "BIT_NODE_RANK"  # this node's rank, 0 to train.nodes - 1


def onnx_files(path: Path) -> list[Path]:
    """The files of an exported ONNX model at `path` (models/onnx/:data:`ONNX_FILE`): the graph,
    and the weights file beside it when the export kept them apart (over ~1.8 GB). They go
    everywhere together: ONNX Runtime reads the weights from beside the graph."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]

class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls, path: Path, produced_by: str):
        """Load and validate the record at `path`, written by the stage `produced_by`."""
        path = Path(path)
        if not path.is_file():
            raise ContractError(f"{path} is missing: run the {produced_by} stage")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except ValidationError as err:
            found = err.errors()[0]
            field = ".".join(map(str, found["loc"])) or "the record"
            why = f"{field}: {found['msg']}" + (f" (and {err.error_count() - 1} more)"
                                                 if err.error_count() > 1 else "")
        except ValueError as err:  # not JSON
            why = str(err).splitlines()[0]
        raise ContractError(f"{path} is not a valid {cls.__name__} ({why}): re-run the "
                            f"{produced_by} stage") from None

    def write(self, path: Path) -> Path:
        """Write the record atomically as JSON."""
        from bit_core.io import atomic_write_json

        return atomic_write_json(path, self.model_dump(mode="json"))


# --- export_onnx -> register -------------------------------------------------------------------


class ExportReport(_Record):
    """The export stage's report (a DVC metrics file): the graph and its parity with PyTorch,
    ``max_abs_diff_<random|real>_bs<N>`` per checked batch besides the overall maximum."""

    model_config = ConfigDict(extra="allow")

    opset: int
    onnx_bytes: int
    op_types: list[str]
    max_abs_diff: float
    max_diff_to_tolerance: float  # at most 1: every check within atol + rtol x largest |logit|


# --- evaluate -> register ---------------------------------------------------------------------------


def metric_key(backend: str, measure: str) -> str:
    """The name of a measured value in the evaluation metrics, e.g. ``onnxruntime_top1`` or
    ``torch_fp32_fps_bs8``."""
    return f"{backend}_{measure}"


class EvaluationMetrics(_Record):
    """The evaluate stage's metrics (a flat DVC metrics file): top-1/top-5 and images/s per
    back-end and batch size under :func:`metric_key` names."""

    model_config = ConfigDict(extra="allow")

    test_images: int
    om_skipped: str  # why the OM models were not measured; empty when they were
    cpu: str = ""  # the host CPU and its matrix units, as CpuUnits describes them
    skipped: dict[str, str] = {}  # back-end -> why it was not measured on this host
    gate_missed: dict[str, str] = {}  # back-end -> how far its top-1 missed its accuracy gate
    fastest: dict[str, str] = {}  # "bs<N>" -> the fastest back-end that passed its gate
    # share of the host's CPU time used by anything but the evaluation while it measured speed
    cpu_used_elsewhere_pct: float | None = None

    def values(self) -> dict[str, float]:
        """Every measured number by name."""
        return {k: float(v) for k, v in self.model_dump().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- compile_om -> evaluate -----------------------------------------------------------------------


class OMStatus(StrEnum):
    """What the compile_om stage did."""

    BUILT = "built"  # ATC ran for every planned build
    SKIPPED = "skipped"  # ATC is not available here; `commands` lists what would have run


class OMBuild(BaseModel):
    """One OM file ATC produced."""

    model_config = ConfigDict(extra="forbid")

    name: str
    batch: int | None  # None for the dynamic-batch build
    dynamic_batches: list[int] | None
    file: str  # relative to the manifest's directory
    command: list[str]
    size_bytes: int
    sha256: str


class OMManifest(_Record):
    """The compile_om stage's record of what it built, or why nothing was built."""

    status: OMStatus
    reason: str | None
    onnx: str
    onnx_sha256: str
    resolution: int
    input_name: str
    soc_version: str | None
    batch_sizes: list[int]
    dynamic_batch: bool
    commands: list[list[str]]
    models: list[OMBuild]
    environment: dict[str, Any]

    def static_models(self, directory: Path) -> dict[int, Path]:
        """{batch size: OM file} of the static-batch builds."""
        return {m.batch: Path(directory) / m.file for m in self.models if m.batch is not None}


# --- compile_openvino -> evaluate, register ------------------------------------------------------


class IRStatus(StrEnum):
    """What the compile_openvino stage did."""

    BUILT = "built"  # an fp32 IR, and an int8 one unless `int8_reason` says why not
    SKIPPED = "skipped"  # no OpenVINO here (or openvino.build is false); `reason` says which


class IRManifest(_Record):
    """The compile_openvino stage's record: the OpenVINO IR files by precision, their parity
    on the export's inputs, or why nothing was built.

    An IR holds fp32 (or int8) weights; bf16 is how OpenVINO runs the fp32 IR on a CPU with
    bf16 units (its inference precision), so the bf16 row uses ``files["fp32"]``."""

    status: IRStatus
    reason: str | None
    onnx_sha256: str
    files: dict[str, str]  # "fp32" / "int8" -> .xml relative to the manifest (the .bin beside)
    int8_reason: str | None  # why there is no int8 IR, when there is none
    calibration_images: int  # training images the int8 IR was calibrated on
    # fp32_*: as ExportReport, against the model's exact logits; bf16_* and int8_*: max |logits -
    # the fp32 IR's| and top-1 agreement with it on the real inputs
    parity: dict[str, float]
    versions: dict[str, str]

    def ir(self, directory: Path, precision: str) -> Path | None:
        """The .xml to run at `precision` (bf16 runs the fp32 IR), or None."""
        name = self.files.get("fp32" if precision == "bf16" else precision)
        return Path(directory) / name if name else None


# --- split marker --------------------------------------------------------------------------------

SPLIT_FORMAT = 1
SPLITS = ("train", "val", "test")  # what prepare writes, in this order


def write_split_marker(root: Path, source: str, classes: Sequence[str], images: Mapping[str, int],
                       *, splits: Mapping[str, str] | None = None, **extra: Any) -> None:
    """Write `root`/split.json, which says `root` holds given splits, each a folder of class
    folders: `splits` maps a split (train, and val and/or test) to its folder, by default the
    official ``train/`` and ``test/``."""
    marker = {"format": SPLIT_FORMAT, "source": source,
              "splits": dict(splits or {"train": "train", "test": "test"}),
              "classes": list(classes), "images": dict(images), **extra}
    (Path(root) / SPLIT_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _valid_splits(splits: Any) -> bool:
    """Whether a marker's splits name train and only known splits, each a plain folder name."""
    return (isinstance(splits, dict) and "train" in splits and set(splits) <= set(SPLITS)
            and all(isinstance(f, str) and f not in ("", ".", "..") and not f.startswith(".")
                    and "/" not in f and "\\" not in f for f in splits.values()))


def read_split_marker(root: Path) -> dict[str, Any] | None:
    """The split marker of a fetched data root, or None when it is a plain class-folder root."""
    path = Path(root) / SPLIT_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON: run the fetch_data stage again") from None
    if not isinstance(marker, dict) or marker.get("format") != SPLIT_FORMAT \
            or not _valid_splits(marker.get("splits")):
        raise DataError(f"{path} has an unknown format: run the fetch_data stage again")
    return marker


# --- prepare -> finetune (the data report reaches the MLflow run) ---------------------------------


class DataMetrics(_Record):
    """The numbers of the prepare stage's data report (a flat DVC metrics file, ``DATA_METRICS``
    in its report folder): images per split, sizes, unreadable files and exact duplicates."""

    classes: int
    images_train: int
    images_val: int
    images_test: int
    images_per_class_min: int  # over all splits
    images_per_class_max: int
    bytes: int  # of the readable images; sizes below are theirs too
    width_min: int
    width_median: int
    width_max: int
    height_min: int
    height_median: int
    height_max: int
    unreadable: int  # left out (data.unreadable: skip)
    duplicates_within_splits: int  # extra copies of an image inside one split
    duplicate_groups_across_splits: int  # contents found in more than one split
    test_in_train: int  # train images whose content is also a test image: leakage
    val_in_train: int  # train images whose content is also a validation image
    removed_from_train: int  # by data.dedupe

    def values(self) -> dict[str, float]:
        """Every number by name."""
        return {k: float(v) for k, v in self.model_dump().items()}
