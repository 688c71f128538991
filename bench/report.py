"""RESULTS.md from results.json, and the achieved GFLOP/s derived from its numbers."""

from __future__ import annotations

UNITS = {"img_s": "images/s", "min_s": "s"}
TITLES = {"train": "Training", "infer": "Inference", "flops": "GEMM peak",
          "data": "Data loading against training",
          "precision": "bf16 against fp32 on the default experiment", "overhead": "Pipeline overhead"}


def utilization(results: dict) -> list[dict]:
    """Achieved GFLOP/s (the model's FLOPs x images/s) of every training and inference row,
    as a ratio to the GEMM peak of its precision measured in the same run. The fastest correct
    bit_core row of each section is a headline."""
    sections, out = results["sections"], []
    if "flops" not in sections:
        return out
    flops, peak = sections["flops"]["flops_per_image"], sections["flops"]["peak_gflops"]
    for name, kind in (("train", "train"), ("infer", "forward")):
        rows = {k: r for k, r in sections.get(name, {}).get("rows", {}).items() if "img_s" in r}
        top = max((k for k, r in rows.items() if r["library"] == "bit_core" and r["correct"]),
                  key=lambda k: rows[k]["img_s"], default=None)
        for key, r in rows.items():
            per_image = flops["timm" if r["library"] == "timm" else "bit_core"][kind]
            gflops = per_image * r["img_s"] / 1e9
            basis = r["precision"] if r["precision"] in peak else "bf16"  # int8: the bf16 peak
            out.append({"name": f"{name}: {key}, achieved / {basis} GEMM peak",
                        "numerator": f"{name}: {key}", "denominator": f"{basis} peak",
                        "metric": "GFLOP/s", "numerator_value": gflops,
                        "denominator_value": peak[basis],
                        "value": gflops / peak[basis], "per_round": None,
                        "headline": key == top, "gflop_per_image": per_image / 1e9,
                        "img_s": r["img_s"]})
    return out


# Training targets where the CPU has AMX-bf16: a step at >= 25% of the bf16 GEMM peak, and
# >= 2x timm's fastest correct configuration in the same run.
TRAIN_TARGETS = {"of_peak": 0.25, "over_timm": 2.0}


def targets(results: dict) -> dict | None:
    """The training targets against this run's figures, or why they do not apply here."""
    sections = results["sections"]
    if "train" not in sections or "flops" not in sections:
        return None
    train, flops = sections["train"], sections["flops"]
    peak, ours, theirs = flops["peak_gflops"], train["best"]["bit_core"], train["best"]["timm"]
    if not (ours and theirs):
        return None
    mine = train["rows"][ours]
    of_peak = flops["flops_per_image"]["bit_core"]["train"] * mine["img_s"] / 1e9 / peak["bf16"]
    over_timm = mine["img_s"] / train["rows"][theirs]["img_s"]
    reason = None if results["machine"]["amx"] else (
        f"this CPU has no AMX-bf16: its bf16 GEMM peak is {peak['bf16']:.0f} GFLOP/s against "
        f"{peak['fp32']:.0f} in fp32, so a bf16 step has no matrix unit to approach; the "
        "targets are for AMX hosts")
    return {"applies": reason is None, "reason": reason, "bit_core": ours, "timm": theirs,
            "of_peak": of_peak, "over_timm": over_timm, "goal": TRAIN_TARGETS,
            "met": {"of_peak": of_peak >= TRAIN_TARGETS["of_peak"],
                    "over_timm": over_timm >= TRAIN_TARGETS["over_timm"]},
            "bound": bound(train["profiles"].get(ours), train["batch"] / mine["img_s"],
                           of_peak, over_timm, flops, train["batch"])}


# Kernels that do the step's matrix work, by the profile's kinds (bench/training.py KINDS).
MATRIX_KINDS = ("convolution", "matrix product")
# Passes over its activations a GroupNorm layer needs at least in a training step, fused as far
# as it goes: forward, one read for the statistics and one read and one write to normalise;
# backward, one read of the input and of the gradient for the sums, and a read of both and a
# write of the input gradient.
NORM_PASSES = 8


