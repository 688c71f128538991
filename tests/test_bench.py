"""The benchmark suite (`python -m bench`) in quick mode, on its cheap sections.

Runs the real command in a subprocess (as `make bench` does, so OMP_WAIT_POLICY is set before
torch loads) and checks that every requested section is in results.json with positive numbers,
and that every reported ratio and GFLOP/s figure is computed from the reported numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SECTIONS = ["infer", "flops", "scaling"]  # the training section is minutes, even in quick mode


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--only", ",".join(SECTIONS)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def test_writes_every_file(quick_run):
    out, results = quick_run
    assert (out / "RESULTS.md").read_text().startswith("# Benchmark")
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes left nothing behind
    assert sorted(results["sections"]) == sorted(SECTIONS)
    assert results["errors"] == {}
    assert results["settings"]["quick"] is True


def test_machine_description(quick_run):
    m = quick_run[1]["machine"]
    assert m["cpu_model"] and m["usable_cores"] >= 1
    assert m["threads"]["torch_intra_op"] == m["usable_cores"]
    assert isinstance(m["amx"], bool) and isinstance(m["avx512_bf16"], bool)
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"] and m["versions"]["timm"]
    assert m["env"]["OMP_WAIT_POLICY"]


def test_inference_numbers_and_ratios(quick_run):
    infer = quick_run[1]["sections"]["infer"]
    batches = [str(b) for b in infer["batches"]]
    rows = {v["name"]: v for v in infer["variants"]}
    assert {"bit_core eager fp32", "bit_core folded fp32", "bit_core folded bf16 channels_last",
            "timm eager fp32", "ONNX Runtime fp32"} <= set(rows)
    for v in infer["variants"]:
        for b in batches:
            r = v["results"][b]
            assert r["img_s"] > 0 and r["latency_ms"] > 0 and r["median_s"] > 0
            assert close(r["img_s"], int(b) / r["median_s"])
            assert close(r["latency_ms"], 1e3 * r["median_s"])
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert close(r["vs_timm_fp32"],
                         r["img_s"] / rows["timm eager fp32"]["results"][b]["img_s"])
            assert close(r["vs_bit_core_fp32"],
                         r["img_s"] / rows["bit_core eager fp32"]["results"][b]["img_s"])
            assert v["parity"][b]["max_rel_err"] >= 0
        if v["library"] != "timm" and v["precision"] == "fp32":
            assert all(v["parity"][b]["correct"] for b in batches), v["name"]
    assert infer["ratios"]
    for ratio in infer["ratios"]:
        b = str(ratio["batch"])
        assert ratio["numerator_value"] == rows[ratio["numerator"]]["results"][b]["img_s"]
        assert ratio["denominator_value"] == rows[ratio["denominator"]]["results"][b]["img_s"]
        assert ratio["value"] > 0
        assert close(ratio["value"], ratio["numerator_value"] / ratio["denominator_value"])
    for b in batches:
        best = infer["best"]["bit_core"][b]
        assert rows[best]["library"] == "bit_core"
        assert rows[best]["results"][b]["img_s"] == max(
            v["results"][b]["img_s"] for v in infer["variants"]
            if v["library"] == "bit_core" and v["parity"][b]["correct"])


def test_flops_and_utilization(quick_run):
    results = quick_run[1]
    flops = results["sections"]["flops"]
    res = flops["flops"]["resolution"]
    fwd, train = flops["flops"]["bit_core"]["forward"], flops["flops"]["bit_core"]["train"]
    # R50x1: 2.67 GFLOP at 128 px, scaling with the pixel count; backward about twice forward.
    assert close(fwd, 2.67e9 * (res / 128) ** 2, rel=0.01)
    assert 2.5 * fwd < train < 3.1 * fwd
    assert flops["flops"]["timm"] == flops["flops"]["bit_core"]
    peak = flops["gemm"]["peak_gflops"]
    assert peak["fp32"] > 0 and peak["bf16"] > 0
    assert all(run["gflops"] > 0 for run in flops["gemm"]["runs"])
    infer = {v["name"]: v for v in results["sections"]["infer"]["variants"]}
    util = flops["utilization"]
    assert len(util) == sum(len(v["results"]) for v in infer.values())
    for u in util:
        assert u["img_s"] == infer[u["config"]]["results"][str(u["batch"])]["img_s"]
        assert close(u["gflops"], u["gflop_per_image"] * u["img_s"])
        assert close(u["gflop_per_image"], fwd / 1e9)
        assert close(u["fraction_of_peak"], u["gflops"] / peak[u["precision"]])
        assert u["gflops"] > 0


def test_scaling(quick_run):
    scaling = quick_run[1]["sections"]["scaling"]
    for row in scaling["batch"]:
        assert row["img_s"] > 0 and close(row["img_s"], row["batch"] / row["median_s"])
    for row in scaling["resolution"]:
        assert row["gflop_per_image"] > 0 and row["img_s"] > 0
    models = scaling["models"]
    assert [m["model"] for m in models][0] == "BiT-M-R50x1" and len(models) == 6
    assert all(m["params"] > 0 and m["gflop_per_image"] > 0 for m in models)
    assert close(models[0]["weights_mb_fp32"], models[0]["params"] * 4 / 1e6)
    biggest = max(models, key=lambda m: m["params"])
    assert biggest["model"] == "BiT-M-R152x4" and biggest["weights_mb_fp32"] > 3500
    assert any("ms_per_image" in m for m in models)


def test_headline_ratios_come_from_the_tables(quick_run):
    results = quick_run[1]
    assert results["headline"]
    for h in results["headline"]:
        assert close(h["value"], h["numerator_value"] / h["denominator_value"])
        assert h in [dict(r, section=h["section"])
                     for r in results["sections"][h["section"]]["ratios"]]
