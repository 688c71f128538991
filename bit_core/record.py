"""The model record: what using a trained model takes (its classes and its input), written by
the fine-tune stage into the checkpoint and carried by the export into the ONNX file's metadata,
where every later consumer reads it (compile_om, register, `bit predict`, the served model)."""

from __future__ import annotations

from pathlib import Path

from bit_core.contracts import _Record
from bit_core.errors import ContractError
from bit_core.serving import RECORD_KEY

# BiT's input scaling: x / 255 * 2 - 1, i.e. Normalize(mean 0.5, std 0.5) after ToTensor.
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)


class ModelRecord(_Record):
    """What using a trained model takes: its classes and its input. The fine-tune stage records
    it in the checkpoint; the export carries it into the ONNX file's metadata, where every later
    consumer reads it. Preprocessing: resize the image to ``resolution`` square, scale to
    [0, 1], normalise with ``mean`` and ``std``."""

    model_name: str
    classes: list[str]
    resolution: int
    precrop: int
    mean: tuple[float, float, float] = INPUT_MEAN
    std: tuple[float, float, float] = INPUT_STD

    @classmethod
    def of_checkpoint(cls, checkpoint: dict) -> ModelRecord:
        """The record inside a checkpoint written by the fine-tune stage."""
        try:
            return cls(**{key: checkpoint[key] for key in
                          ("model_name", "classes", "resolution", "precrop")})
        except KeyError as err:
            raise ContractError(f"the checkpoint has no {err.args[0]!r}: re-run the finetune "
                                "stage") from None

    def onnx_metadata(self) -> dict[str, str]:
        """The ONNX metadata_props entries that carry this record."""
        return {RECORD_KEY: self.model_dump_json()}

    @classmethod
    def of_onnx(cls, path: Path) -> ModelRecord:
        """The record carried by an ONNX file written by the export stage."""
        import onnx

        try:
            props = {p.key: p.value for p in
                     onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as err:  # noqa: BLE001 - any parse failure means the same to the user
            raise ContractError(f"cannot read ONNX model {path} ({err}): re-run the export_onnx "
                                "stage") from None
        if RECORD_KEY not in props:
            raise ContractError(f"{path} carries no model record: re-run the export_onnx stage")
        return cls.model_validate_json(props[RECORD_KEY])
