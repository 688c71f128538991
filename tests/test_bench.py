"""`python -m bench --quick`: every section runs and writes results that hold together.

One run of the real command in a subprocess, as `make bench` starts it (so OMP_WAIT_POLICY is
set before torch loads): about a minute, tiny sizes, every section. The tests check the schema,
that the numbers are positive, and that every ratio and achieved GFLOP/s figure is computed from
the numbers reported beside it. They assert nothing about speed: how fast this machine is today,
under whatever else runs on it, is not a property of the code.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SECTIONS = ["train", "infer", "flops", "data", "overhead"]
TITLES = ["Training", "Inference", "GEMM peak", "Data loading against training",
          "Pipeline overhead", "Headline", "Achieved GFLOP/s against the GEMM peak"]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def bench(repo_root: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, repo_root) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    bench(repo_root, "--quick", "--out", str(out))
    return out, json.loads((out / "results.json").read_text())


def test_writes_every_section(quick_run) -> None:
    out, results = quick_run
    assert results["schema"] == 2 and results["settings"]["quick"] is True
    assert results["errors"] == {}
    assert list(results["sections"]) == SECTIONS
    markdown = (out / "RESULTS.md").read_text()
    assert markdown.startswith("# Benchmark") and "--quick" in markdown
    assert all(f"## {title}\n" in markdown for title in TITLES)
    assert not list(out.glob(".*.tmp"))  # the atomic writes left nothing behind


def test_states_the_machine(quick_run) -> None:
    m = quick_run[1]["machine"]
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
    assert {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni"} <= set(m["flags"])
    assert m["flags"] == {f: f in flags for f in m["flags"]}
    assert m["amx"] == ({"amx_tile", "amx_bf16"} <= flags)
    assert m["cpu_model"] and m["threads"] >= 1 and m["omp_wait_policy"] == "PASSIVE"
    assert all(m["versions"][p] for p in ("torch", "timm", "onnxruntime", "dvc", "prefect"))
    assert m["elapsed_s"] > 0 and len(m["loadavg_start"]) == len(m["loadavg_end"]) == 3


def test_rows_hold_positive_numbers(quick_run) -> None:
    sections = quick_run[1]["sections"]
    for name, section in sections.items():
        assert section["rows"], name
        for key, r in section["rows"].items():
            assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"], key
            assert r["median_s"] == statistics.median(r["samples_s"]), key
            if "images" in r:
                assert close(r["img_s"], r["images"] / r["min_s"]), key
    for name in ("train", "infer"):
        for key, r in sections[name]["rows"].items():
            assert r["correct"] or r["precision"] != "fp32", key  # fp32 matches the reference
    assert sections["overhead"]["harness_start_s"] > 0


def test_ratios_come_from_the_rows(quick_run) -> None:
    results = quick_run[1]
    for name, section in results["sections"].items():
        rows = section["rows"]
        for r in section["ratios"]:
            assert r["numerator_value"] == rows[r["numerator"]][r["metric"]], r["name"]
            assert r["denominator_value"] == rows[r["denominator"]][r["metric"]], r["name"]
            assert r["value"] > 0 and close(r["value"], r["numerator_value"] /
                                            r["denominator_value"]), r["name"]
            low, high = r["per_round"]
            assert 0 < low <= high, r["name"]
    everything = [{**r, "section": name} for name, s in results["sections"].items()
                  for r in s["ratios"]] + [{**u, "section": "flops"}
                                           for u in results["utilization"]]
    assert results["headline"] and all(h in everything for h in results["headline"])
    assert {h["section"] for h in results["headline"]} == set(SECTIONS)


def test_achieved_gflops_come_from_flops_and_rows(quick_run) -> None:
    results = quick_run[1]
    flops = results["sections"]["flops"]
    per_image = flops["flops_per_image"]
    # R50x1 is 2.67 GFLOP forward at 128 px and grows with the pixel count; timm's is the same.
    scale = (flops["resolution"] / 128) ** 2
    assert math.isclose(per_image["bit_core"]["forward"], 2.67e9 * scale, rel_tol=0.01)
    assert per_image["timm"] == per_image["bit_core"]
    timed = {f"{name}: {k}": r for name in ("train", "infer")
             for k, r in results["sections"][name]["rows"].items()}
    assert [u["numerator"] for u in results["utilization"]] == list(timed)
    for u in results["utilization"]:
        r = timed[u["numerator"]]
        kind = "train" if u["numerator"].startswith("train") else "forward"
        assert u["img_s"] == r["img_s"]
        assert close(u["gflop_per_image"], per_image["bit_core"][kind] / 1e9)
        assert close(u["numerator_value"], u["gflop_per_image"] * u["img_s"])
        peak = flops["peak_gflops"]  # int8 rows are held against the bf16 peak
        assert u["denominator_value"] == peak.get(r["precision"], peak["bf16"])
        assert close(u["value"], u["numerator_value"] / u["denominator_value"])


def test_render_rebuilds_the_same_report(quick_run, tmp_path, repo_root) -> None:
    out, _ = quick_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    bench(repo_root, "--render", "--out", str(tmp_path))
    assert (tmp_path / "RESULTS.md").read_text() == (out / "RESULTS.md").read_text()
