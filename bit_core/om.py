"""Huawei Ascend OM: compile ONNX with ATC, detect the SoC, and benchmark with ais_bench.

Nothing here needs Ascend hardware to import or to plan work. When ATC is missing,
:func:`compile_om` records the commands it would have run in a ``skipped`` manifest instead
of failing, so a pipeline on a CPU/GPU host still produces a well-defined output.

Tools used (all from the CANN toolkit, usually put on PATH by
``source /usr/local/Ascend/ascend-toolkit/set_env.sh``):

* ``atc --model=m.onnx --framework=5 --output=STEM ...`` writes ``STEM.om`` (some versions
  append ``_linux_x86_64`` / ``_linux_aarch64`` before ``.om``).
* ``npu-smi info`` prints a table whose chip rows name the SoC (``310P3``, ``910B3`` ...).
* ``python3 -m ais_bench --model m.om ...`` runs the model and prints a performance summary.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bit_core.contracts import OM_MANIFEST, OMBuild, OMManifest, OMStatus
from bit_core.errors import OMError
from bit_core.io import file_digest

SET_ENV = Path("/usr/local/Ascend/ascend-toolkit/set_env.sh")
DYNAMIC_NAME = "dynamic"
SOC_PLACEHOLDER = "<soc_version>"
AIS_BENCH_HINT = ("pip install the aclruntime and ais_bench wheels from "
                  "https://gitee.com/ascend/tools/tree/master/ais-bench_workload/tool/ais_bench "
                  "on a host with CANN")
_TAIL_LINES = 8
_TAIL_CHARS = 1500
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CHIP_ROW = re.compile(r"^\|\s*\d+\s+((?:Ascend)?\d{3}[A-Za-z0-9_]*)\s*\|")
_CHIP_NAME = re.compile(r"Chip\s*Name\s*:\s*((?:Ascend)?\d{3}[A-Za-z0-9_]*)", re.IGNORECASE)

Runner = Callable[..., subprocess.CompletedProcess]


# --- environment -------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """Locate an executable.

    Args:
        name: A bare command name looked up on PATH, or a path to an executable.

    Returns:
        The executable's path, or None when it does not exist or is not executable.
    """
    if os.sep in name or (os.altsep and os.altsep in name):
        path = Path(name).expanduser()
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(name)


def _missing_atc_reason(atc: str, toolkit_home: str | None) -> str:
    """One-line reason why `atc` cannot run, with the fix."""
    where = "on PATH" if os.sep not in atc else f"at {atc}"
    if toolkit_home:
        return (f"{atc} not found {where} although the CANN environment is set "
                f"({toolkit_home}): add {toolkit_home}/bin to PATH or reinstall the CANN toolkit")
    if SET_ENV.is_file():
        return f"{atc} not found {where}: run `source {SET_ENV}` first"
    return f"{atc} not found {where}: install the CANN toolkit and `source {SET_ENV}`"


def cann_environment(*, atc: str = "atc", npu_smi: str = "npu-smi") -> dict[str, Any]:
    """Describe the CANN tools and environment visible to this process.

    Args:
        atc: ATC command name or path.
        npu_smi: npu-smi command name or path.

    Returns:
        ``atc`` and ``npu_smi`` paths (or None), ``ascend_toolkit_home`` and
        ``ascend_home_path`` from the environment (or None), and ``missing``: None when ATC can
        be run, else a one-line reason with the fix.
    """
    toolkit_home = os.environ.get("ASCEND_TOOLKIT_HOME") or None
    home_path = os.environ.get("ASCEND_HOME_PATH") or None
    atc_path = find_tool(atc)
    return {
        "atc": atc_path,
        "npu_smi": find_tool(npu_smi),
        "ascend_toolkit_home": toolkit_home,
        "ascend_home_path": home_path,
        "missing": None if atc_path else _missing_atc_reason(atc, toolkit_home or home_path),
    }


def parse_npu_smi(text: str) -> str | None:
    """Extract the SoC version from ``npu-smi info`` output.

    Args:
        text: The tool's stdout: the ``npu-smi info`` table, or ``Chip Name : ...`` lines.

    Returns:
        The first chip's soc_version for ATC, e.g. ``Ascend310P3``, or None if none is found.
    """
    text = _ANSI.sub("", text)
    for line in text.splitlines():
        match = _CHIP_ROW.match(line.strip()) or _CHIP_NAME.search(line)
        if match:
            name = match.group(1)
            return name if name.startswith("Ascend") else f"Ascend{name}"
    return None


def detect_soc_version(npu_smi: str = "npu-smi") -> str | None:
    """Ask ``npu-smi info`` which Ascend SoC is installed.

    Args:
        npu_smi: npu-smi command name or path.

    Returns:
        The soc_version for ATC (e.g. ``Ascend310P3``), or None when the tool is absent, fails
        or prints nothing recognisable.
    """
    path = find_tool(npu_smi)
    if path is None:
        return None
    try:
        done = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_npu_smi(done.stdout) if done.returncode == 0 else None


# --- ATC ---------------------------------------------------------------------------------------


def _check_positive(value: int, what: str) -> None:
    """Raise OMError unless `value` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OMError(f"{what} must be a positive integer, got {value!r}: fix the argument")


