"""`python -m bench --quick`: every section runs and writes results that hold together.

One run of the real command in a subprocess, as `make bench` starts it (so GOMP_SPINCOUNT is
set before torch loads): about a minute, tiny sizes, every section but `precision` (which
fine-tunes the default experiment three times, a slow test of its own). The tests check the schema,
that the numbers are positive, that every ratio, achieved GFLOP/s figure and target is computed
from the numbers reported beside it, and that each training configuration is judged by its real
loss curve against fp32. They assert nothing about speed: how fast this machine is today,
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

from bench import THREAD_ENV
from bench.report import MATRIX_KINDS, NORM_PASSES
from bit_core.align import compare_curves

SECTIONS = ["train", "data", "flops", "overhead", "infer"]  # `precision` runs apart (slow)
TITLES = ["Training", "Inference", "GEMM peak", "Data loading against training",
          "Pipeline overhead", "Headline", "Achieved GFLOP/s against the GEMM peak",
          "Training targets", "Inference targets"]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def bench(repo_root: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, repo_root) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    bench(repo_root, "--quick", "--only", ",".join(SECTIONS), "--out", str(out))
    return out, json.loads((out / "results.json").read_text())


def test_writes_every_section(quick_run) -> None:
    out, results = quick_run
    assert results["schema"] == 3 and results["settings"]["quick"] is True
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
    assert m["cpu_model"] and m["threads"] >= 1
    assert m["gomp_spincount"] == THREAD_ENV["GOMP_SPINCOUNT"]  # as `make bench` sets it
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


def _curve(stored: dict) -> dict[int, float]:
    return {int(step): loss for step, loss in stored.items()}  # JSON keys are strings


def test_training_is_judged_by_its_loss_curve_against_fp32(quick_run) -> None:
    """Each configuration trained real steps; `correct` is the alignment rule on its loss curve
    against its library's fp32 curve, and the fastest correct row is each library's best."""
    train = quick_run[1]["sections"]["train"]
    rows = train["rows"]
    for lib in ("bit_core", "timm"):
        reference = _curve(rows[f"{lib} fp32"]["curve"])
        assert len(reference) == train["curve_steps"]
        for key, r in rows.items():
            if r["library"] != lib:
                continue
            align = compare_curves(_curve(r["curve"]), reference)
            assert align.steps == train["curve_steps"], key
            assert math.isclose(r["loss_mre"], align.mre) and r["correct"] == align.passed, key
        fastest = max((k for k, r in rows.items() if r["library"] == lib and r["correct"]),
                      key=lambda k: rows[k]["img_s"])
        assert train["best"][lib] == fastest


def test_states_the_training_targets(quick_run) -> None:
    results = quick_run[1]
    t, train = results["targets"], results["sections"]["train"]
    ours, theirs = train["rows"][t["bit_core"]], train["rows"][t["timm"]]
    assert close(t["over_timm"], ours["img_s"] / theirs["img_s"])
    flops = results["sections"]["flops"]
    assert close(t["of_peak"], flops["flops_per_image"]["bit_core"]["train"] * ours["img_s"]
                 / 1e9 / flops["peak_gflops"]["bf16"])
    assert t["applies"] == results["machine"]["amx"] and (t["reason"] is None) == t["applies"]
    # what bounds the step: its matrix kernels' share in the profile of that configuration
    b, kinds = t["bound"], train["profiles"][t["bit_core"]]["kinds"]
    share = sum(k["share"] for k in kinds if k["kind"] in MATRIX_KINDS)
    assert close(b["matrix_share"], share) and 0 < share < 1
    assert close(b["of_peak"], t["of_peak"] / share)
    assert close(b["over_timm"], t["over_timm"] / share)
    for name in ("of_peak", "over_timm"):  # matrix time plus what the rest keeps = target step
        assert close(share + b["rest_may_keep"][name] * (1 - share),
                     t[name] / t["goal"][name])
    assert close(b["step_s"], train["batch"] / ours["img_s"])
    # GroupNorm's memory floor: its activations of the step, NORM_PASSES passes of 2 bytes, at the
    # copy bandwidth measured in the flops section
    copy = flops["copy"]
    assert copy["gbs"] > 0 and close(copy["gbs"], 2 * copy["megabytes"] * 2**20 / copy["min_s"]
                                     / 1e9)
    assert close(b["norm_bytes"], flops["norm_elements_per_image"] * train["batch"] * 2
                 * NORM_PASSES)
    assert close(b["norm_floor_s"], b["norm_bytes"] / (copy["gbs"] * 1e9))


def _groupnorm_outputs(resolution: int) -> int:
    """From R50x1's plan: a stem to 1/4 of the side; four stages of (3, 4, 6, 3) pre-activation
    bottlenecks of widths 64..512 (outputs 4x), each normalising its input, and the outputs of its
    1x1 and of its 3x3 convolution (which strides, in the first block of stages 2-4); the head's."""
    side, channels, total = resolution // 4, 64, 0
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for block in range(blocks):
            total += (channels + width) * side * side
            side //= 2 if stage and not block else 1
            total += width * side * side
            channels = 4 * width
    return total + channels * side * side


