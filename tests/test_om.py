"""OM compilation and ais_bench: stand-in `atc`, `npu-smi` and `ais_bench` executables written
into tmp_path record their argv and mimic the real tools' outputs, so the real subprocess path
runs without Ascend hardware."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bit_core.om import (OMError, ais_bench_command, atc_command, cann_environment, compile_om,
                         detect_soc_version, find_tool, parse_ais_bench,
                         read_ais_outputs, run_ais_bench)

BATCHES = [1, 4, 8, 16, 32, 64]
RES = 128

FAKE_ATC = f"""#!{sys.executable} -I
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ATC_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv, "cwd": os.getcwd()}}) + "\\n")
fail = os.environ.get("FAKE_ATC_FAIL")
if fail and any(a.startswith("--output=") and a.endswith(fail) for a in args):
    print("ATC start working now, please wait for a moment.")
    sys.stderr.write("E19999: Inner Error!\\n")
    sys.stderr.write("ATC run failed, Please check the detail log, Try 'atc --help' for more"
                     " information\\n")
    sys.stderr.write("E10001: Value [image:8,3,128,128] for parameter [--input_shape] is"
                     " invalid.\\n")
    sys.exit(1)
out = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
with open(out + os.environ.get("FAKE_ATC_SUFFIX", "") + ".om", "wb") as om:
    om.write(("OM " + " ".join(args)).encode())
print("ATC run success, welcome to the next use.")
"""

FAKE_NPU_SMI = f"""#!{sys.executable} -I
import os, sys
if sys.argv[1:] != ["info"]:
    sys.exit(2)
sys.stdout.write(open(os.environ["FAKE_NPU_SMI_TABLE"]).read())
sys.exit(int(os.environ.get("FAKE_NPU_SMI_EXIT", "0")))
"""

NPU_SMI_310P3 = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.0                                   Version: 23.0.0                                       |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 1       310P3                 | OK              | NA           40                0     / 0             |
| 0       0                     | 0000:01:00.0    | 0            1622 / 44280                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 1       310P3                 | OK              | NA           39                0     / 0             |
| 1       1                     | 0000:01:00.0    | 0            1403 / 43693                            |
+===============================+=================+======================================================+
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Chip                  | Process id      | Process name             | Process memory(MB)        |
+===============================+=================+======================================================+
| No running processes found in NPU 1                                                                    |
+===============================+=================+======================================================+
"""

NPU_SMI_910B3 = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.6        36                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3162 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | OK            | 89.2        35                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3161 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
"""

AIS_SUMMARY = """\
[INFO] acl init success
[INFO] open device 0 success
[INFO] load model /models/bs8.om success
[INFO] create model description success
[INFO] try get model batchsize:8
[INFO] warm up 1 done
Inference array Processing: 100%|\u2588\u2588\u2588\u2588\u2588| 100/100 [00:00<00:00, 221.13it/s]
[INFO] -----------------Performance Summary------------------
[INFO] H2D_latency (ms): min = 0.0510, max = 0.0730, mean = 0.0560, median = 0.0550, percentile(99%) = 0.0720
[INFO] NPU_compute_time (ms): min = 4.4, max = 4.6, mean = 4.47, median = 4.46, percentile(99%) = 4.58
[INFO] D2H_latency (ms): min = 0.0210, max = 0.0400, mean = 0.0250, median = 0.0240, percentile(99%) = 0.0390
[INFO] throughput 1000*batchsize.mean(8)/NPU_compute_time.mean(4.47): 1789.7091722595078
[INFO] ------------------------------------------------------
[INFO] unload model success, model Id is 1
[INFO] end to reset device 0
[INFO] end to finalize acl
"""

FAKE_AIS_BENCH = f"""\
import json, os, sys
import numpy as np
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
with open(os.environ["FAKE_AIS_LOG"], "w") as log:
    json.dump(args, log)
