"""Stage compile_om: ONNX -> Ascend OM with ATC per batch size; a manifest says what was built.

Where ATC is absent (any machine without the CANN toolkit) the manifest records the exact
commands that would run and why they did not, and the pipeline goes on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bit_core.config import Params
from bit_core.contracts import OMManifest, OMStatus
from bit_core.record import ModelRecord
from bit_core.om import compile_om
from tasks.common import log, stage_main


def compile_stage(params: Params, onnx: Path, out: Path) -> OMManifest:
    """Compile `onnx` at its input resolution for every configured batch size."""
    cfg = params.compile
    return compile_om(onnx, out, batch_sizes=cfg.batch_sizes, resolution=ModelRecord.of_onnx(onnx).resolution,
                      soc_version=cfg.soc_version, dynamic_batch=cfg.dynamic_batch, atc=cfg.atc)


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--out", type=Path, required=True, help="directory for .om files")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Compile ONNX to OM with ATC (skipped with a reason when ATC is absent)."""
    manifest = compile_stage(params, args.onnx, args.out)
    if manifest.status is OMStatus.SKIPPED:
        log.info("OM compilation skipped: %s", manifest.reason)
    else:
        log.info("built %d OM model(s) in %s", len(manifest.models), args.out)


def main(argv=None) -> int:
    return stage_main("compile_om", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