def bound(profile: dict | None, step_s: float, of_peak: float, over_timm: float, flops: dict,
          batch: int) -> dict | None:
    """What the profile of the fastest step allows: the share of its time in convolutions and
    matrix products; the targets' figures if every other kernel took no time; the fraction of
    their present time the other kernels may keep for each target to be met (negative: not even
    with them free), in seconds too; and the least time GroupNorm alone needs to stream its bf16
    activations at this machine's copy bandwidth."""
    if not profile:
        return None
    share = sum(k["share"] for k in profile["kinds"] if k["kind"] in MATRIX_KINDS)
    if not 0 < share < 1:
        return None
    # In units of the step's present time: matrix work `share`, the rest `1 - share`; a target
    # met at speed-up x needs a step of 1/x.
    keep = {name: (value / TRAIN_TARGETS[name] - share) / (1 - share)
            for name, value in (("of_peak", of_peak), ("over_timm", over_timm))}
    out = {"matrix_share": share, "of_peak": of_peak / share, "over_timm": over_timm / share,
           "rest_may_keep": keep, "step_s": step_s,
           "rest_budget_s": {k: max(v, 0.0) * (1 - share) * step_s for k, v in keep.items()}}
    if "copy" in flops:  # results before the bandwidth was measured have no floor
        norm_bytes = flops["norm_elements_per_image"] * batch * 2 * NORM_PASSES
        out.update(norm_bytes=norm_bytes, copy_gbs=flops["copy"]["gbs"],
                   norm_floor_s=norm_bytes / (flops["copy"]["gbs"] * 1e9))
    return out


# Inference targets where the CPU has AMX: the fastest correct back-end at batch 32 at >= 40% of
# the bf16 GEMM peak, and a batch of one in <= 8 ms. Accuracy is the evaluate stage's to judge
# (top-1 on the test split within its gate of fp32); the bench checks logits on random weights.
INFER_TARGETS = {"of_peak": 0.40, "batch1_ms": 8.0, "batch": 32}


def infer_targets(results: dict) -> dict | None:
    """The inference targets against this run's figures (at its largest batch, which is 32 but
    for --quick), or None without the infer and flops sections."""
    from bench.measure import best

    sections = results["sections"]
    if "infer" not in sections or "flops" not in sections:
        return None
    rows, flops = sections["infer"]["rows"], sections["flops"]
    batch = max(sections["infer"]["batches"])
    wide, one = best(rows, library="bit_core", batch=batch), best(rows, library="bit_core", batch=1)
    if not (wide and one):
        return None
    of_peak = (flops["flops_per_image"]["bit_core"]["forward"] * rows[wide]["img_s"] / 1e9
               / flops["peak_gflops"]["bf16"])
    batch1_ms = 1000 * rows[one]["min_s"]
    reason = None if results["machine"]["amx"] else (
        "this CPU has no AMX: the targets are for AMX hosts")
    return {"applies": reason is None, "reason": reason, "batch": batch, "wide": wide,
            "one": one, "of_peak": of_peak, "batch1_ms": batch1_ms, "goal": INFER_TARGETS,
            "met": {"of_peak": of_peak >= INFER_TARGETS["of_peak"],
                    "batch1_ms": batch1_ms <= INFER_TARGETS["batch1_ms"]}}


def _infer_targets(t: dict) -> str:
    lines = [f"- batch {t['batch']}, bit_core's fastest correct back-end ({t['wide']}): "
             f"{100 * t['of_peak']:.0f}% of the bf16 GEMM peak (target "
             f"{100 * t['goal']['of_peak']:.0f}% at batch {t['goal']['batch']}: "
             f"{'met' if t['met']['of_peak'] else 'missed'})",
             f"- batch 1, bit_core's fastest correct back-end ({t['one']}): "
             f"{t['batch1_ms']:.1f} ms (target {t['goal']['batch1_ms']:.0f} ms: "
             f"{'met' if t['met']['batch1_ms'] else 'missed'})",
             "- accuracy: the evaluate stage's gates, on the test split (reports/eval/fps.md)"]
    if not t["applies"]:
        lines.append(f"- Not applicable on this machine: {t['reason']}.")
    return "\n".join(lines)


