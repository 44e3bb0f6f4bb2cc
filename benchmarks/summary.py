"""Targets and the Markdown summary, from the section results."""

from pathlib import Path

from dyvte.evaluation.tables import markdown_table


def _f(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _t(stats: dict, scale: float = 1.0, digits: int = 3) -> str:
    """median (min–max)"""
    return (f"{stats['median_s'] * scale:.{digits}f} ({stats['min_s'] * scale:.{digits}f}–"
            f"{stats['max_s'] * scale:.{digits}f}, n={stats['n']})")


def _holds(holds: bool) -> str:
    return "yes" if holds else "**no**"


def measured(section: dict):
    """(model, key, result) of every measurement in one section's results; other keys hold shapes or skip notes."""
    for model, entry in section.items():
        for key, res in entry.items():
            if key.startswith("batch_"):
                yield model, key, res


def targets(data: dict) -> list[dict]:
    """Every target with whether it holds on what was measured."""
    out = []
    for model, key, res in measured(data["prefill"]):
        for e in res["exits"]:
            out.append({"target": "prefill realized/ideal >= 0.9", "model": model, "batch": res["batch"],
                        "exit_layer": e["exit_layer"], "value": e["realized_over_ideal"],
                        "holds": e["target_0.9_holds"]})
    for model, key, res in measured(data["mixed_batch"]):
        out.append({"target": "mixed batch throughput >= 0.85 x FLOPs ideal", "model": model,
                    "batch": key, "value": res["realized_over_ideal"], "holds": res["target_0.85_holds"]})
    for model, key, res in measured(data["decode"]):
        out.append({"target": "decode with exit never slower than full (median ms/token)", "model": model,
                    "value": min(r["speedup_vs_full"] for r in res["by_exit"].values()),
                    "holds": res["target_not_slower_holds"],
                    "within_noise": res["not_slower_within_noise"]})
        out.append({"target": "KV bytes fall by the withdrawn share", "model": model,
                    "holds": res["target_kv_bytes_holds"]})
    for model, key, res in measured(data["head_overhead"]):
        out.append({"target": "all exit heads <= 2% of one decoder layer", "model": model, "setting": key,
                    "value": res["fraction_of_one_layer"]["median"], "holds": res["target_2pct_holds"],
                    "value_at_full_depth": res["projected_full_depth"]["fraction_of_one_layer"],
                    "holds_at_full_depth": res["target_2pct_holds_at_full_depth"]})
    for model, key, res in measured(data["labelling"]):
        out.append({"target": "dense labelling >= 10x cheaper per label than naive", "model": model,
                    "value": res["naive_over_dense"], "holds": res["target_10x_holds"],
                    "value_at_full_depth_projected": res["projected_full_depth_naive_over_dense"],
                    "holds_at_full_depth_projected": res["target_10x_holds_at_full_depth_projected"]})
    return out


def write_summary(path: Path, env: dict, settings: dict, data: dict, run: dict) -> None:
    lines = ["# dyvte benchmarks", ""]
    load = env["machine_load_at_start"]
    lines += [f"- {env['time_utc']}, CPU `{env['cpu_model']}` ({env['cpu_count']} cores), torch {env['torch']} "
              f"({env['torch_threads']} threads), transformers {env['transformers']}; load average at start "
              f"{load['loadavg'][0]:.2f}, pre-training running: {load['pretraining_running']}; "
              f"{'QUICK (tiny shapes, smoke test: overhead-bound, the targets are not meaningful here)' if settings['quick'] else 'full run'}; "
              f"{'finished' if run['finished'] else 'PARTIAL (still running or interrupted)'} after "
              f"{run['elapsed_s']:.0f} s.",
              f"- Timing: {settings['timing']}. Times in seconds, `median (min–max, n=runs)`."]
    for shape, name, kw, reason in settings.get("not_run", []):
        lines.append(f"- NOT RUN: {shape or ''} {name} {kw}: {reason}")
    lines.append("")

    if data["prefill"]:
        rows = []
        for model, key, res in measured(data["prefill"]):
            layers = data["prefill"][model]["shape"]["num_layers"]
            rows += [[f"{model} ({layers})", res["batch"], e["exit_layer"], _t(res["full"]), _t(e),
                      _f(e["realized_speedup"]["of_medians"]), _f(e["ideal_speedup"]), _f(e["realized_over_ideal"]),
                      _holds(e["target_0.9_holds"]), _f(e["speedup_predicted_from_layer_times"]),
                      f"{_f(e['kv_ratio_vs_full'], 3)} ({_f(e['kv_ratio_expected'], 3)})"] for e in res["exits"]]
        diagnostics = []
        for model, key, res in measured(data["prefill"]):
            d = res["layer_diagnostics"]
            diagnostics.append([
                model, res["batch"], f"{d['full_length_layer_s']:.3f} ({d['full_length_layer_gflops_per_s']:.0f})",
                f"{d['text_only_layer_s']:.3f} ({d['text_only_layer_gflops_per_s']:.0f})",
                f"{d['time_ratio_text_over_full_layer']:.3f} ({d['flops_ratio_text_over_full_layer']:.3f})",
                f"{d['other_s_full']:.3f}"])
        lines += ["## Prefill: speed-up of exit vs the FLOPs ideal", "",
                  markdown_table(["model (layers)", "batch", "k", "full s", "exit s", "realized ×", "ideal ×",
                                  "realized/ideal", "≥0.9", "predicted from layer times ×",
                                  "KV bytes vs full (expected)"], rows),
                  "", "Where the time goes (decoder-layer calls timed by forward hooks; *non-layer* = embedding, "
                  "sub-batch moves, KV gathering, final norm and lm_head of the full run):", "",
                  markdown_table(["model", "batch", "full-length layer s (GFLOP/s)", "text-only layer s (GFLOP/s)",
                                  "time ratio text/full (FLOPs ratio)", "non-layer s"], diagnostics), ""]
    if data["mixed_batch"]:
        rows = [[model, res["exit_layers"], _t(res["full"]), _t(res["batched"]), _t(res["one_by_one"]),
                 f"{_f(res['batched']['samples_per_s'])} / {_f(res['one_by_one']['samples_per_s'])} / "
                 f"{_f(res['full_batch_samples_per_s'])} / {_f(res['ideal_samples_per_s'])}",
                 _f(res["realized_over_ideal"]), _holds(res["target_0.85_holds"])]
                for model, key, res in measured(data["mixed_batch"])]
        lines += ["## Mixed-exit batch", "",
                  markdown_table(["model", "exits", "full batch s", "mixed batch s", "one by one s",
                                  "samples/s mixed / one-by-one / full / ideal", "realized/ideal", "≥0.85"], rows), ""]
    if data["decode"]:
        rows = [[f"{model}, {res['new_tokens']} tokens", k, _t(r["ms_per_token"], digits=1),
                 _f(r["speedup_vs_full"], 3), f"{r['kv_cache_bytes']:,}",
                 f"{_f(r['kv_ratio_vs_full'], 3)} ({_f(r['kv_ratio_expected'], 3)})"]
                for model, key, res in measured(data["decode"]) for k, r in res["by_exit"].items()]
        lines += ["## Decode (batch 1; new tokens forced with min_new_tokens = max_new_tokens)", "",
                  markdown_table(["model", "exit k", "ms/token", "vs full ×", "KV bytes after",
                                  "KV vs full (expected)"], rows), ""]
    if data["head_overhead"]:
        rows = [[model, res["batch"], " + ".join(res["head_inputs"]), res["head_hidden"],
                 f"{res['head_parameters']:,}", res["heads_evaluated_per_prefill"],
                 _t(res["all_heads_per_prefill"], digits=4), _t(res["one_layer"]),
                 f"{res['fraction_of_one_layer']['median']:.3%}",
                 f"{res['projected_full_depth']['fraction_of_one_layer']:.3%} "
                 f"({res['projected_full_depth']['heads']} heads)"]
                for model, key, res in measured(data["head_overhead"])]
        lines += ["## Exit-head overhead (DynamicExit, threshold 2: every head runs)", "",
                  markdown_table(["model", "batch", "head inputs", "head hidden", "parameters", "heads run",
                                  "all heads s", "one layer s", "fraction", "projected to full depth"], rows), ""]
    if data["labelling"]:
        rows = []
        for model, entry in data["labelling"].items():
            if "skipped" in entry:
                rows.append([model, f"skipped: {entry['skipped']['reason']}", "", "", "", "", "", ""])
            rows += [[model, res["labels_per_pass"], f"{res['dense']['s_per_label']:.3f}",
                      f"{res['naive']['s_per_label']:.3f}", _f(res["naive_over_dense"]),
                      _f(res["naive_over_dense_plus_reference"]), _f(res["flops_at_this_depth"]["naive_over_dense"]),
                      f"{_f(res['projected_full_depth_naive_over_dense'])} "
                      f"({res['flops_at_full_depth']['num_layers']} layers)"]
                     for key, res in entry.items() if key.startswith("batch_")]
        lines += ["## Labelling cost per labelled (sample, exit layer)", "",
                  markdown_table(["model", "labels", "dense s/label", "naive s/label", "naive/dense",
                                  "naive/(dense+reference)", "FLOPs naive/dense", "projected to full depth"], rows), ""]
    if data["head_training"]:
        rows = [[f"{name}, head {r['head_input']}→{r['head_hidden']}→2", r["num_heads"], r["samples"], _t(r["fit"]),
                 _f(r["samples_per_s"], 1), _f(r["sample_heads_per_s"], 1)]
                for name, r in ((name, entry["fit"]) for name, entry in data["head_training"].items())]
        lines += ["## Head training (HeadsModule on a synthetic feature cache)", "",
                  markdown_table(["config", "heads", "samples", "fit s", "samples/s", "sample·heads/s"], rows), ""]
    lines += ["## Targets", ""]
    for t in run["targets"]:
        where = ", ".join(f"{k}={t[k]}" for k in ("model", "batch", "exit_layer") if k in t)
        extra = ""
        if "holds_at_full_depth" in t:
            extra = f"; at full depth {t['value_at_full_depth']:.4f}: {'holds' if t['holds_at_full_depth'] else 'MISS'}"
        if "holds_at_full_depth_projected" in t:
            extra = (f"; projected to full depth {t['value_at_full_depth_projected']:.2f}: "
                     f"{'holds' if t['holds_at_full_depth_projected'] else 'MISS'}")
        value = f" — {t['value']:.3f}" if t.get("value") is not None else ""
        lines.append(f"- {'holds' if t['holds'] else '**MISS**'}: {t['target']} ({where}){value}{extra}")
    path.write_text("\n".join(lines) + "\n")