def _check_dynamic(batches: Sequence[int]) -> None:
    """ATC's --dynamic_batch_size needs 2..100 distinct positive batch sizes."""
    for batch in batches:
        _check_positive(batch, "dynamic batch size")
    if len(set(batches)) != len(batches) or not 2 <= len(batches) <= 100:
        raise OMError(f"dynamic batch sizes {list(batches)} are invalid: ATC needs 2 to 100 "
                      "distinct sizes")


def atc_command(onnx: Path, output_stem: Path, *, batch: int | None, resolution: int,
                soc_version: str, dynamic_batches: list[int] | None = None,
                input_name: str = "image", atc: str = "atc") -> list[str]:
    """Build the ATC command line compiling an NCHW image ONNX model to OM.

    Args:
        onnx: The ONNX model.
        output_stem: Output path without ``.om``; ATC appends the suffix.
        batch: Static batch size; None for a dynamic-batch model.
        resolution: Square input side in pixels.
        soc_version: Target SoC, e.g. ``Ascend310P3``.
        dynamic_batches: Batch sizes ("gears") of a dynamic-batch model; None for static.
        input_name: Name of the model's image input.
        atc: ATC command name or path.

    Returns:
        The argv list.

    Raises:
        OMError: Both or neither of `batch` and `dynamic_batches` given, or bad sizes.
    """
    if (batch is None) == (dynamic_batches is None):
        raise OMError("give exactly one of batch and dynamic_batches to atc_command")
    _check_positive(resolution, "resolution")
    if dynamic_batches is not None:
        _check_dynamic(dynamic_batches)
        shape = f"{input_name}:-1,3,{resolution},{resolution}"
        extra = [f"--dynamic_batch_size={','.join(str(b) for b in dynamic_batches)}"]
    else:
        _check_positive(batch, "batch")
        shape = f"{input_name}:{batch},3,{resolution},{resolution}"
        extra = []
    return [atc, f"--model={onnx}", "--framework=5", f"--output={output_stem}",
            "--input_format=NCHW", f"--input_shape={shape}", *extra,
            f"--soc_version={soc_version}", "--log=error"]


def _tail(text: str) -> str:
    """The last non-empty lines of `text`, joined into one line."""
    lines = [line.strip() for line in _ANSI.sub("", text or "").splitlines() if line.strip()]
    return " | ".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:] or "(no output)"


def find_om(output_stem: Path) -> Path | None:
    """Find the file ATC produced for `output_stem`.

    Args:
        output_stem: The ``--output`` value given to ATC.

    Returns:
        ``STEM.om`` if present, else a ``STEM_<suffix>.om`` (e.g. ``STEM_linux_x86_64.om``), or
        None.
    """
    exact = output_stem.with_name(output_stem.name + ".om")
    if exact.is_file():
        return exact
    pattern = re.compile(re.escape(output_stem.name) + r"_[A-Za-z][A-Za-z0-9_]*\.om")
    found = sorted(p for p in output_stem.parent.glob(f"{output_stem.name}_*.om")
                   if pattern.fullmatch(p.name) and p.is_file())
    return found[0] if found else None