def _targets(t: dict) -> str:
    lines = [f"- bit_core's fastest correct configuration ({t['bit_core']}): "
             f"{100 * t['of_peak']:.0f}% of the bf16 GEMM peak (target "
             f"{100 * t['goal']['of_peak']:.0f}%: {'met' if t['met']['of_peak'] else 'missed'})",
             f"- against timm's fastest correct configuration ({t['timm']}): "
             f"{t['over_timm']:.2f}x (target {t['goal']['over_timm']:.0f}x: "
             f"{'met' if t['met']['over_timm'] else 'missed'})"]
    b = t.get("bound")
    if b:
        keep = {k: ("not even with them free" if v <= 0 else f"at most {100 * v:.0f}% of it")
                for k, v in b["rest_may_keep"].items()}
        lines.append(
            f"- what bounds it, by its profile below: convolutions and matrix products take "
            f"{100 * b['matrix_share']:.0f}% of the step; with every other kernel free it would "
            f"reach {100 * b['of_peak']:.0f}% of the peak and {b['over_timm']:.2f}x timm. The "
            f"other kernels (normalisation, elementwise, optimizer, copies) may keep, of their "
            f"present time, {keep['of_peak']} for {100 * t['goal']['of_peak']:.0f}% of the peak "
            f"and {keep['over_timm']} for {t['goal']['over_timm']:.0f}x timm (what was tried to "
            f"cut them: README, \"What bounds a bf16 training step on an AMX CPU\")")
        if "norm_floor_s" in b:
            budget = b["rest_budget_s"]
            lines.append(
                f"- the memory floor: GroupNorm alone must stream at least "
                f"{b['norm_bytes'] / 1e9:.2f} GB a step ({NORM_PASSES} passes over its bf16 "
                f"activations, forward and backward), {1e3 * b['norm_floor_s']:.0f} ms at this "
                f"machine's copy bandwidth ({b['copy_gbs']:.1f} GB/s); the targets leave all "
                f"the non-matrix kernels {1e3 * budget['of_peak']:.0f} ms "
                f"({100 * t['goal']['of_peak']:.0f}% of the peak) and "
                f"{1e3 * budget['over_timm']:.0f} ms ({t['goal']['over_timm']:.0f}x timm) of a "
                f"{1e3 * b['step_s']:.0f} ms step: " + _floor_verdict(b, t["goal"]))
    if not t["applies"]:
        lines.append(f"- Not applicable on this machine: {t['reason']}.")
    return "\n".join(lines)


def _floor_verdict(b: dict, goal: dict) -> str:
    names = {"of_peak": f"{100 * goal['of_peak']:.0f}% of the peak",
             "over_timm": f"{goal['over_timm']:.0f}x timm"}
    out = [names[k] for k, v in b["rest_budget_s"].items() if b["norm_floor_s"] > v]
    if not out:
        return "the floor alone rules neither target out"
    return (" and ".join(out) + " cannot be reached on this machine without convolutions faster "
            "than these, whatever the other kernels do")


def _f(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return "–" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows])


def _spread(r: dict) -> str:
    return f"{r['min_s']:.3f} / {r['median_s']:.3f} / {r['max_s']:.3f}"


def _ratios(ratios: list[dict], section: bool = False) -> str:
    rows = [([r["section"]] if section else []) + [
        r["name"], f"**{r['value']:.2f}×**" + (" (rounds {:.2f}–{:.2f})".format(*r["per_round"])
                                               if r["per_round"] else ""),
        f"{_f(r['numerator_value'])} / {_f(r['denominator_value'])} "
        f"{UNITS.get(r['metric'], r['metric'])}"]
        for r in ratios]
    return _table((["section"] if section else []) + ["ratio", "value", "from"], rows)