run_dir = os.path.join(opts["--output"], "2024_05_01-12_00_00")
os.makedirs(run_dir)
batch = int(opts["--batchsize"])
np.save(os.path.join(run_dir, "pure_infer_data_1.npy"), np.ones((batch, 10), np.float32))
np.save(os.path.join(run_dir, "pure_infer_data_0.npy"), np.zeros((batch, 10), np.float32))
sys.stdout.write({AIS_SUMMARY!r})
"""


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty bin dir as the whole PATH, CANN variables unset; returns the bin dir."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    for key in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH", "FAKE_ATC_FAIL", "FAKE_ATC_SUFFIX"):
        monkeypatch.delenv(key, raising=False)
    return bindir


@pytest.fixture
def fake_atc(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in `atc` on PATH; returns the JSON-lines file its invocations are logged to."""
    _write_exe(clean_env / "atc", FAKE_ATC)
    log = tmp_path / "atc.jsonl"
    monkeypatch.setenv("FAKE_ATC_LOG", str(log))
    return log


@pytest.fixture
def fake_npu_smi(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Stand-in `npu-smi` on PATH; call the returned function with the table to print."""
    _write_exe(clean_env / "npu-smi", FAKE_NPU_SMI)
    table = tmp_path / "npu-smi.txt"
    monkeypatch.setenv("FAKE_NPU_SMI_TABLE", str(table))

    def set_table(text: str, exit_code: int = 0) -> None:
        table.write_text(text)
        monkeypatch.setenv("FAKE_NPU_SMI_EXIT", str(exit_code))

    return set_table


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model" / "bit.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not really onnx, the stand-in atc never reads it")
    return path


def _static(atc: str, onnx: Path, out: Path, batch: int, soc: str = "Ascend310P3") -> list[str]:
    return [atc, f"--model={onnx}", "--framework=5", f"--output={out}/bs{batch}",
            "--input_format=NCHW", f"--input_shape=image:{batch},3,{RES},{RES}",
            f"--soc_version={soc}", "--log=error"]


def _dynamic(atc: str, onnx: Path, out: Path, soc: str = "Ascend310P3") -> list[str]:
    return [atc, f"--model={onnx}", "--framework=5", f"--output={out}/dynamic",
            "--input_format=NCHW", f"--input_shape=image:-1,3,{RES},{RES}",
            "--dynamic_batch_size=1,4,8,16,32,64", f"--soc_version={soc}", "--log=error"]


def _logged(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# --- tools and environment ---------------------------------------------------------------------


def test_find_tool_by_name_and_path(clean_env: Path, tmp_path: Path) -> None:
    exe = _write_exe(clean_env / "atc", "#!/bin/sh\n")
    plain = tmp_path / "not-executable"
    plain.write_text("")
    assert find_tool("atc") == str(exe)
    assert find_tool(str(exe)) == str(exe)
    assert find_tool(str(plain)) is None
    assert find_tool("npu-smi") is None
    assert find_tool(str(tmp_path / "nowhere" / "atc")) is None


def test_cann_environment_without_atc(clean_env: Path) -> None:
    env = cann_environment()
    assert env["atc"] is None and env["npu_smi"] is None
    assert env["ascend_toolkit_home"] is None and env["ascend_home_path"] is None
    assert env["missing"].startswith("atc not found on PATH: ")
    assert "set_env.sh" in env["missing"] and "\n" not in env["missing"]


def test_cann_environment_with_tools(fake_atc: Path, fake_npu_smi, clean_env: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest")
    env = cann_environment()
    assert env["atc"] == str(clean_env / "atc")
    assert env["npu_smi"] == str(clean_env / "npu-smi")
    assert env["ascend_toolkit_home"] == "/usr/local/Ascend/ascend-toolkit/latest"
    assert env["missing"] is None


@pytest.mark.parametrize(("table", "soc"), [(NPU_SMI_310P3, "Ascend310P3"),
                                            (NPU_SMI_910B3, "Ascend910B3")])
def test_detect_soc_version_from_npu_smi_table(fake_npu_smi, table: str, soc: str) -> None:
    fake_npu_smi(table)
    assert detect_soc_version() == soc


def test_detect_soc_version_none_when_absent_failing_or_unparsable(fake_npu_smi,
                                                                   clean_env: Path) -> None:
    assert detect_soc_version("no-such-npu-smi") is None
    fake_npu_smi("dcmi module initialize failed. ret is -8005\n")
    assert detect_soc_version() is None
    fake_npu_smi(NPU_SMI_310P3, exit_code=1)
    assert detect_soc_version() is None
    (clean_env / "npu-smi").unlink()
    assert detect_soc_version() is None


# --- ATC command lines -------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
def test_atc_command_static(tmp_path: Path, batch: int) -> None:
    onnx, out = tmp_path / "bit.onnx", tmp_path / "om"
    cmd = atc_command(onnx, out / f"bs{batch}", batch=batch, resolution=RES,
                      soc_version="Ascend310P3")
    assert cmd == _static("atc", onnx, out, batch)


def test_atc_command_dynamic(tmp_path: Path) -> None:
    onnx, out = tmp_path / "bit.onnx", tmp_path / "om"
    cmd = atc_command(onnx, out / "dynamic", batch=None, dynamic_batches=BATCHES,
                      resolution=RES, soc_version="Ascend310P3")
    assert cmd == _dynamic("atc", onnx, out)


@pytest.mark.parametrize(("batch", "gears"), [(None, None), (8, [1, 8]), (0, None),
                                              (None, [8]), (None, [1, 1, 8]), (None, [0, 8])])
def test_atc_command_rejects_bad_batch_arguments(tmp_path: Path, batch, gears) -> None:
    with pytest.raises(OMError):
        atc_command(tmp_path / "m.onnx", tmp_path / "m", batch=batch, dynamic_batches=gears,
                    resolution=RES, soc_version="Ascend310P3")


# --- compile_om --------------------------------------------------------------------------------


def test_compile_om_runs_atc_per_batch_and_writes_manifest(fake_atc: Path, clean_env: Path,
                                                           onnx_file: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "om"
    out.mkdir()
    (out / "bs2.om").write_bytes(b"stale")
    manifest = compile_om(onnx_file, out, batch_sizes=BATCHES, resolution=RES,
                          soc_version="Ascend310P3", dynamic_batch=True).model_dump(mode="json")

    atc = str(clean_env / "atc")
    expected = [_static(atc, onnx_file, out, b) for b in BATCHES] + [_dynamic(atc, onnx_file, out)]
    calls = _logged(fake_atc)
    assert [call["argv"] for call in calls] == expected
    assert all(not Path(call["cwd"]).is_relative_to(out) for call in calls)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"bs{b}.om" for b in BATCHES] + ["dynamic.om", "manifest.json"])

    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["status"] == "built" and manifest["reason"] is None
    assert manifest["soc_version"] == "Ascend310P3" and manifest["resolution"] == RES
    assert manifest["onnx"] == str(onnx_file)
    assert manifest["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert manifest["commands"] == expected
    models = manifest["models"]
    assert [m["batch"] for m in models] == [*BATCHES, None]
    assert [m["file"] for m in models] == [f"bs{b}.om" for b in BATCHES] + ["dynamic.om"]
    assert models[-1]["dynamic_batches"] == BATCHES
    for model, cmd in zip(models, expected, strict=True):
        data = (out / model["file"]).read_bytes()
        assert model["command"] == cmd
        assert model["size_bytes"] == len(data)
        assert model["sha256"] == hashlib.sha256(data).hexdigest()


def test_compile_om_detects_soc_and_finds_platform_suffixed_files(
        fake_atc: Path, fake_npu_smi, onnx_file: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake_npu_smi(NPU_SMI_910B3)
    monkeypatch.setenv("FAKE_ATC_SUFFIX", "_linux_aarch64")
    out = tmp_path / "om"
    manifest = compile_om(onnx_file, out, batch_sizes=[1, 16], resolution=RES, soc_version=None,
                          dynamic_batch=False).model_dump(mode="json")
    assert manifest["soc_version"] == "Ascend910B3"
    assert all(cmd[-2] == "--soc_version=Ascend910B3" for cmd in manifest["commands"])
    assert [m["file"] for m in manifest["models"]] == ["bs1_linux_aarch64.om",
                                                       "bs16_linux_aarch64.om"]
    assert manifest["models"][0]["size_bytes"] == (out / "bs1_linux_aarch64.om").stat().st_size


def test_compile_om_without_soc_version_or_npu_smi_raises(fake_atc: Path, onnx_file: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(OMError, match="soc_version"):
        compile_om(onnx_file, tmp_path / "om", batch_sizes=[1], resolution=RES,
                   soc_version=None, dynamic_batch=False)
    assert not fake_atc.exists()


def test_compile_om_atc_failure_raises_with_stderr_and_writes_no_manifest(
        fake_atc: Path, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "om"
    out.mkdir()
    (out / "manifest.json").write_text('{"status": "ok", "models": ["from an earlier run"]}')
    monkeypatch.setenv("FAKE_ATC_FAIL", "/bs8")
    with pytest.raises(OMError) as info:
        compile_om(onnx_file, out, batch_sizes=BATCHES, resolution=RES,
                   soc_version="Ascend310P3", dynamic_batch=True)
    message = str(info.value)
    assert "bs8" in message and "exit 1" in message
    assert "E10001: Value [image:8,3,128,128] for parameter [--input_shape] is invalid." in message
    assert "\n" not in message
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".manifest.json.*"))
    assert len(_logged(fake_atc)) == 3  # bs1, bs4, then the failing bs8


def test_compile_om_skips_without_atc(clean_env: Path, onnx_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "om"
    out.mkdir()
    (out / "bs1.om").write_bytes(b"stale")
    manifest = compile_om(onnx_file, out, batch_sizes=BATCHES, resolution=RES,
                          soc_version="Ascend310P3", dynamic_batch=True).model_dump(mode="json")
    assert manifest["status"] == "skipped"
    assert manifest["reason"].startswith("atc not found on PATH: ")
    assert manifest["commands"] == ([_static("atc", onnx_file, out, b) for b in BATCHES]
                                    + [_dynamic("atc", onnx_file, out)])
    assert manifest["models"] == []
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_compile_om_skipped_without_soc_uses_placeholder(clean_env: Path, onnx_file: Path,
                                                         tmp_path: Path) -> None:
    manifest = compile_om(onnx_file, tmp_path / "om", batch_sizes=[1], resolution=RES,
                          soc_version=None, dynamic_batch=False).model_dump(mode="json")
    assert manifest["status"] == "skipped" and manifest["soc_version"] is None
    assert "--soc_version=<soc_version>" in manifest["commands"][0]


def test_compile_om_rejects_bad_inputs(clean_env: Path, onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(OMError, match="ONNX model not found"):
        compile_om(tmp_path / "missing.onnx", tmp_path / "om", batch_sizes=[1], resolution=RES,
                   soc_version="Ascend310P3", dynamic_batch=False)
    with pytest.raises(OMError, match="2 to 100"):
        compile_om(onnx_file, tmp_path / "om", batch_sizes=[8], resolution=RES,
                   soc_version="Ascend310P3", dynamic_batch=True)


# --- ais_bench ---------------------------------------------------------------------------------


def test_parse_ais_bench_summary() -> None:
    metrics = parse_ais_bench(AIS_SUMMARY)
    assert metrics == {"fps": pytest.approx(1789.7091722595078), "latency_ms_mean": 4.47,
                       "latency_ms_p50": 4.46, "latency_ms_p99": 4.58}


def test_parse_ais_bench_tolerates_colour_and_missing_percentiles() -> None:
    text = ("\x1b[32m[INFO]\x1b[0m NPU_compute_time (ms): min = 2.456, max = 2.456, "
            "mean = 2.4560000896453857\n"
            "\x1b[32m[INFO]\x1b[0m throughput 1000*batchsize.mean(1)/NPU_compute_time.mean"
            "(2.4560000896453857): 4.0716610891670894e+02\n")
    assert parse_ais_bench(text) == {"fps": pytest.approx(407.16610891670894),
                                     "latency_ms_mean": pytest.approx(2.4560000896453857),
                                     "latency_ms_p50": None, "latency_ms_p99": None}


@pytest.mark.parametrize("text", ["", "[ERROR] load model failed\n",
                                  "[INFO] H2D_latency (ms): min = 0.1, mean = 0.1\n"
                                  "[INFO] throughput 1000*batchsize.mean(8)/x: 12.0\n"])
def test_parse_ais_bench_unparsable(text: str) -> None:
    with pytest.raises(OMError, match="no performance summary"):
        parse_ais_bench(text)


def test_ais_bench_command(tmp_path: Path) -> None:
    om, out = tmp_path / "bs8.om", tmp_path / "ais"
    assert ais_bench_command(om, batch=8, loop=100, output_dir=out, python="python3") == [
        "python3", "-m", "ais_bench", "--model", str(om), "--batchsize", "8", "--loop", "100",
        "--output", str(out), "--outfmt", "NPY", "--device", "0"]
    assert ais_bench_command(om, batch=8, loop=10, output_dir=out, device_id=3,
                             input_path=tmp_path / "inputs") == [
        sys.executable, "-m", "ais_bench", "--model", str(om), "--batchsize", "8", "--loop",
        "10", "--output", str(out), "--outfmt", "NPY", "--device", "3",
        "--input", str(tmp_path / "inputs")]


@pytest.mark.skipif(importlib.util.find_spec("ais_bench") is not None,
                    reason="a real ais_bench is installed here")
def test_run_ais_bench_without_ais_bench_raises(tmp_path: Path) -> None:
    with pytest.raises(OMError, match="ais_bench is not installed: pip install"):
        run_ais_bench(tmp_path / "bs8.om", batch=8, loop=10, output_dir=tmp_path / "ais")


def test_run_ais_bench_with_stand_in_module(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "ais_bench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(FAKE_AIS_BENCH))
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(pkg.parent), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_AIS_LOG", str(tmp_path / "ais_argv.json"))
    om, out = tmp_path / "bs8.om", tmp_path / "ais"
    om.write_bytes(b"om")

    result = run_ais_bench(om, batch=8, loop=100, output_dir=out)
    assert result["fps"] == pytest.approx(1789.7091722595078)
    assert result["latency_ms_mean"] == 4.47 and result["latency_ms_p99"] == 4.58
    assert result["command"] == ais_bench_command(om, batch=8, loop=100, output_dir=out)
    assert json.loads((tmp_path / "ais_argv.json").read_text()) == result["command"][3:]

    outputs = read_ais_outputs(out)
    assert [a.shape for a in outputs] == [(8, 10), (8, 10)]
    assert outputs[0].sum() == 0 and outputs[1].sum() == 80


def test_read_ais_outputs_natural_order(tmp_path: Path) -> None:
    run = tmp_path / "2024_05_01-12_00_00"
    run.mkdir()
    for index in (10, 2, 1):
        np.save(run / f"input_{index}_0.npy", np.full(2, index))
    assert [int(a[0]) for a in read_ais_outputs(tmp_path)] == [1, 2, 10]


def test_read_ais_outputs_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(OMError, match="no .npy outputs"):
        read_ais_outputs(tmp_path)


def test_om_inputs_are_written_one_static_batch_at_a_time(tmp_path: Path) -> None:
    """The test split reaches ais_bench as files of exactly the OM's batch, the last padded
    with zeros, from loader batches of another size (only one file's worth is held)."""
    from tasks.evaluate import write_om_inputs

    images = np.random.default_rng(0).random((23, 3, 4, 4), dtype=np.float32)
    loader = (images[i:i + 5] for i in range(0, 23, 5))  # batches of 5, 5, 5, 5, 3
    assert write_om_inputs(loader, 8, tmp_path) == 23
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["000000.npy", "000001.npy", "000002.npy"]
    written = np.concatenate([np.load(f) for f in files])
    assert written.shape == (24, 3, 4, 4) and written.dtype == np.float32
    assert np.array_equal(written[:23], images) and not written[23:].any()


def test_the_test_split_is_not_read_for_an_om_that_was_not_built(clean_env: Path,
                                                                  onnx_file: Path,
                                                                  tmp_path: Path) -> None:
    """Without ATC (any host but an Ascend one) the OM row is skipped before a single test
    image is read for it: no second pass over the split, nothing held in memory."""
    from tasks.evaluate import _om

    out = tmp_path / "om"
    compile_om(onnx_file, out, batch_sizes=[1], resolution=RES, soc_version=None,
               dynamic_batch=False)

    class Unread:
        def __iter__(self):
            raise AssertionError("the test images were read")

    accuracy, skipped = {}, {}
    assert _om(out, Unread(), np.zeros(3, np.int64), None, accuracy, skipped) == []
    assert accuracy == {} and skipped["om"].startswith("atc not found on PATH: ")
