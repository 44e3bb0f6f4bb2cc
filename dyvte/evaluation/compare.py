"""Comparing exit policies on one set of samples: accuracy, agreement, FLOPs, time, KV memory; sweeps; the
equal-budget comparison of the token-reduction baselines (`budget.py`).

Every policy generates for the same batches. LM FLOPs come from the tokens each layer really computed (the KV
cache's per-sample key counts), so pruning and merging policies such as FastV or ToMe are counted as exactly as
full exits; vision FLOPs (tower and projector, the same under every policy) from the processor batch
(`flops.vision_flops`).
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import flops
from ..data import PromptCollator, Sample, normalize_answer
from ..engine import Compose, ExitPolicy, VisualExit
from ..policies import DynamicExit, NoExit, RandomPrune, StaticExit
from ..policies.registry import REGISTRY, PolicySettings, budget_policy, build_policy
from .budget import format_budget_table, visual_share
from .cost import SelectionMeter, prefill_cost, solve_setting
from .plots import plot_exit_histograms, plot_pareto
from .tables import FLIPS, flips_table, markdown_table, number


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
    selection_flops: list[float] = field(default_factory=list)  # per sample, the policy's own matmul FLOPs
    selection_seconds: float = 0.0  # the policy's own time in the timed prefills
    decisions: list[dict] = field(default_factory=list)  # per sample, what the policy recorded (`sample_decisions`)


def sample_decisions(policy: ExitPolicy) -> list[dict]:
    """What `policy` (or a part of the composition `policy`) recorded per sample of its last prefill, for the
    policies that keep such a record (`per_sample()`, e.g. AutoPrune's mutual information and slope); [] else."""
    for part in policy.policies if isinstance(policy, Compose) else [policy]:
        if hasattr(part, "per_sample"):
            return part.per_sample()
    return []


class TokenClock(StoppingCriteria):
    """Records when each new token is chosen (the first right after the prefill), in the generate call it times;
    never stops generation."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def run_policy(engine: VisualExit, processor, batches: list[dict], policy: ExitPolicy, max_new_tokens: int,
               timed: bool = True) -> PolicyRun:
    """Generate with `policy` for every batch; with `timed`, also time the prefill alone (and the policy's own
    share of it). The policy's own FLOPs are counted during generation's prefill (`SelectionMeter`), each batch's
    split evenly over its samples; decoding is timed inside the same generate call, from the first new token to the
    last (`TokenClock`), so the counting's overhead in that prefill does not count as decode time."""
    config = engine.model.config
    meter = SelectionMeter(policy)
    shape = flops.DecoderShape.from_config(config)
    element = next(engine.model.parameters()).element_size()
    run = PolicyRun([], [], [], [], [], 0.0, 0.0, 0)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        prefill_seconds = 0.0
        if timed:
            meter.counting, meter.seconds = False, 0.0
            start = time.perf_counter()
            engine.prefill(**inputs, policy=meter)
            prefill_seconds = time.perf_counter() - start
            run.selection_seconds += meter.seconds
        meter.counting, meter.flops = True, 0
        clock = TokenClock()
        out = engine.generate(**inputs, policy=meter, max_new_tokens=max_new_tokens, do_sample=False,
                              return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([clock]))
        batch_size = inputs["input_ids"].shape[0]
        run.selection_flops += [meter.flops / batch_size] * batch_size
        new = out.sequences[:, inputs["input_ids"].shape[1]:]
        run.answers += processor.batch_decode(new, skip_special_tokens=True)
        run.decisions += sample_decisions(policy)
        run.exit_layer += out.exit_layer.tolist()
        prefill_tokens = _prefill_tokens(out.cache, new.shape[1])
        run.prefill_flops += [flops.prefill_flops_from_counts(shape, counts) for counts in prefill_tokens]
        n_visual = (engine.adapter.withdrawn_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()).sum(dim=1)
        n_text = inputs["attention_mask"].sum(dim=1) - n_visual
        run.visual_share += [visual_share(counts, t, v) for counts, t, v in
                             zip(prefill_tokens, n_text.tolist(), n_visual.tolist())]
        run.vision_flops += flops.vision_flops(config, **inputs)
        run.kv_bytes += [2 * sum(counts) * shape.kv_dim * element for counts in prefill_tokens]
        run.prefill_seconds += prefill_seconds
        run.decode_seconds += clock.times[-1] - clock.times[0] if clock.times else 0.0
        run.decode_steps += max(len(clock.times) - 1, 0)
    return run


def _prefill_tokens(cache, generated: int) -> list[list[int]]:
    """Per sample and layer, the prompt tokens that layer computed: its real keys minus the decoded ones."""
    fed_back = max(generated - 1, 0)  # the last generated token is never fed back into the cache
    per_layer = torch.stack([cache.num_keys(layer) - fed_back for layer in range(len(cache.layers))], dim=1)
    return per_layer.tolist()


def sample_groups(samples: list[Sample]) -> dict[str, list[int]]:
    """Rows of every sample (`all`), then of each question family, when the samples have families."""
    groups = {"all": list(range(len(samples)))}
    for family in sorted({s.family for s in samples if s.family}):
        groups[family] = [i for i, s in enumerate(samples) if s.family == family]
    return groups


def _correct(answer: str, sample: Sample) -> bool | None:
    """Whether `answer` is `sample`'s reference answer (exact match after `normalize_answer`); None if unknown."""
    return normalize_answer(answer) == normalize_answer(sample.answer) if sample.answer.strip() else None


def answer_flips(answers: list[str], reference: list[str], samples: list[Sample]) -> dict:
    """How a policy's `answers` move from the full model's `reference` answers on `samples`: `changed`, the share of
    samples whose answer differs (1 - agreement); over the `known` samples with a reference answer, the share the
    full model answers correctly and the policy not (`correct_to_wrong`), and the reverse (`wrong_to_correct`), so
    that the policy's accuracy is the full model's `- correct_to_wrong + wrong_to_correct`. `n` and `known` are the
    counts these are shares of (None where a count is 0)."""
    changed = sum(a != r for a, r in zip(answers, reference))
    pairs = [(_correct(r, s), _correct(a, s)) for a, r, s in zip(answers, reference, samples) if s.answer.strip()]
    known = len(pairs)
    return {
        "n": len(samples),
        "known": known,
        "changed": changed / len(samples) if samples else None,
        "correct_to_wrong": sum(full and not ours for full, ours in pairs) / known if known else None,
        "wrong_to_correct": sum(ours and not full for full, ours in pairs) / known if known else None,
    }


def summarize(run: PolicyRun, samples: list[Sample], reference: list[str], full_flops: list[int]) -> dict:
    n = len(samples)
    known = [s for s in samples if s.answer.strip()]
    shares = [share for share in run.visual_share if share is not None]
    correct = [_correct(a, s) for a, s in zip(run.answers, samples) if s.answer.strip()]
    flips = answer_flips(run.answers, reference, samples)
    groups = sample_groups(samples)
    return {
        "accuracy": sum(correct) / len(known) if known else None,
        "agreement": sum(a == r for a, r in zip(run.answers, reference)) / n,
        **{key: flips[key] for key in FLIPS},
        "flips_by_family": {family: answer_flips([run.answers[i] for i in rows], [reference[i] for i in rows],
                                                 [samples[i] for i in rows])
                            for family, rows in groups.items() if family != "all"},
        "lm_tflops": sum(run.prefill_flops) / n / 1e12,
        "vision_tflops": sum(run.vision_flops) / n / 1e12,
        "selection_tflops": sum(run.selection_flops) / n / 1e12,
        "total_tflops": (sum(run.prefill_flops) + sum(run.vision_flops) + sum(run.selection_flops)) / n / 1e12,
        "flops_saved": 1.0 - sum(run.prefill_flops) / sum(full_flops),
        "total_flops_saved": 1.0 - (sum(run.prefill_flops) + sum(run.vision_flops) + sum(run.selection_flops))
                             / (sum(full_flops) + sum(run.vision_flops)),
        "mean_exit_layer": sum(run.exit_layer) / n,
        "prefill_ms": 1000 * run.prefill_seconds / n,
        "selection_ms": 1000 * run.selection_seconds / n if run.prefill_seconds else None,
        "selection_share": run.selection_seconds / run.prefill_seconds if run.prefill_seconds else None,
        "decode_ms_per_token": 1000 * run.decode_seconds / run.decode_steps if run.decode_steps else None,
        "kv_bytes": sum(run.kv_bytes) / n,
        "visual_share": sum(shares) / len(shares) if shares else None,  # mean visual tokens per layer / prompt's
    }


def evaluate(engine: VisualExit, processor, samples: list[Sample], policy_names: list[str],
             settings: PolicySettings, batch_size: int = 16, max_new_tokens: int = 16, sweeps: bool = True,
             sweep_thresholds: list[float] = (), on_bad_sample: str = "skip", budgets: list[float] = (),
             budget_unit: int = 576, budget_methods: list[str] = (), budget_by: str = "tokens",
             budget_calibration: int = 4) -> dict:
    """Every policy on the same batches; the full model first, as the reference for agreement and FLOPs. With
    `sweeps`, also static exit at every `k` and dynamic exit at each of `sweep_thresholds` (for the Pareto plot).
    With `budgets` (in tokens of a `budget_unit`-token image), each of `budget_methods` at each budget, matched on
    `budget_by` (`budget.py`'s token rule, or FLOPs or prefill time, `cost.py`, solved on the first
    `budget_calibration` batches)."""
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
    results["decisions"] = {name: run.decisions for name, run in runs.items() if run.decisions}
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
        results["budget_unit"], results["budget_by"] = budget_unit, budget_by
        results["budget"] = _budget_rows(engine, processor, batches, kept, full, settings, max_new_tokens, budgets,
                                         budget_unit, budget_methods, results, budget_by,
                                         batches[:budget_calibration])
    return results


def matched_policy(engine: VisualExit, method: str, budget: float, unit: int, settings: PolicySettings, by: str,
                   calibration: list[dict], target: float | None) -> tuple[ExitPolicy | None, str]:
    """`method` (a budget method, or one composed with dynamic exit: `cdpruner+dynamic`) set to `budget`: by the
    token rule's formula (`by="tokens"`), or solved on `calibration` so its measured cost is at most `target`.
    Dynamic exit's free setting is its threshold; a composed pruner's is its own, with exit at the heads'
    threshold on top. Returns the policy and its setting in words, or None and why the budget is out of reach."""
    base, *rest = method.split("+")
    if rest and rest != ["dynamic"]:
        raise ValueError(f"budget method {method!r}: only a method composed with dynamic exit ('{base}+dynamic').")
    spec = REGISTRY[base]
    if (spec.needs.heads or rest) and settings.heads is None:
        raise ValueError(f"budget method {method!r} needs trained exit heads (heads=DIR).")
    share = budget / unit
    if spec.at_budget is None:  # a knob of the run's settings (dynamic exit's threshold), solved on its measured cost
        def make(x: float) -> ExitPolicy:
            return build_policy(base, replace(settings, **{spec.budget_knob: x}))
        cost_by, target, low = by, budget if by == "tokens" else target, 0.0
    else:
        def make(x: float) -> ExitPolicy | None:
            policy, _ = budget_policy(base, x, engine.num_layers, settings)
            if policy is not None and rest:
                policy = policy + DynamicExit(settings.heads, settings.threshold)
            return policy
        if by == "tokens":
            policy, setting = budget_policy(base, share, engine.num_layers, settings)
            return (make(share) if policy is not None else None), setting + (" + dynamic exit" if rest else "")
        cost_by, low = by, _lowest_setting(base, engine.num_layers, settings)
    solved = solve_setting(make, lambda p: prefill_cost(engine, calibration, p, cost_by, unit), target, low, 1.0)
    what = {"tokens": "equivalent tokens", "flops": "FLOPs", "prefill_ms": "prefill ms"}[cost_by]
    if solved is None:
        return None, f"out of reach: its cheapest setting costs more than the target {target:.4g} {what}"
    x, cost = solved
    setting = (f"{spec.budget_knob} {x:.3f}" if spec.at_budget is None
               else budget_policy(base, x, engine.num_layers, settings)[1] + (" + dynamic exit" if rest else ""))
    return make(x), f"{setting}; {what} {cost:.4g} of {target:.4g}"


def _lowest_setting(method: str, num_layers: int, settings: PolicySettings, steps: int = 20) -> float:
    """The smallest token share `method` can be set to (pruning inside the LLM cannot go below the layers it keeps
    whole), by bisection on whether `budget_policy` takes it; 1e-3 when every share can be taken."""
    low, high = 1e-3, 1.0
    if budget_policy(method, low, num_layers, settings)[0] is not None:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        if budget_policy(method, middle, num_layers, settings)[0] is None:
            low = middle
        else:
            high = middle
    return high


def _budget_rows(engine, processor, batches, samples, full: PolicyRun, settings: PolicySettings, max_new_tokens,
                 budgets, unit, methods, results, by: str, calibration: list[dict]) -> list[dict]:
    """The matched-budget table's rows: every method at every budget (timed, with its own selection cost), then
    dynamic exit at the heads' threshold (the budget it reaches itself). With `by` FLOPs or prefill time, a budget's
    target is the cost of uniform `RandomPrune(layer=0)` to `budget / unit` on `calibration`."""
    rows = []
    for budget in budgets:
        target = None if by == "tokens" else prefill_cost(engine, calibration, RandomPrune(0, budget / unit), by, unit)
        for method in methods:
            policy, setting = matched_policy(engine, method, budget, unit, settings, by, calibration, target)
            row = {"budget": budget, "method": method, "setting": setting}
            if policy is not None:
                row.update(_sweep_point(engine, processor, batches, policy, samples, full, max_new_tokens, timed=True))
                row["equivalent_tokens"] = _tokens(row["visual_share"], unit)
            rows.append(row)
    if "dynamic" in results["policies"]:
        threshold = "heads' threshold" if settings.threshold is None else f"threshold {settings.threshold}"
        metrics = results["policies"]["dynamic"]
        rows.append({"budget": None, "method": "dynamic", "setting": threshold,
                     "equivalent_tokens": _tokens(metrics["visual_share"], unit),
                     **{k: metrics[k] for k in POINT_METRICS + TIMED_METRICS}})
    return rows


def _tokens(share: float | None, unit: int) -> float | None:
    return None if share is None else share * unit


POINT_METRICS = ("accuracy", "agreement", *FLIPS, "flips_by_family", "flops_saved", "lm_tflops", "total_tflops",
                 "selection_tflops", "mean_exit_layer", "visual_share")
TIMED_METRICS = ("prefill_ms", "selection_ms", "selection_share")


def _sweep_point(engine, processor, batches, policy, samples, full: PolicyRun, max_new_tokens, timed: bool = False
                 ) -> dict:
    run = run_policy(engine, processor, batches, policy, max_new_tokens, timed=timed)
    summary = summarize(run, samples, full.answers, full.prefill_flops)
    return {k: summary[k] for k in POINT_METRICS + (TIMED_METRICS if timed else ())}


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
        by = results.get("budget_by", "tokens")
        (output_dir / ("budget.md" if by == "tokens" else f"budget_{by}.md")).write_text(budget_table + "\n")
        matched = "" if by == "tokens" else f", matched on {by}"
        table += (f"\n\nEqual visual-token budgets (equivalent tokens of a {results['budget_unit']}-token image"
                  f"{matched}, docs/design.md):\n\n{budget_table}")
    return table


def format_table(results: dict) -> str:
    """The policies' table; with families, below it each policy's answer flips per family (`flips_table`)."""
    columns = ("accuracy", "agreement", *FLIPS, "mean_exit_layer", "lm_tflops", "total_tflops", "flops_saved",
               "prefill_ms", "decode_ms_per_token", "kv_bytes")
    rows = [[name, *(number(metrics[c]) for c in columns)] for name, metrics in results["policies"].items()]
    table = markdown_table(["policy", *columns], rows)
    by_family = flips_table([([name], metrics["flips_by_family"]) for name, metrics in results["policies"].items()],
                            ["policy"])
    return table + (f"\n\n{by_family}" if by_family else "")
