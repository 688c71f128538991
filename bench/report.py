"""Headline ratios, target verdicts (with the evidence for each miss), RESULTS.md and the plot."""

from __future__ import annotations

from pathlib import Path

TARGETS = {
    "train_img_s": 60.0,          # bit_core training images/s, batch 32
    "train_vs_timm_best": 1.3,    # bit_core best / timm best, training
    "infer_img_s_bs32": 300.0,    # bit_core inference images/s at batch 32
    "infer_latency_ms_bs1": 8.0,  # bit_core inference latency at batch 1
    "ort_vs_eager_fp32": 1.5,     # ONNX Runtime / PyTorch eager fp32
}


def _f(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _compile_text(child, in_process) -> str:
    """Compile seconds in the child (what a fresh process pays, with this inductor cache) and
    in the measuring process (the cache warmed by the child)."""
    if child is None and in_process is None:
        return "–"
    return f"{_f(child, 1)} / {_f(in_process, 1)}"


def _ratio_text(r: dict) -> str:
    spread = r.get("per_round_range")
    extra = f" (per round {spread[0]:.2f}–{spread[1]:.2f})" if spread else ""
    return f"**{r['value']:.2f}×**{extra}"


# ------------------------------------------------------------------ headline and targets

def headline(results: dict) -> list[dict]:
    """The ratios shown first: all measured side by side in this run."""
    sections = results["sections"]
    out = []
    train = sections.get("train", {})
    for r in train.get("ratios", []):
        if r["name"] in ("bit_core / timm, fp32", "bit_core best / timm best",
                         "candidate (layer_norm WS) / bit_core fp32",
                         "weight standardisation alone, forward+backward: layer_norm form / "
                         "bit_core"):
            out.append({**r, "section": "train"})
    infer = sections.get("infer", {})
    for r in infer.get("ratios", []):
        if r["name"].split(", batch")[0] in (
                "bit_core best / timm best", "bit_core best / timm eager fp32",
                "ONNX Runtime / PyTorch eager fp32 (bit_core)",
                "candidate (layer_norm WS) / bit_core eager fp32"):
            out.append({**r, "section": "infer"})
    for r in sections.get("data", {}).get("ratios", []):
        if r["workers"] == 0 and not r["cache"]:  # train.workers' default, every image decoded
            out.append({**r, "section": "data"})
    for r in sections.get("overhead", {}).get("ratios", []):
        out.append({**r, "section": "overhead"})
    seen, unique = set(), []
    for r in out:
        key = (r["numerator"], r["denominator"], r.get("batch"), r["section"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def targets(results: dict) -> list[dict]:
    """Each target with the measured value, met or not, and why (from this run's evidence)."""
    s = results["sections"]
    train, infer, compute = s.get("train"), s.get("infer"), s.get("flops")
    machine = results["machine"]
    out = []
    peak = compute["gemm"]["peak_gflops"] if compute else None
    flops = compute["flops"]["bit_core"] if compute else None

    def ceiling(per_image_flops: float) -> str:
        if not peak:
            return ""
        best = max(peak, key=peak.get)
        amx = "AMX present" if machine.get("amx") else (
            "no AMX in the CPU flags, so oneDNN runs bf16 on "
            f"{machine.get('onednn', {}).get('bf16_conv') or 'AVX-512'}")
        return (f"The fastest GEMM measured in this run is {peak[best]:.0f} GFLOP/s ({best}; "
                f"fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} — {amx}); at "
                f"{per_image_flops / 1e9:.2f} GFLOP/image even 100% of that peak gives "
                f"{peak[best] * 1e9 / per_image_flops:.1f} images/s.")

    def load_note() -> str:
        la = machine.get("loadavg_start")
        cores = machine.get("usable_cores")
        if la and cores and la[0] > 0.8 * cores:
            return (f" The machine was shared (load average {la[0]:.1f} on {cores} cores at the "
                    "start), which lowers every absolute number, the GEMM peak included.")
        return ""

    if train and train.get("batch") == 32 and train.get("resolution") == 128:
        configs = {c["name"]: c for c in train["configs"]}
        bit_best = train["best"]["bit_core"]
        timm_best = train["best"]["timm"]
        if bit_best:
            value = configs[bit_best]["img_s"]
            met = value >= TARGETS["train_img_s"]
            why = ""
            if not met:
                need = TARGETS["train_img_s"] * flops["train"] / 1e9 if flops else None
                prof = train.get("profiles", {}).get(bit_best)
                why = (f"Needs {need:.0f} GFLOP/s of model FLOPs. " if need else "") + \
                    ceiling(flops["train"] if flops else 0) + \
                    (f" Convolutions take {_pct(prof['conv_share'])} of a step "
                     f"({bit_best}, torch.profiler): the step is bound by conv compute."
                     if prof else "") + load_note()
            out.append({"target": "training ≥ 60 images/s (batch 32, 128 px)",
                        "measured": f"{value:.1f} images/s ({bit_best})", "met": met,
                        "why": why})
        if bit_best and timm_best:
            value = configs[bit_best]["img_s"] / configs[timm_best]["img_s"]
            met = value >= TARGETS["train_vs_timm_best"]
            why = ""
            if not met:
                prof = train.get("profiles", {}).get(timm_best)
                why = "bit_core and timm build the same network (same parameters and FLOPs) " \
                      "and call the same oneDNN convolutions."
                if prof and prof["conv_share"] > 0:
                    c = prof["conv_share"]
                    goal = TARGETS["train_vs_timm_best"]
                    why += f" In timm's best step ({timm_best}) convolutions take {_pct(c)}"
                    if 1 / c < goal:
                        why += (f"; with identical convolutions bit_core cannot be faster than "
                                f"1/{c:.2f} = {1 / c:.2f}× timm even if all its other work "
                                f"were free.")
                    else:
                        why += (f" and everything else {_pct(1 - c)}; with identical "
                                f"convolutions, {goal}× needs bit_core's non-convolution work "
                                f"to fit in {_pct(1 / goal - c)} of timm's step time.")
                compiled = [c for c in train["configs"] if c["compiled"]]
                eager = train["best"].get("bit_core_eager")
                if compiled and eager:
                    why += (f" torch.compile, which fuses the non-convolution work, runs at "
                            f"{compiled[0]['img_s'] / configs[eager]['img_s']:.2f}× bit_core's "
                            f"best eager configuration ({eager}).")
            out.append({"target": "training ≥ 1.3× timm's best",
                        "measured": f"{value:.2f}× ({bit_best} vs {timm_best})", "met": met,
                        "why": why})
    if infer and infer.get("resolution") == 128:
        rows = {v["name"]: v for v in infer["variants"]}
        best = infer["best"]["bit_core"]
        if best.get("32"):
            value = rows[best["32"]]["results"]["32"]["img_s"]
            met = value >= TARGETS["infer_img_s_bs32"]
            why = ""
            if not met:
                prof = infer.get("profiles", {}).get(f"{best['32']}, batch 32")
                need = TARGETS["infer_img_s_bs32"] * flops["forward"] / 1e9 if flops else None
                why = (f"Needs {need:.0f} GFLOP/s. " if need else "") + \
                    ceiling(flops["forward"] if flops else 0) + \
                    (f" Convolutions take {_pct(prof['conv_share'])} of the batch "
                     f"({best['32']}, torch.profiler)." if prof else "") + load_note()
            out.append({"target": "inference ≥ 300 images/s at batch 32",
                        "measured": f"{value:.1f} images/s ({best['32']})", "met": met,
                        "why": why})
        if best.get("1"):
            value = rows[best["1"]]["results"]["1"]["latency_ms"]
            met = value <= TARGETS["infer_latency_ms_bs1"]
            why = ""
            if not met and flops and peak:
                p = max(peak.values())
                why = (f"One image is {flops['forward'] / 1e9:.2f} GFLOP: 8 ms needs "
                       f"{flops['forward'] / 8e-3 / 1e9:.0f} GFLOP/s; at the measured GEMM peak "
                       f"({p:.0f} GFLOP/s) it takes at least "
                       f"{1e3 * flops['forward'] / (p * 1e9):.1f} ms, and batch 1 runs far below "
                       f"GEMM efficiency (small matrices, 2 threads)." + load_note())
            out.append({"target": "inference latency ≤ 8 ms at batch 1",
                        "measured": f"{value:.1f} ms ({best['1']})", "met": met, "why": why})
        for r in infer["ratios"]:
            if not r["name"].startswith("ONNX Runtime / PyTorch eager fp32"):
                continue
            batch = r["batch"]
            met = r["value"] >= TARGETS["ort_vs_eager_fp32"]
            why = ""
            if not met:
                same = _find(infer["ratios"], batch=batch,
                             name=f"ONNX Runtime / bit_core folded fp32 (same graph in PyTorch), "
                                  f"batch {batch}")
                fold = _find(infer["ratios"], batch=batch,
                             name=f"bit_core folded / bit_core eager fp32, batch {batch}")
                spin = _find(infer["ratios"], batch=batch,
                               name=f"ONNX Runtime spin-wait / PyTorch eager fp32 (bit_core), "
                                    f"batch {batch}")
                why = "ONNX Runtime runs the graph with weight standardisation folded."
                if fold:
                    why += (f" Folding alone changes PyTorch eager by {fold['value']:.2f}× at "
                            f"batch {batch}.")
                if same:
                    why += (f" Against that folded PyTorch model ONNX Runtime is "
                            f"{same['value']:.2f}×: its convolutions, most of the work at this "
                            f"batch, are no faster than PyTorch's oneDNN ones.")
                if spin:
                    why += (f" With intra-op spin-waiting on (ONNX Runtime's default, which "
                            f"bit_core.export.onnx_session turns off) it is "
                            f"{spin['value']:.2f}× eager.")
            out.append({"target": f"ONNX Runtime ≥ 1.5× PyTorch eager fp32 (batch {batch})",
                        "measured": f"{r['value']:.2f}×", "met": met, "why": why})
    return out


# ------------------------------------------------------------------ markdown

def _machine_md(m: dict, settings: dict) -> str:
    v = m["versions"]
    flags = ", ".join(f for f, on in m["flags"].items() if on) or "none"
    missing = ", ".join(f for f, on in m["flags"].items() if not on) or "none"
    one = m.get("onednn", {})
    lines = [
        f"- CPU: {m['cpu_model']}, {m['usable_cores']} usable cores "
        f"({m['logical_cpus']} logical){', virtual machine' if m.get('hypervisor') else ''}, "
        f"{m.get('mem_total_gb')} GB RAM",
        f"- ISA flags present: {flags}; absent: {missing}; "
        f"AMX: **{'yes' if m['amx'] else 'no'}**, avx512_bf16: "
        f"**{'yes' if m['avx512_bf16'] else 'no'}**",
        f"- oneDNN dispatch: isa `{one.get('isa')}`, fp32 conv `{one.get('fp32_conv')}`, "
        f"bf16 conv `{one.get('bf16_conv')}`, bf16 matmul `{one.get('bf16_matmul')}`",
        f"- torch {v['torch']} (CPU capability {m['torch_cpu_capability']}), onnxruntime "
        f"{v['onnxruntime']}, timm {v['timm']}, onnx {v['onnx']}, numpy {v['numpy']}, "
        f"Python {v['python']}",
        f"- threads: torch intra-op {m['threads']['torch_intra_op']}, inter-op "
        f"{m['threads']['torch_inter_op']}, ONNX Runtime intra-op "
        f"{m['threads']['onnxruntime_intra_op']}; OMP_WAIT_POLICY="
        f"{m['env'].get('OMP_WAIT_POLICY')}",
        f"- load average (1/5/15 min) at start {m['loadavg_start']}, at end "
        f"{m.get('loadavg_end')}",
        f"- git commit {m.get('git_commit')}; run took {settings.get('elapsed_s', 0):.0f} s"
        f"{'; **quick mode** (tiny sizes: not comparable to full runs)' if settings['quick'] else ''}",
    ]
    return "\n".join(lines)


def _profile_md(title: str, prof: dict) -> str:
    rows = [[p["op"], p["self_ms"], _pct(p["share"]), p["calls"]] for p in prof["top"]]
    return (f"**{title}** — wall {prof['wall_s']:.2f} s, convolutions "
            f"{_pct(prof['conv_share'])} of self time\n\n"
            + _table(["op", "self ms", "share", "calls"], rows))


def _data_md(t: dict, machine: dict) -> str:
    out = [f"## 5. Data loading against training ({t['model']} {t['precision']})\n",
           f"Generated images with seeded random content, read through the project's path: "
           "`bit_core.splits.scan_folder`, `ImageListDataset` with `train_transform(precrop, crop, "
           "flip)`, and the DataLoader `Trainer` iterates (`Trainer._loader`: `_SeededItems` "
           "under the `_StepBatches` batch sampler, `train.workers` worker processes). Each "
           "round builds a fresh loader, as every `Trainer.fit` does, and reads "
           + ", ".join(f"{z['batches_per_round']} batches of {z['loader_batch']} ({z['name']})"
                       for z in t["sizes"])
           + ". *Loader images/s* are those of the steady part, the round's second half (a "
           "training run keeps one loader for all its steps); *with start-up* counts the whole "
           "round, worker start-up and first batches included (first batch s: the wait for "
           "the first one). *decoded*: "
           "`cache=False`, every image decoded, as in any epoch of a large data set; *cached*: "
           "`cache=True`, decoded images kept in memory (filled before the loader starts), as "
           "the fine-tune stage does for small data sets (`CACHE_LIMIT` in tasks/finetune.py) "
           "from their second epoch on. Training: `Trainer.fit`, one step per round, on images "
           "already transformed and held in memory. Loader rounds and training steps take turns; "
           f"medians of {t['rounds']} rounds. **Headroom** = loader images/s ÷ training "
           "images/s: above 1, loading produces images faster than training consumes them.\n"]
    rows = []
    for size in t["sizes"]:
        train = size["train"]
        source = "×".join(str(v) for v in size["source"])
        for r in size["loaders"]:
            ratio = _find(t["ratios"], numerator=f"loader {r['name']}")
            rows.append([size["name"], f"{size['format']} {source}, {size['mean_file_kb']:.1f} kB",
                         f"{size['precrop']} / {size['crop']}", r["workers"],
                         "cached" if r["cache"] else "decoded", r["img_s"], r["round_img_s"],
                         r["first_batch_s"],
                         f"{train['img_s']:.2f} (batch {train['batch']})",
                         _ratio_text(ratio) if ratio else _f(r["headroom"])])
    out.append(_table(["size", "source images (w×h, mean file)", "precrop / crop", "workers",
                       "mode", "loader images/s", "with start-up", "first batch s",
                       "training images/s",
                       "headroom"], rows) + "\n")
    for size in t["sizes"]:
        serial = _find(size["loaders"], workers=0, cache=False)
        if serial:
            out.append(f"- {size['name']} ({size['crop']} px): with `train.workers: 0` the "
                       f"loading runs inside each step, adding 1/headroom = "
                       f"{_pct(1 / serial['headroom'])} to the step time of "
                       f"{size['train']['batch'] / size['train']['img_s']:.2f} s (batch "
                       f"{size['train']['batch']}).")
    cores = machine.get("usable_cores")
    out.append(f"\nEach figure is measured alone. This machine has {cores} usable cores and "
               f"torch runs {t['torch_threads']} intra-op threads: with `train.workers` ≥ 1 the "
               "loader processes share those cores with the training step's threads, so during "
               "training they take CPU time from it rather than adding cores (with 0 workers the "
               "loading is serial inside the step, see above).\n")
    return "\n".join(out)


def _overhead_md(t: dict) -> str:
    d, p = t["dvc"], t["prefect"]
    out = ["## 6. Pipeline overhead (DVC, Prefect)\n",
           f"**DVC** — a temporary git + DVC repository with {len(d['stages'])} trivial stages "
           f"({' → '.join(d['stages'])}, each a `python -c` writing a small file). The first "
           f"`dvc repro` ran {d['first_repro_ran']} stages in {d['first_repro_s']:.2f} s; then "
           f"median of {t['rounds']} interleaved rounds (`dvc repro` and `dvc status` reported "
           "\"Data and pipelines are up to date.\" and ran no stage, every time):\n"]
    rows = [[r["name"], f"`{r['command']}`", r["median_s"], f"{r['min_s']:.3f}–{r['max_s']:.3f}"]
            for r in d["commands"]]
    out.append(_table(["what", "command", "median s", "min–max s"], rows) + "\n")
    out.append(f"**Prefect** — inside `prefect_test_harness` (a temporary Prefect server, up in "
               f"{p['harness_start_s']:.1f} s), as the project's tests run the flow; each flow ran "
               f"once first (registration), then median of {t['rounds']} interleaved rounds. The "
               f"last variant is the real flow's stage task, `flows.pipeline.run_stage`, over the "
               f"stages above (each a no-op `dvc repro --single-item`, its output streamed into "
               f"the run's log), as `bit-finetune` runs one per stage.\n")
    rows = [[r["name"], r["median_s"], f"{r['min_s']:.3f}–{r['max_s']:.3f}",
             _f(r["first_run_s"])] for r in p["variants"]]
    out.append(_table(["variant", "median s", "min–max s", "first run s"], rows) + "\n")
    out.append(f"- {p['tasks']} trivial tasks: the flow costs {p['subprocess_overhead_s']:+.2f} s "
               f"over the plain loop ({1e3 * p['subprocess_overhead_per_task_s']:+.0f} ms per "
               f"task); a flow run with no task takes {p['flow_run_s']:.2f} s, leaving "
               f"{1e3 * p['task_overhead_s']:+.0f} ms per task (differences of medians: a few "
               "tens of ms either way are noise).\n"
               f"- {len(p['stages'])} no-op DVC stages through `run_stage`: "
               f"{p['stage_overhead_s']:+.2f} s over running the same `dvc repro --single-item` "
               f"commands in a loop ({1e3 * p['stage_overhead_per_stage_s']:+.0f} ms per stage; "
               f"{1e3 * p['stage_task_overhead_s']:+.0f} ms per stage beyond the flow run).\n")
    out.append(_table(["ratio", "value"], [[r["name"], _ratio_text(r)] for r in t["ratios"]])
               + "\n")
    return "\n".join(out)


# On paper: accelerators' dense half-precision peaks from their datasheets, and the fraction of
# peak a ResNet training step sustains: published ResNet-50 mixed-precision training on an A100
# (~2,700 images/s at 224 px, 12.3 GFLOP each) is ~11% of peak; GroupNorm and weight
# standardisation do not fuse into the convolutions as BatchNorm does, so not more than that.
ACCELERATORS = (("1x NVIDIA A100 (bf16, 312 TFLOP/s)", 312e12, 1),
                ("8x Huawei Ascend 910 (fp16, 256 TFLOP/s each)", 256e12, 8))
ASSUMED_UTILIZATION = 0.11
MULTI_DEVICE_EFFICIENCY = 0.90  # DDP all-reduce overlapped with the backward pass
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward; the compute section measures 2.97 for R50x1
CIFAR10_RECIPE_IMAGES = 10_000 * 512  # HyperRule: 10k steps of 512 images


def _projection_md(models: list[dict]) -> str:
    """What the same training code should reach on one GPU and on 8 NPUs (not measured)."""
    rows = []
    for m in models:
        flop = m["gflop_per_image"] * 1e9 * TRAIN_FLOPS_PER_FORWARD
        for name, peak, devices in ACCELERATORS:
            scale = devices * (MULTI_DEVICE_EFFICIENCY if devices > 1 else 1.0)
            img_s = peak * ASSUMED_UTILIZATION * scale / flop
            rows.append([m["model"], name, f"{img_s:,.0f}",
                         f"{CIFAR10_RECIPE_IMAGES / img_s / 60:,.0f}",
                         f"{m['params'] * 16 / 1e9:.1f}"])
    return ("### On paper: one GPU and eight NPUs\n\n"
            f"Not measured here: training images/s at {models[0]['resolution']} px = peak × "
            f"{ASSUMED_UTILIZATION:.0%} sustained × devices × {MULTI_DEVICE_EFFICIENCY:.0%} "
            f"data-parallel efficiency (for more than one) ÷ ({TRAIN_FLOPS_PER_FORWARD} × the "
            "forward FLOPs above). The CIFAR-10 recipe is 10,000 steps of 512 images. Memory per "
            "device for weights, gradients, momentum and an fp32 master copy is 16 bytes per "
            "parameter, before activations (which `train.batch_split` bounds).\n\n"
            + _table(["model", "hardware", "images/s", "CIFAR-10 recipe (min)",
                      "weights+grads+momentum GB"], rows) + "\n")


def markdown(results: dict) -> str:
    s = results["sections"]
    settings = results["settings"]
    out = [f"# Benchmark: bit_core BiT-M-R50x1 vs timm resnetv2_50x1_bit\n",
           f"Generated by `python -m bench` on {results['created']}. Ratios are of medians "
           "measured side by side in this one run (the variants take turns, one batch or step "
           "each per round); the per-round range shows how stable each ratio was. Absolute "
           "numbers are context: they depend on the machine and on its load.\n",
           _machine_md(results["machine"], settings) + "\n"]
    if results.get("errors"):
        out.append("**Sections that failed:** " + "; ".join(
            f"{k}: {v.splitlines()[-1]}" for k, v in results["errors"].items()) + "\n")

    out.append("## Headline ratios\n")
    units = {"img_s": "images/s", "calls_per_s": "calls/s", "s": "s (wall time)"}
    rows = [[h["section"], h["name"], _ratio_text(h),
             f"{_f(h['numerator_value'])} / {_f(h['denominator_value'])} "
             f"{units.get(h['metric'], h['metric'])}",
             f"{h['numerator']} / {h['denominator']}"] for h in results["headline"]]
    out.append(_table(["section", "ratio", "value", "from", "configurations"], rows) + "\n")

    out.append("## Targets\n")
    rows = [[t["target"], t["measured"], "**met**" if t["met"] else "**not met**", t["why"]]
            for t in results["targets"]]
    out.append(_table(["target", "measured", "", "why (evidence from this run)"], rows) + "\n"
               if rows else "No target applies to the sections and sizes of this run.\n")

    if "train" in s:
        t = s["train"]
        out.append(f"## 1. Training ({t['model']} / {t['timm_model']}, batch {t['batch']}, "
                   f"{t['resolution']} px, {t['optimizer']}, median of {t['rounds']} rounds)\n")
        rows = []
        for c in t["configs"]:
            p = c["parity"]
            rows.append([c["name"], c["img_s"], f"{c['median_s']:.2f} ({c['min_s']:.2f}–"
                         f"{c['max_s']:.2f})", f"{p['loss_rel_diff']:.1e}",
                         f"{p['grad_cosine']:.4f} ({p['body_grad_cosine']:.4f} / "
                         f"{p['head_grad_cosine']:.4f})", "yes" if p["correct"] else "**no**",
                         _compile_text(c.get("child_compile_s"), c.get("compile_s"))])
        out.append(_table(["configuration", "images/s", "step s (min–max)", "loss rel. diff",
                           "grad cosine (body / head)", "correct",
                           "compile s (child / in-process)"], rows) + "\n")
        for name, reason in t.get("skipped", {}).items():
            out.append(f"- skipped {name}: {reason}")
        fp32_cl = _find(t["configs"], name="bit_core fp32 channels_last")
        out.append(f"Best correct: bit_core **{t['best']['bit_core']}**, timm "
                   f"**{t['best']['timm']}**. Correct = loss and gradients within "
                   "tolerance of the fp32 channels-first run of the same library (relative loss "
                   "difference ≤ 1e-4 and gradient cosine ≥ 0.999 for fp32; ≤ 2e-2 and ≥ 0.99 "
                   "for bf16). Only the gradient's direction is checked: at this random "
                   "initialisation the body gradient is ill-conditioned"
                   + (f" (the fp32 channels_last gradient differs from the fp32 channels-first "
                      f"one by {100 * fp32_cl['parity']['grad_rel_err']:.1f}% in norm)"
                      if fp32_cl else "") + ", the head gradient is not.\n")
        out.append(_table(["ratio", "value"], [[r["name"], _ratio_text(r)]
                                               for r in t["ratios"]]) + "\n")
        ws = t.get("weight_standardisation")
        if ws:
            out.append(f"Weight standardisation alone ({ws['kernels']} kernels, "
                       f"{ws['weights'] / 1e6:.1f} M weights; median of the rounds; share = of a "
                       f"bit_core fp32 training step):\n")
            rows = [[w["form"], w["forward_ms"], w["forward_backward_ms"],
                     f"{w['speedup_forward']:.2f}× / {w['speedup_forward_backward']:.2f}×",
                     _pct(w["share_of_bit_core_fp32_step"]),
                     f"{w['max_abs_diff']:.1e} / {w['grad_rel_diff']:.1e}"] for w in ws["forms"]]
            out.append(_table(["formulation", "forward ms", "forward+backward ms",
                               "speed-up vs bit_core (fwd / fwd+bwd)", "share of step",
                               "max abs diff / grad rel diff vs bit_core"], rows) + "\n")

    if "infer" in s:
        t = s["infer"]
        out.append(f"## 2. Inference ({t['resolution']} px)\n")
        for batch in t["batches"]:
            key = str(batch)
            rows = []
            for v in t["variants"]:
                r = v["results"].get(key)
                if not r or "img_s" not in r:
                    reason = v["skipped"].get(key)
                    if reason:
                        rows.append([v["name"], "skipped", "", "", "", reason[:80]])
                    continue
                p = v["parity"][key]
                rows.append([v["name"], r["img_s"], r["latency_ms"], _f(r.get("vs_timm_fp32")),
                             _f(r.get("vs_bit_core_fp32")),
                             f"{p['max_rel_err']:.1e}{'' if p['correct'] else ' **wrong**'}"
                             + (f" (top-1 agrees {100 * p['top1_agreement']:.0f}%)"
                                if p["top1_agreement"] < 1 else "")
                             + (f"; compile {_compile_text(r.get('child_compile_s'), r['compile_s'])} s"
                                if "compile_s" in r else "")])
            out.append(f"**Batch {batch}** (best correct: bit_core "
                       f"{t['best']['bit_core'][key]}, timm {t['best']['timm'][key]})\n")
            out.append(_table(["back-end", "images/s", "latency ms", "× timm eager fp32",
                               "× bit_core eager fp32", "max rel. err of logits"], rows) + "\n")
        out.append(_table(["ratio", "value"], [[r["name"], _ratio_text(r)]
                                               for r in t["ratios"]]) + "\n")

    if "flops" in s:
        t = s["flops"]
        f = t["flops"]
        out.append("## 3. Achieved GFLOP/s\n")
        out.append(f"FLOPs per image at {f['resolution']} px (FlopCounterMode): forward "
                   f"{f['bit_core']['forward'] / 1e9:.3f} GFLOP, forward+backward "
                   f"{f['bit_core']['train'] / 1e9:.3f} GFLOP (timm: "
                   f"{f['timm']['forward'] / 1e9:.3f} / {f['timm']['train'] / 1e9:.3f}).\n")
        rows = [[g.get("when", ""), g["dtype"], g["n"], g["median_s"] * 1e3, g["gflops"]]
                for g in t["gemm"]["runs"]]
        out.append("GEMM (torch.mm, n×n, median of repeats; the peak is the best sample of the "
                   "run):\n\n" + _table(["measured", "dtype", "n", "ms", "GFLOP/s"], rows) + "\n")
        b = t["bounds_at_gemm_peak"]
        out.append(f"At the best GEMM peak ({b['precision']}) the model could at most reach "
                   f"{b['train_img_s']:.1f} training images/s, {b['infer_img_s']:.1f} inference "
                   f"images/s, {b['infer_latency_ms_bs1']:.1f} ms per image.\n")
        rows = [[u["section"], u["config"], u["batch"], u["img_s"], u["gflops"],
                 _pct(u["fraction_of_peak"]) + f" of {u['precision']}"]
                for u in t["utilization"]]
        if rows:
            out.append(_table(["section", "configuration", "batch", "images/s", "GFLOP/s",
                               "of GEMM peak"], rows) + "\n")

    if "scaling" in s:
        t = s["scaling"]
        out.append(f"## 4. Scaling ({t['configuration']})\n")
        out.append("![scaling](scaling.png)\n")
        rows = [[r["batch"], r["ms_per_batch"], r["ms_per_image"], r["img_s"], r["gflops"]]
                for r in t["batch"]]
        out.append(_table(["batch", "ms / batch", "ms / image", "images/s", "GFLOP/s"], rows)
                   + "\n")
        rows = [[r["resolution"], r["gflop_per_image"], r["ms_per_image"], r["img_s"],
                 r["gflops"]] for r in t["resolution"]]
        out.append(f"Resolution at batch {t['resolution'][0]['batch']}:\n" if t["resolution"]
                   else "")
        out.append(_table(["px", "GFLOP / image", "ms / image", "images/s", "GFLOP/s"], rows)
                   + "\n")
        fits = t["fits"]
        out.append(f"Power-law exponents between the end points: time per batch ∝ batch^"
                   f"{_f(fits['batch_time_exponent'])}; time per image ∝ px^"
                   f"{_f(fits['resolution_time_exponent'])} (FLOPs ∝ px^"
                   f"{_f(fits['resolution_flops_exponent'])}).\n")
        rows = [[r["model"], r["params"] / 1e6, r["weights_mb_fp32"], r["gflop_per_image"],
                 _f(r.get("ms_per_image")), _f(r.get("gflops"))] for r in t["models"]]
        out.append(_table(["model", "params (M)", "weights MB (fp32)",
                           f"GFLOP / image @{t['models'][0]['resolution']} px",
                           "ms / image (timed)", "GFLOP/s"], rows) + "\n")

        out.append(_projection_md(t["models"]))

    if "data" in s:
        out.append(_data_md(s["data"], results["machine"]))
    if "overhead" in s:
        out.append(_overhead_md(s["overhead"]))

    profiles = {**{f"training step, {k}": v for k, v in s.get("train", {}).get(
        "profiles", {}).items()}, **{f"inference, {k}": v for k, v in s.get("infer", {}).get(
            "profiles", {}).items()}}
    if profiles:
        out.append("## Profiles (torch.profiler, top ops by self CPU time)\n")
        for title, prof in profiles.items():
            out.append(_profile_md(title, prof) + "\n")

    out.append("## Method\n")
    out.append(
        "- One process; `torch.set_num_threads` = usable cores; ONNX Runtime uses as many "
        "intra-op threads. `OMP_WAIT_POLICY=PASSIVE` is set before torch is imported unless "
        "the caller set it: on a shared machine spinning OpenMP workers steal the cores the "
        "working ones need.\n"
        "- Each configuration gets its own copy of identical initial weights (random head: "
        "bit_core zero-initialises new heads) and the same input batch. A first call warms up "
        "(compiles) and checks correctness; then configurations take turns; the median is "
        "reported, with min–max.\n"
        "- Inference: `bit_core.evaluate.torch_predictor` / `onnx_predictor`, timed by "
        "`measure_speed` (numpy in, numpy out, conversion included); ONNX from "
        "`bit_core.export.export_onnx` (weight standardisation folded), sessions from "
        "`bit_core.export.onnx_session` (idle threads sleep) and one variant with ONNX "
        "Runtime's default intra-op spin-waiting.\n"
        "- `candidate` rows are not bit_core: bit_core's model with StdConv2d standardising "
        "its kernel through one `F.layer_norm(w, w.shape[1:], eps=eps)` call (same formula; "
        "timm uses `F.batch_norm` to the same end), shown as a measured proposal.\n"
        "- torch.compile variants are first compiled in a child process that is killed when "
        "one compile exceeds `--compile-timeout` (the variant is then skipped); the measuring "
        "process then compiles the same graphs from the warm inductor cache. Compile times: "
        "child / in-process (first call minus a steady call). Inference compiles with "
        "`torch._inductor.config.freezing = True`, one static graph per batch size. Compile "
        f"times depend on the inductor cache (`{results['machine'].get('inductor_cache')}`): "
        "minutes when cold, seconds when warm.\n")
    return "\n".join(out)


# ------------------------------------------------------------------ plot

def plot_scaling(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    b = scaling["batch"]
    ax.plot([r["batch"] for r in b], [r["img_s"] for r in b], "o-", label="images/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title(f"Batch size ({b[0]['resolution']} px)")
    ax2 = ax.twinx()
    ax2.plot([r["batch"] for r in b], [r["ms_per_image"] for r in b], "s--", color="C1",
             label="ms / image")
    ax2.set_ylabel("ms / image", color="C1")

    ax = axes[1]
    r = scaling["resolution"]
    px = [row["resolution"] for row in r]
    ax.plot(px, [row["ms_per_image"] for row in r], "o-", label="measured ms / image")
    if r:
        scale = r[0]["ms_per_image"] / r[0]["gflop_per_image"]
        ax.plot(px, [row["gflop_per_image"] * scale for row in r], "k:",
                label="∝ FLOPs (from smallest)")
    ax.set_xlabel("resolution (px)")
    ax.set_ylabel("ms / image")
    ax.set_title(f"Resolution (batch {r[0]['batch'] if r else '?'})")
    ax.legend()

    ax = axes[2]
    m = scaling["models"]
    names = [row["model"].replace("BiT-M-", "") for row in m]
    xs = range(len(m))
    ax.bar([x - 0.2 for x in xs], [row["gflop_per_image"] for row in m], 0.4,
           label=f"GFLOP / image @{m[0]['resolution']} px")
    ax.bar([x + 0.2 for x in xs], [row["weights_mb_fp32"] / 1e3 for row in m], 0.4,
           label="weights GB (fp32)")
    for x, row in zip(xs, m):
        if row.get("ms_per_image"):
            ax.annotate(f"{row['ms_per_image']:.0f} ms/img", (x - 0.2, row["gflop_per_image"]),
                        ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_title("Model size (timed: the two smallest)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from bit_core.io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