def _plan(onnx: Path, out_dir: Path, batch_sizes: list[int], resolution: int, soc_version: str,
          dynamic_batch: bool, input_name: str, atc: str) -> list[dict[str, Any]]:
    """One build per static batch size, plus the dynamic-batch build when asked."""
    builds = []
    for batch in batch_sizes:
        stem = out_dir / f"bs{batch}"
        cmd = atc_command(onnx, stem, batch=batch, resolution=resolution,
                          soc_version=soc_version, input_name=input_name, atc=atc)
        builds.append({"name": stem.name, "batch": batch, "dynamic_batches": None,
                       "stem": stem, "command": cmd})
    if dynamic_batch:
        gears = sorted(batch_sizes)
        stem = out_dir / DYNAMIC_NAME
        cmd = atc_command(onnx, stem, batch=None, dynamic_batches=gears, resolution=resolution,
                          soc_version=soc_version, input_name=input_name, atc=atc)
        builds.append({"name": stem.name, "batch": None, "dynamic_batches": gears,
                       "stem": stem, "command": cmd})
    return builds


def _clear_outputs(out_dir: Path) -> None:
    """Create `out_dir` and remove .om files and the manifest left by earlier runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.om"):
        stale.unlink()
    (out_dir / OM_MANIFEST).unlink(missing_ok=True)


def _run_atc(build: dict[str, Any], runner: Runner, workdir: str) -> OMBuild:
    """Run one ATC build and describe the file it produced."""
    name = build["name"]
    try:
        done = runner(build["command"], capture_output=True, text=True, check=False, cwd=workdir)
    except OSError as exc:
        raise OMError(f"could not start ATC for {name}: {exc}: check the CANN install") from exc
    if done.returncode != 0:
        tail = _tail(done.stderr) if (done.stderr or "").strip() else _tail(done.stdout)
        raise OMError(f"ATC failed for {name} (exit {done.returncode}): {tail} :: check the "
                      "ONNX model, --soc_version and the CANN install")
    produced = find_om(build["stem"])
    if produced is None:
        raise OMError(f"ATC exited 0 but wrote no {build['stem']}.om: check ATC's log "
                      "(~/ascend/log) and disk space")
    return OMBuild(name=name, batch=build["batch"], dynamic_batches=build["dynamic_batches"],
                   file=produced.name, command=build["command"],
                   size_bytes=produced.stat().st_size, sha256=file_digest(produced))


def compile_om(onnx: Path, out_dir: Path, *, batch_sizes: list[int], resolution: int,
               soc_version: str | None, dynamic_batch: bool, atc: str = "atc",
               runner: Runner = subprocess.run, input_name: str = "image") -> OMManifest:
    """Compile `onnx` to one OM per batch size (``bsN.om``) and optionally a dynamic-batch OM.

    Writes ``out_dir/manifest.json`` atomically at the end. Without ATC nothing is compiled:
    the manifest has ``status: skipped``, the reason and the commands that would have run.

    Args:
        onnx: The ONNX model (input `input_name`, NCHW float image).
        out_dir: Output directory; created, and cleared of earlier .om files and manifest.
        batch_sizes: Static batch sizes, one model each.
        resolution: Square input side in pixels.
        soc_version: Target SoC (e.g. ``Ascend310P3``); None detects it with ``npu-smi info``.
        dynamic_batch: Also build ``dynamic.om`` with the batch sizes as ATC gears.
        atc: ATC command name or path.
        runner: ``subprocess.run``-compatible callable used to run ATC.
        input_name: Name of the model's image input.

    Returns:
        The manifest written.

    Raises:
        OMError: Bad arguments, missing ONNX, undetectable SoC or a failing ATC run.
    """
    onnx, out_dir = Path(onnx).resolve(), Path(out_dir).resolve()
    if not onnx.is_file():
        raise OMError(f"ONNX model not found: {onnx}: export it first")
    env = cann_environment(atc=atc)
    _clear_outputs(out_dir)
    if env["missing"]:
        return _skip(onnx, out_dir, batch_sizes, resolution, soc_version, dynamic_batch,
                     input_name, atc, env)
    soc = soc_version or detect_soc_version()
    if not soc:
        raise OMError("no soc_version given and `npu-smi info` did not report one: pass "
                      "soc_version (e.g. Ascend310P3) or run on the Ascend host")
    builds = _plan(onnx, out_dir, batch_sizes, resolution, soc, dynamic_batch, input_name,
                   env["atc"])
    with tempfile.TemporaryDirectory(prefix="atc-") as workdir:  # ATC litters its cwd
        models = [_run_atc(build, runner, workdir) for build in builds]
    manifest = _manifest(OMStatus.BUILT, None, onnx, resolution, soc, dynamic_batch,
                         batch_sizes, input_name, builds, env, models)
    manifest.write(out_dir / OM_MANIFEST)
    return manifest


def _skip(onnx: Path, out_dir: Path, batch_sizes: list[int], resolution: int,
          soc_version: str | None, dynamic_batch: bool, input_name: str, atc: str,
          env: dict[str, Any]) -> OMManifest:
    """Write and return the ``skipped`` manifest listing the would-be ATC commands."""
    soc_version = soc_version or detect_soc_version()  # npu-smi may exist without the toolkit
    builds = _plan(onnx, out_dir, batch_sizes, resolution, soc_version or SOC_PLACEHOLDER,
                   dynamic_batch, input_name, atc)
    manifest = _manifest(OMStatus.SKIPPED, env["missing"], onnx, resolution, soc_version,
                         dynamic_batch, batch_sizes, input_name, builds, env, [])
    manifest.write(out_dir / OM_MANIFEST)
    return manifest


def _manifest(status: OMStatus, reason: str | None, onnx: Path, resolution: int,
              soc_version: str | None, dynamic_batch: bool, batch_sizes: list[int],
              input_name: str, builds: list[dict[str, Any]], env: dict[str, Any],
              models: list[OMBuild]) -> OMManifest:
    """The manifest of a compiled or skipped run."""
    return OMManifest(status=status, reason=reason, onnx=str(onnx), onnx_sha256=file_digest(onnx),
                      resolution=resolution, input_name=input_name, soc_version=soc_version,
                      batch_sizes=list(batch_sizes), dynamic_batch=dynamic_batch,
                      commands=[b["command"] for b in builds], models=models, environment=env)


# --- ais_bench ---------------------------------------------------------------------------------


def ais_bench_command(om: Path, *, batch: int, loop: int, output_dir: Path, device_id: int = 0,
                      input_path: Path | None = None, python: str = sys.executable) -> list[str]:
    """Build the ais_bench command line that benchmarks an OM model.

    Args:
        om: The OM model.
        batch: Batch size the model runs with.
        loop: Number of inference loops.
        output_dir: Where ais_bench writes its .npy results and summary.
        device_id: NPU device index.
        input_path: Real input data (.npy/.bin files or a directory of them); None feeds zeros.
        python: Python interpreter that has ais_bench installed.

    Returns:
        The argv list.
    """
    cmd = [python, "-m", "ais_bench", "--model", str(om), "--batchsize", str(batch),
           "--loop", str(loop), "--output", str(output_dir), "--outfmt", "NPY",
           "--device", str(device_id)]
    return cmd + (["--input", str(input_path)] if input_path is not None else [])


def _stats(text: str, metric: str) -> dict[str, float]:
    """``key = value`` pairs of the last ``<metric> (ms): ...`` line in `text`."""
    lines = re.findall(rf"{metric}\s*(?:\(ms\))?\s*:\s*([^\n]*)", text)
    if not lines:
        return {}
    pairs = re.findall(rf"([A-Za-z]+(?:\(\d+%\))?)\s*=\s*({_NUMBER})", lines[-1])
    return {key.lower(): float(value) for key, value in pairs}


def parse_ais_bench(text: str) -> dict[str, float | None]:
    """Read throughput and NPU compute latency from ais_bench's performance summary.

    Args:
        text: ais_bench's console output (stdout and stderr).

    Returns:
        ``fps`` (samples per second), ``latency_ms_mean``, ``latency_ms_p50`` (median) and
        ``latency_ms_p99``; the last two are None when not printed.

    Raises:
        OMError: The output has no throughput or NPU_compute_time mean.
    """
    text = _ANSI.sub("", text)
    throughput = re.findall(rf"throughput\b[^:\n]*:\s*({_NUMBER})", text, re.IGNORECASE)
    compute = _stats(text, "NPU_compute_time")
    if not throughput or "mean" not in compute:
        raise OMError(f"ais_bench output has no performance summary (last lines: {_tail(text)}): "
                      "check that the run finished and printed 'throughput' and "
                      "'NPU_compute_time'")
    return {"fps": float(throughput[-1]), "latency_ms_mean": compute["mean"],
            "latency_ms_p50": compute.get("median"),
            "latency_ms_p99": compute.get("percentile(99%)")}


def run_ais_bench(om: Path, *, batch: int, loop: int, output_dir: Path, device_id: int = 0,
                  input_path: Path | None = None,
                  runner: Runner = subprocess.run) -> dict[str, Any]:
    """Benchmark an OM model with ais_bench on an Ascend NPU.

    Args:
        om: The OM model.
        batch: Batch size the model runs with.
        loop: Number of inference loops.
        output_dir: Where ais_bench writes its results; created.
        device_id: NPU device index.
        input_path: Real input data; None feeds zeros.
        runner: ``subprocess.run``-compatible callable.

    Returns:
        :func:`parse_ais_bench`'s metrics plus the ``command`` run.

    Raises:
        OMError: ais_bench is not installed, the model is missing, or the run failed.
    """
    if importlib.util.find_spec("ais_bench") is None:
        raise OMError(f"ais_bench is not installed: {AIS_BENCH_HINT}")
    if not Path(om).is_file():
        raise OMError(f"OM model not found: {om}: compile it with compile_om first")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    cmd = ais_bench_command(om, batch=batch, loop=loop, output_dir=output_dir,
                            device_id=device_id, input_path=input_path)
    try:
        done = runner(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise OMError(f"could not start ais_bench: {exc}: check the Python interpreter") from exc
    output = f"{done.stdout or ''}\n{done.stderr or ''}"
    if done.returncode != 0:
        raise OMError(f"ais_bench failed (exit {done.returncode}): {_tail(output)} :: check the "
                      "model, --device and the CANN environment")
    return {**parse_ais_bench(output), "command": cmd}


def _natural_key(path: Path) -> list[Any]:
    """Sort key treating digit runs as numbers, so ``x_2`` sorts before ``x_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def read_ais_outputs(output_dir: Path) -> list[Any]:
    """Load the .npy result files ais_bench wrote under `output_dir`.

    ais_bench writes into a timestamped subdirectory of ``--output``, one file per input and
    model output (``<name>_<output index>.npy``); all are found recursively.

    Args:
        output_dir: The ``--output`` directory given to ais_bench.

    Returns:
        numpy arrays, in natural order of their paths relative to `output_dir`.

    Raises:
        OMError: No .npy files were found.
    """
    import numpy as np  # deferred: only needed when reading results

    root = Path(output_dir)
    files = sorted((p for p in root.rglob("*.npy") if p.is_file()),
                   key=lambda p: _natural_key(p.relative_to(root)))
    if not files:
        raise OMError(f"no .npy outputs under {root}: run ais_bench with --outfmt NPY "
                      f"--output {root}")
    return [np.load(path, allow_pickle=False) for path in files]