# Per section: the columns of its rows table (header, value of a row).
COLUMNS = {
    "train": [("images/s", lambda r: r["img_s"]), ("step s: fastest / median / slowest", _spread),
              ("first step s", lambda r: r["first_step_s"]),
              ("loss MRE vs fp32", lambda r: f"{r['loss_mre']:.4f}" if "loss_mre" in r else None),
              ("correct", lambda r: r["correct"])],
    "infer": [("images/s", lambda r: r["img_s"]), ("batch s: fastest / median / slowest", _spread),
              ("first call s", lambda r: r["first_call_s"]),
              ("max rel. err of logits", lambda r: f"{r['max_rel_err']:.1e}"),
              ("correct", lambda r: r["correct"])],
    "flops": [("GFLOP/s", lambda r: r["gflops"]), ("s: fastest / median / slowest", _spread)],
    "data": [("images/s", lambda r: r["img_s"]), ("images timed per round", lambda r: r["images"]),
             ("s: fastest / median / slowest", _spread)],
    "precision": [("fine-tune stage s", lambda r: r["min_s"]), ("steps", lambda r: r["steps"]),
                  ("final loss", lambda r: r["final_loss"]),
                  ("val top-1 %", lambda r: r.get("val_top1")),
                  ("test top-1 %", lambda r: r["test_top1"]),
                  ("loss MRE vs fp32", lambda r: f"{r['mre']:.4f}" if "mre" in r else None),
                  ("aligned", lambda r: r.get("aligned"))],
    "overhead": [("s: fastest / median / slowest", _spread)],
}


def _machine(m: dict) -> str:
    flags = m["flags"]
    vnni = ", ".join(f for f in ("avx512_vnni", "avx_vnni") if flags[f]) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return "\n".join([
        f"- CPU: {m['cpu_model']}{' (virtual machine)' if m['hypervisor'] else ''}, "
        f"{m['usable_cores']} usable cores, {m['threads']} threads for torch and ONNX Runtime, "
        f"OMP_WAIT_POLICY={m['omp_wait_policy']}, GOMP_SPINCOUNT={m.get('gomp_spincount')}",
        f"- Matrix capabilities (flags in {m['flags_source']}): AMX "
        f"**{'yes' if m['amx'] else 'no'}** (amx_bf16 {_f(flags['amx_bf16'])}, amx_int8 "
        f"{_f(flags['amx_int8'])}), avx512_bf16 {_f(flags['avx512_bf16'])}, VNNI {vnni}; torch "
        f"CPU capability {m['torch_cpu_capability']}",
        f"- {versions}; commit {m['git_commit']}",
        f"- Load average (1, 5, 15 min) at start {[round(v, 2) for v in m['loadavg_start']]}, at "
        f"end {[round(v, 2) for v in m.get('loadavg_end', [])]}; run took "
        f"{m.get('elapsed_s', 0):.0f} s"])


def _train_table(s: dict, flops: dict, peak: dict) -> str:
    """Each configuration's images/s for bit_core beside timm's, and as a fraction of the GEMM
    peak of its precision."""
    rows = []
    for key, r in s["rows"].items():
        if r["library"] != "bit_core":
            continue
        config = key.removeprefix("bit_core ")
        t = s["rows"].get(f"timm {config}", {})
        share = {lib: flops[lib]["train"] * x["img_s"] / 1e9 / peak[r["precision"]]
                 for lib, x in (("bit_core", r), ("timm", t)) if "img_s" in x}
        rows.append([config, r["img_s"], t.get("img_s"),
                     f"{r['img_s'] / t['img_s']:.2f}x" if t else None,
                     *(f"{100 * share[lib]:.0f}%" if lib in share else None
                       for lib in ("bit_core", "timm")),
                     r["correct"] and t.get("correct", False)])
    return _table(["configuration", "bit_core images/s", "timm images/s", "bit_core / timm",
                   "bit_core of peak", "timm of peak", "both correct"], rows)


