"""The benchmark suite (`python -m bench`) in quick mode, on its cheap sections.

Runs the real command in a subprocess (as `make bench` does, so OMP_WAIT_POLICY is set before
torch loads) and checks that every requested section is in results.json with positive numbers,
and that every reported ratio and GFLOP/s figure is computed from the reported numbers. The
overhead section starts a temporary Prefect server and runs real DVC in a temporary repository.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# The training section is minutes, even in quick mode.
SECTIONS = ["infer", "flops", "scaling", "data", "overhead"]


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--only", ",".join(SECTIONS)],
        cwd=repo_root, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text())


def test_writes_every_file(quick_run):
    out, results = quick_run
    markdown = (out / "RESULTS.md").read_text()
    assert markdown.startswith("# Benchmark")
    assert "## 5. Data loading against training" in markdown
    assert "## 6. Pipeline overhead" in markdown
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


def finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_data_loading_against_training(quick_run):
    results = quick_run[1]
    data, settings = results["sections"]["data"], results["settings"]
    workers = data["workers"]
    assert workers[:2] == [0, 1] and workers == sorted(set(workers))
    assert max(workers) <= max(results["machine"]["usable_cores"], 1)
    assert [size["name"] for size in data["sizes"]] == list(settings["data_sizes"])
    ratios = {r["numerator"]: r for r in data["ratios"]}
    assert len(ratios) == len(data["ratios"]) == sum(len(s["loaders"]) for s in data["sizes"])
    for size in data["sizes"]:
        spec = settings["data_sizes"][size["name"]]
        assert size["images"] == settings["data_images"] and size["mean_file_kb"] > 0
        assert (size["precrop"], size["crop"]) == (spec["precrop"], spec["crop"])
        train = size["train"]
        assert train["batch"] == spec["train_batch"] and finite_positive(train["img_s"])
        assert close(train["img_s"], train["batch"] / train["median_s"])
        assert train["min_s"] <= train["median_s"] <= train["max_s"]
        assert len(train["samples_s"]) == data["rounds"] == settings["data_repeats"]
        assert sorted((r["workers"], r["cache"]) for r in size["loaders"]) == sorted(
            (w, c) for w in workers for c in spec["cache"])
        for r in size["loaders"]:
            # The real transform ran: batches of crop x crop RGB images.
            assert r["batch_shape"] == [size["loader_batch"], 3, size["crop"], size["crop"]]
            assert r["images"] == size["batches_per_round"] * size["loader_batch"]
            assert size["batches_per_round"] == spec["batches"]
            assert r["steady_images"] == (spec["batches"] - spec["batches"] // 2) * size[
                "loader_batch"]
            assert finite_positive(r["img_s"], r["round_img_s"], r["first_batch_s"],
                                   r["headroom"])
            assert close(r["img_s"], r["steady_images"] / r["median_s"])
            assert close(r["round_img_s"], r["images"] / r["round_s"])
            # The steady part and the first batch are both parts of each whole round.
            assert r["median_s"] < r["round_s"] and r["first_batch_s"] < r["round_s"]
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            assert close(r["headroom"], r["img_s"] / train["img_s"])
            ratio = ratios[f"loader {r['name']}"]
            assert ratio["denominator"] == train["name"] and ratio["metric"] == "img_s"
            assert ratio["numerator_value"] == r["img_s"]
            assert ratio["denominator_value"] == train["img_s"]
            assert close(ratio["value"], r["headroom"])
            low, high = ratio["per_round_range"]
            assert 0 < low <= high


def test_pipeline_overhead(quick_run):
    results = quick_run[1]
    overhead, settings = results["sections"]["overhead"], results["settings"]
    rounds = overhead["rounds"]
    dvc = overhead["dvc"]
    assert dvc["noop_confirmed"] is True and dvc["first_repro_ran"] == len(dvc["stages"]) == 3
    assert finite_positive(dvc["first_repro_s"])
    commands = {r["command"]: r for r in dvc["commands"]}
    assert set(commands) == {"dvc repro", "dvc status", "dvc --version", "python -c pass"}
    for r in dvc["commands"]:
        assert finite_positive(r["min_s"]) and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert len(r["samples_s"]) == rounds
    # Deciding that nothing changed costs DVC more than starting an interpreter.
    assert commands["dvc repro"]["median_s"] > commands["python -c pass"]["median_s"]

    prefect = overhead["prefect"]
    tasks = prefect["tasks"]
    assert tasks == settings["overhead_tasks"] and prefect["stages"] == dvc["stages"]
    assert finite_positive(prefect["harness_start_s"])
    rows = {r["name"]: r for r in prefect["variants"]}
    assert len(rows) == 5
    for name, r in rows.items():
        assert finite_positive(r["median_s"]) and len(r["samples_s"]) == rounds
        assert (r["first_run_s"] > 0) if name.startswith("Prefect") else r["first_run_s"] is None
    median = {name: r["median_s"] for name, r in rows.items()}
    loop = median[f"{tasks} subprocesses in a loop"]
    flow = median[f"Prefect flow, {tasks} tasks of one subprocess"]
    empty = median["Prefect flow, no task"]
    stages_loop = median[f"{len(dvc['stages'])} dvc repro --single-item in a loop"]
    stages_flow = median[f"Prefect flow, {len(dvc['stages'])} x flows.pipeline.run_stage"]
    assert flow > loop  # a flow run does more than run the subprocesses
    assert close(prefect["subprocess_overhead_s"], flow - loop)
    assert close(prefect["subprocess_overhead_per_task_s"], (flow - loop) / tasks)
    assert close(prefect["flow_run_s"], empty)
    assert close(prefect["task_overhead_s"], (flow - empty - loop) / tasks)
    assert close(prefect["stage_overhead_s"], stages_flow - stages_loop)
    assert close(prefect["stage_task_overhead_s"],
                 (stages_flow - empty - stages_loop) / len(dvc["stages"]))
    assert len(overhead["ratios"]) == 2
    for ratio in overhead["ratios"]:
        assert ratio["metric"] == "s"
        assert ratio["numerator_value"] == median[ratio["numerator"]]
        assert ratio["denominator_value"] == median[ratio["denominator"]]
        assert close(ratio["value"], ratio["numerator_value"] / ratio["denominator_value"])


def test_headline_ratios_come_from_the_tables(quick_run):
    results = quick_run[1]
    assert results["headline"]
    sections = {h["section"] for h in results["headline"]}
    assert {"infer", "data", "overhead"} <= sections
    assert [h for h in results["headline"] if h["section"] == "data"] == [
        dict(r, section="data") for r in results["sections"]["data"]["ratios"]
        if r["workers"] == 0 and not r["cache"]]
    for h in results["headline"]:
        assert close(h["value"], h["numerator_value"] / h["denominator_value"])
        assert h in [dict(r, section=h["section"])
                     for r in results["sections"][h["section"]]["ratios"]]
