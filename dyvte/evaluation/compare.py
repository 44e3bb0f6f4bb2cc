"""Comparing exit policies on one set of samples: accuracy, agreement, FLOPs, time, KV memory; sweeps; the
equal-budget comparison of the token-reduction baselines (`budget.py`).

Every policy generates for the same batches. LM FLOPs come from the tokens each layer really computed (the KV
cache's per-sample key counts), so pruning and merging policies such as FastV or ToMe are counted as exactly as
full exits; vision FLOPs (tower and projector, the same under every policy) from the processor batch
(`flops.vision_flops`).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import flops
from ..data import PromptCollator, Sample, normalize_answer
from ..engine import ExitPolicy, VisualExit
from ..heads import ExitHeads
from ..policies import (
    DART,
    Downsample,
    DynamicExit,
    FastV,
    KeepRateSchedule,
    NoExit,
    PyramidDrop,
    RandomPrune,
    StaticExit,
    ToMe,
    VisionZip,
)
from .budget import budget_policy, format_budget_table, visual_share
from .plots import plot_exit_histograms, plot_pareto
from .tables import markdown_table, number


@dataclass
class PolicySettings:
    heads: ExitHeads | None = None
    threshold: float | None = None  # None: the heads' calibrated default
    vtw_layer: int | None = None
    fastv_layer: int = 2
    fastv_keep_ratio: float = 0.5
    gsearch: KeepRateSchedule | None = None  # from `calibrate.g_search` (or its saved JSON)
    psigmoid: KeepRateSchedule | None = None  # from `calibrate.p_sigmoid_search` (or its saved JSON)
    baselines: dict = field(default_factory=dict)  # per baseline name, its constructor's keyword arguments
    model: object = None  # the MLLM: VisionZip reads its vision tower, PyramidDrop its depth
    force: bool = False  # allow a `threshold` outside [0, 1] (`DynamicExit`)


BASELINES = {"random": RandomPrune, "downsample": Downsample, "tome": ToMe, "dart": DART}
MODEL_BASELINES = ("visionzip", "pdrop")  # built from the model itself
#: Every name `build_policy` knows (a `+` composition joins them); start-up checks compare against these.
POLICY_NAMES = ("none", "vtw", "fastv", "dynamic", "gsearch", "psigmoid", *BASELINES, *MODEL_BASELINES)


def build_policy(name: str, settings: PolicySettings) -> ExitPolicy:
    """`none`, `vtw`, `fastv`, `dynamic`, `gsearch`, `psigmoid`, the baselines `random`, `downsample`, `tome`,
    `visionzip`, `pdrop`, `dart`, or a `+` composition such as `gsearch+dynamic`."""
    parts = name.split("+")
    if len(parts) > 1:
        policy = build_policy(parts[0], settings)
        for part in parts[1:]:
            policy = policy + build_policy(part, settings)
        return policy
    if name == "none":
        return NoExit()
    if name == "vtw":
        if settings.vtw_layer is None:
            raise ValueError("policy 'vtw' needs a withdrawal layer (vtw_layer, or run vtw_search).")
        return StaticExit(settings.vtw_layer)
    if name == "fastv":
        return FastV(settings.fastv_layer, settings.fastv_keep_ratio)
    if name == "dynamic":
        if settings.heads is None:
            raise ValueError("policy 'dynamic' needs trained exit heads (heads=DIR).")
        return DynamicExit(settings.heads, settings.threshold, force=settings.force)
    if name in ("gsearch", "psigmoid"):
        schedule = getattr(settings, name)
        if schedule is None:
            raise ValueError(f"policy {name!r} needs keep rates ({name}.path=FILE, or run its search).")
        return schedule
    if name in BASELINES:
        return BASELINES[name](**settings.baselines.get(name, {}))
    if name in MODEL_BASELINES:
        if settings.model is None:
            raise ValueError(f"policy {name!r} needs the model (PolicySettings.model).")
        options = settings.baselines.get(name, {})
        if name == "visionzip":
            return VisionZip(settings.model, **options)
        return PyramidDrop(settings.model.config.get_text_config(decoder=True).num_hidden_layers, **options)
    raise ValueError(f"unknown policy {name!r}; policies: {', '.join(POLICY_NAMES)} and '+' compositions.")


@dataclass
class PolicyRun:
    answers: list[str]
    exit_layer: list[int]
    prefill_flops: list[int]
    vision_flops: list[int]
    kv_bytes: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    visual_share: list[float | None] = field(default_factory=list)  # per sample, `budget.visual_share`


@torch.no_grad()
def run_policy(engine: VisualExit, processor, batches: list[dict], policy: ExitPolicy, max_new_tokens: int,
               timed: bool = True) -> PolicyRun:
    """Generate with `policy` for every batch; with `timed`, also time the prefill alone."""
    config = engine.model.config
    shape = flops.DecoderShape.from_config(config)
    element = next(engine.model.parameters()).element_size()
    run = PolicyRun([], [], [], [], [], 0.0, 0.0, 0)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        prefill_seconds = 0.0
        if timed:
            start = time.perf_counter()
            engine.prefill(**inputs, policy=policy)
            prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = engine.generate(**inputs, policy=policy, max_new_tokens=max_new_tokens, do_sample=False,
                              return_dict_in_generate=True)
        total = time.perf_counter() - start
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        run.answers += processor.batch_decode(new, skip_special_tokens=True)
        run.exit_layer += out.exit_layer.tolist()
        prefill_tokens = _prefill_tokens(out.past_key_values, new.shape[1])
        run.prefill_flops += [flops.prefill_flops_from_counts(shape, counts) for counts in prefill_tokens]
        n_visual = (engine.adapter.withdrawn_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(dim=1)
        n_text = inputs["attention_mask"].sum(dim=1) - n_visual
        run.visual_share += [visual_share(counts, t, v) for counts, t, v in
                             zip(prefill_tokens, n_text.tolist(), n_visual.tolist())]
        run.vision_flops += flops.vision_flops(config, **inputs)
        run.kv_bytes += [2 * sum(counts) * shape.kv_dim * element for counts in prefill_tokens]
        run.prefill_seconds += prefill_seconds
        run.decode_seconds += max(total - prefill_seconds, 0.0)
        run.decode_steps += max(new.shape[1] - 1, 0)
    return run


def _prefill_tokens(cache, generated: int) -> list[list[int]]:
    """Per sample and layer, the prompt tokens that layer computed: its real keys minus the decoded ones."""
    fed_back = max(generated - 1, 0)  # the last generated token is never fed back into the cache
    per_layer = torch.stack([cache.num_keys(layer) - fed_back for layer in range(len(cache.layers))], dim=1)
    return per_layer.tolist()


def summarize(run: PolicyRun, samples: list[Sample], reference: list[str], full_flops: list[int]) -> dict:
    n = len(samples)
    known = [s for s in samples if s.answer.strip()]
    shares = [share for share in run.visual_share if share is not None]
    correct = [normalize_answer(a) == normalize_answer(s.answer) for a, s in zip(run.answers, samples)
               if s.answer.strip()]
    return {
        "accuracy": sum(correct) / len(known) if known else None,
        "agreement": sum(a == r for a, r in zip(run.answers, reference)) / n,
        "lm_tflops": sum(run.prefill_flops) / n / 1e12,
        "vision_tflops": sum(run.vision_flops) / n / 1e12,
        "total_tflops": (sum(run.prefill_flops) + sum(run.vision_flops)) / n / 1e12,
        "flops_saved": 1.0 - sum(run.prefill_flops) / sum(full_flops),
        "total_flops_saved": 1.0 - (sum(run.prefill_flops) + sum(run.vision_flops)) / (sum(full_flops)
                                                                                       + sum(run.vision_flops)),
        "mean_exit_layer": sum(run.exit_layer) / n,
        "prefill_ms": 1000 * run.prefill_seconds / n,
        "decode_ms_per_token": 1000 * run.decode_seconds / run.decode_steps if run.decode_steps else None,
        "kv_bytes": sum(run.kv_bytes) / n,
        "visual_share": sum(shares) / len(shares) if shares else None,  # mean visual tokens per layer / prompt's
    }


def evaluate(engine: VisualExit, processor, samples: list[Sample], policy_names: list[str],
             settings: PolicySettings, batch_size: int = 16, max_new_tokens: int = 16, sweeps: bool = True,
             sweep_thresholds: list[float] = (), on_bad_sample: str = "skip", budgets: list[float] = (),
             budget_unit: int = 576, budget_methods: list[str] = ()) -> dict:
    """Every policy on the same batches; the full model first, as the reference for agreement and FLOPs. With
    `sweeps`, also static exit at every `k` and dynamic exit at each of `sweep_thresholds` (for the Pareto plot).
    With `budgets` (in tokens of a `budget_unit`-token image), each of `budget_methods` at each budget
    (`budget.py`'s rule), beside dynamic exit at the budget it reaches itself."""
    collator = PromptCollator(processor, on_bad_sample=on_bad_sample, require_answer=False)
    batches = [collator(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    batches = [b for b in batches if b["samples"]]
    kept = [s for b in batches for s in b["samples"]]
    run_policy(engine, processor, batches[:1], NoExit(), 2, timed=False)  # warm-up, so no policy pays for it
    full = run_policy(engine, processor, batches, NoExit(), max_new_tokens)
    results: dict = {"samples": len(kept), "skipped": [s for b in batches for s in b["skipped"]], "policies": {}}
    runs = {"none": full}
    for name in policy_names:
        run = full if name == "none" else run_policy(engine, processor, batches, build_policy(name, settings),
                                                     max_new_tokens)
        runs[name] = run
        results["policies"][name] = summarize(run, kept, full.answers, full.prefill_flops)
    results["exit_layers"] = {name: run.exit_layer for name, run in runs.items()}
    results["families"] = [s.family for s in kept]
    if sweeps:
        results["static_sweep"] = [
            {"k": k, **_sweep_point(engine, processor, batches, StaticExit(k), kept, full, max_new_tokens)}
            for k in range(engine.num_layers + 1)
        ]
        results["dynamic_sweep"] = [
            {"threshold": t, **_sweep_point(engine, processor, batches, DynamicExit(settings.heads, t), kept, full,
                                            max_new_tokens)}
            for t in sweep_thresholds
        ] if settings.heads is not None else []
    if budgets:
        results["budget_unit"] = budget_unit
        results["budget"] = _budget_rows(engine, processor, batches, kept, full, settings, max_new_tokens, budgets,
                                         budget_unit, budget_methods, results)
    return results


def _budget_rows(engine, processor, batches, samples, full: PolicyRun, settings: PolicySettings, max_new_tokens,
                 budgets, unit, methods, results) -> list[dict]:
    """The equal-budget table's rows: every method at every budget, then dynamic exit (at the heads' threshold
    and, from the dynamic sweep, the threshold whose measured budget is nearest each budget)."""
    rows = []
    for budget in budgets:
        for method in methods:
            policy, setting = budget_policy(method, budget / unit, engine.num_layers, settings)
            row = {"budget": budget, "method": method, "setting": setting}
            if policy is not None:
                row.update(_sweep_point(engine, processor, batches, policy, samples, full, max_new_tokens))
                row["equivalent_tokens"] = _tokens(row["visual_share"], unit)
            rows.append(row)
    dynamic = []
    if "dynamic" in results["policies"]:
        threshold = "heads' threshold" if settings.threshold is None else f"threshold {settings.threshold}"
        dynamic.append((threshold, results["policies"]["dynamic"]))
    sweep = [point for point in results.get("dynamic_sweep", []) if point["visual_share"] is not None]
    nearest = {min(sweep, key=lambda point: abs(point["visual_share"] * unit - budget))["threshold"]
               for budget in budgets} if sweep else set()
    dynamic += [(f"threshold {point['threshold']}", point) for point in sweep if point["threshold"] in nearest]
    for setting, metrics in dynamic:
        rows.append({"budget": None, "method": "dynamic", "setting": setting,
                     "equivalent_tokens": _tokens(metrics["visual_share"], unit),
                     **{k: metrics[k] for k in ("accuracy", "agreement", "flops_saved", "lm_tflops", "visual_share")}})
    return rows


def _tokens(share: float | None, unit: int) -> float | None:
    return None if share is None else share * unit


def _sweep_point(engine, processor, batches, policy, samples, full: PolicyRun, max_new_tokens) -> dict:
    run = run_policy(engine, processor, batches, policy, max_new_tokens, timed=False)
    summary = summarize(run, samples, full.answers, full.prefill_flops)
    return {k: summary[k] for k in ("accuracy", "agreement", "flops_saved", "lm_tflops", "total_tflops",
                                    "mean_exit_layer", "visual_share")}


def write_report(results: dict, output_dir: Path) -> str:
    """`results.json`, the printed table, and the PNG plots (exit histogram per family, accuracy vs TFLOPs)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (output_dir / "results.md").write_text(table + "\n")
    plot_exit_histograms(results, output_dir / "exit_layers.png")
    plot_pareto(results, output_dir / "pareto.png")
    if "budget" in results:
        budget_table = format_budget_table(results["budget"])
        (output_dir / "budget.md").write_text(budget_table + "\n")
        table += (f"\n\nEqual visual-token budgets (equivalent tokens of a {results['budget_unit']}-token image, "
                  f"docs/design.md):\n\n{budget_table}")
    return table


def format_table(results: dict) -> str:
    columns = ("accuracy", "agreement", "mean_exit_layer", "lm_tflops", "total_tflops", "flops_saved", "prefill_ms",
               "decode_ms_per_token", "kv_bytes")
    rows = [[name, *(number(metrics[c]) for c in columns)] for name, metrics in results["policies"].items()]
    return markdown_table(["policy", *columns], rows)