def _section(name: str, s: dict, peaks: tuple | None = None) -> list[str]:
    out = [f"## {TITLES[name]}\n",
           f"{s['elapsed_s']:.0f} s; load average (1 min) at its end {s['loadavg_end'][0]:.1f}.\n"]
    if name == "flops":
        f = s["flops_per_image"]["bit_core"]
        out.append(f"FLOPs per image at {s['resolution']} px (FlopCounterMode; timm's are the "
                   f"same): forward {f['forward'] / 1e9:.2f} G, forward + backward "
                   f"{f['train'] / 1e9:.2f} G. GEMM peak: the fastest torch.mm call of the run, "
                   f"fp32 {s['peak_gflops']['fp32']:.0f}, bf16 {s['peak_gflops']['bf16']:.0f} "
                   "GFLOP/s." + (
                       f" Memory: a copy of {s['copy']['megabytes']} MB of bf16 runs at "
                       f"{s['copy']['gbs']:.1f} GB/s (read plus write, fastest call); bit_core's "
                       f"GroupNorm layers normalise {s['norm_elements_per_image'] / 1e6:.2f} M "
                       "activations an image." if "copy" in s else "") + "\n")
    if name == "train" and peaks:
        out.append(_train_table(s, *peaks) + "\n")
    columns = COLUMNS[name]
    out.append(_table(["", *(c[0] for c in columns)],
                      [[k, *(fn(r) for _, fn in columns)] for k, r in s["rows"].items()]) + "\n")
    if s["ratios"]:
        out.append(_ratios(s["ratios"]) + "\n")
    for key, p in s.get("profiles", {}).items():
        ops = p["ops"] if isinstance(p, dict) else p  # results of schema 2 list the ops only
        if isinstance(p, dict):
            out.append(f"Where one step of {key} spends its time (torch.profiler, self CPU time "
                       "by kind of kernel):\n\n" + _table(
                           ["kind", "self ms", "share"],
                           [[k["kind"], k["self_ms"], f"{100 * k['share']:.0f}%"]
                            for k in p["kinds"]]) + "\n")
        out.append(f"One step of {key} (torch.profiler, ops by self CPU time):\n\n" + _table(
            ["op", "self ms", "share", "calls"],
            [[o["op"], o["self_ms"], f"{100 * o['share']:.0f}%", o["calls"]] for o in ops]) + "\n")
    if name == "precision":
        out.append(_precision(s))
    if name == "overhead":
        out.append(f"The flow costs {s['flow_overhead_per_stage_s']:+.2f} s per stage over the "
                   f"plain loop ({s['stages']} stages; the temporary Prefect server started in "
                   f"{s['harness_start_s']:.0f} s).\n")
    return out


def _precision(s: dict) -> str:
    c = s["control"]
    text = (f"bf16 against fp32 over {s['steps']} steps: loss MRE {s['mre']:.4f} (the rule: <= "
            f"{s['mre_max']}), {'aligned' if s['aligned'] else '**not aligned**'}; test top-1 "
            f"{s['top1_change']:+.2f} points. The control, {c['run']} (fp32's arithmetic, its "
            f"sums in another order): loss MRE {c['mre']:.4f}, "
            f"{'aligned' if c['aligned'] else '**not aligned**'}; test top-1 "
            f"{c['top1_change']:+.2f} points.")
    if not c["aligned"]:
        text += (" Rounding alone moves this experiment off the rule, so the rule cannot tell "
                 "bf16 from a change of summation order here; compare bf16's figures with the "
                 "control's.")
    return text + (f" params.yaml says `precision: {s['params_precision']}`; `auto` picks "
                   f"{s['auto_picks']} on this CPU ({s['cpu']}).\n")


def markdown(results: dict) -> str:
    m, s = results["machine"], results["sections"]
    out = ["# Benchmark: bit_core BiT-M-R50x1 against timm resnetv2_50x1_bit\n",
           f"`python -m bench{' --quick' if results['settings']['quick'] else ''}` on "
           f"{results['created']}. The variants of a section take turns, one step or batch each "
           "per round; each reports its fastest round (other jobs only ever slow a call down), "
           "and a ratio's range is that of the same ratio round by round. Absolute numbers "
           "depend on the machine and its load.\n", _machine(m) + "\n"]
    out += [f"**Section {k} failed:** {v.strip().splitlines()[-1]}\n"
            for k, v in results["errors"].items()]
    out += ["## Headline\n", _ratios(results["headline"], section=True) + "\n"]
    flops = s.get("flops")
    peaks = (flops["flops_per_image"], flops["peak_gflops"]) if flops else None
    if results.get("targets"):
        out += ["## Training targets\n", _targets(results["targets"]) + "\n"]
    if results.get("infer_targets"):
        out += ["## Inference targets\n", _infer_targets(results["infer_targets"]) + "\n"]
    for name, section in s.items():
        out += _section(name, section, peaks)
    if results["utilization"]:
        out += ["## Achieved GFLOP/s against the GEMM peak\n", _table(
            ["row", "GFLOP / image", "images/s", "GFLOP/s", "of peak"],
            [[u["numerator"], u["gflop_per_image"], u["img_s"], u["numerator_value"],
              f"{100 * u['value']:.0f}% of {u['denominator']}"] for u in results["utilization"]])
            + "\n"]
    return "\n".join(out)