def test_counts_the_activations_groupnorm_normalises() -> None:
    from bench.measure import norm_elements

    for resolution in (128, 224, 256):
        assert norm_elements(resolution) == _groupnorm_outputs(resolution)
    assert norm_elements(128) == 2_940_928  # pinned: 49 layers at 128 px


def test_states_the_inference_targets(quick_run) -> None:
    results = quick_run[1]
    t, infer = results["infer_targets"], results["sections"]["infer"]
    assert t["batch"] == max(infer["batches"])
    wide, one = infer["rows"][t["wide"]], infer["rows"][t["one"]]
    assert wide["batch"] == t["batch"] and one["batch"] == 1
    assert wide["library"] == one["library"] == "bit_core" and wide["correct"] and one["correct"]
    assert wide["img_s"] == max(r["img_s"] for r in infer["rows"].values()
                                if r["batch"] == t["batch"] and r["library"] == "bit_core"
                                and r["correct"])
    flops = results["sections"]["flops"]
    assert close(t["of_peak"], flops["flops_per_image"]["bit_core"]["forward"] * wide["img_s"]
                 / 1e9 / flops["peak_gflops"]["bf16"])
    assert close(t["batch1_ms"], 1000 * one["min_s"])
    assert t["applies"] == results["machine"]["amx"]


@pytest.mark.slow
def test_precision_section_fine_tunes_the_default_experiment_in_both(tmp_path, repo_root) -> None:
    """The stages' own commands fine-tune params.yaml's experiment a few steps in fp32, in fp32
    channels_last (the rule's control) and in bf16; the MREs reported are those of the loss
    curves written, and every run is scored on the test split."""
    bench(repo_root, "--quick", "--only", "precision", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    s = results["sections"]["precision"]
    curves = {p: _curve(c) for p, c in s["curves"].items()}
    assert list(curves) == ["fp32", "fp32 channels_last", "bf16"]
    assert len(curves["fp32"]) == s["steps"] == 5
    align = compare_curves(curves["bf16"], curves["fp32"])
    assert math.isclose(s["mre"], align.mre) and s["aligned"] == align.passed
    control = compare_curves(curves["fp32 channels_last"], curves["fp32"])
    assert math.isclose(s["control"]["mre"], control.mre)
    assert s["control"]["aligned"] == control.passed
    assert control.mre < 0.05  # five steps: too few for rounding to have grown
    rows = s["rows"]
    assert [r["channels_last"] for r in rows.values()] == [False, True, None]
    assert math.isclose(s["control"]["top1_change"],
                        rows["fp32 channels_last"]["test_top1"] - rows["fp32"]["test_top1"])
    for r in rows.values():
        assert 0 <= r["test_top1"] <= 100 and r["steps"] == s["steps"]
    assert "## bf16 against fp32 on the default experiment" in (tmp_path / "RESULTS.md").read_text()
