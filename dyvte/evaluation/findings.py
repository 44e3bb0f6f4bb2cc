"""The DyVTE paper's empirical findings, measured on any supported model (`analyze.py`).

- **Attention stages** (the paper's Figures 3, 8–12): per decoder layer, the mean and spread over samples of the
  attention mass in the parts of the prompt's attention the paper names: visual self-attention (visual queries on
  visual keys), cross-attention (text queries on visual keys) and text self-attention (text queries on text keys);
  and the three stages it reads off the cross-attention (early fusion, intra-modality modelling, multimodal
  reasoning), found by the rule in `stage_rule`.
- **Withdrawal sweep** (Figure 4): accuracy and agreement with the full model when every sample's visual tokens
  leave before layer `k`, for a grid of `k`.
- **Entropy** (Figures 5, 13–16): the entropy of the text queries' attention over the visual keys (cross) and over
  the text keys (text self), per layer, without and with an exit policy.
Each is reported over all samples and per question family (`Sample.family`) where the data has families.

Definitions. The queries are the prompt's visual tokens (those that may exit, `PrefillState.visual_mask`) and its
text tokens after the first visual token (`adapter.text_mask(span="after_first_visual")`: the question and the
chat template's assistant prefix; the text before the image cannot see it). The keys are every prompt token the
layer computes on, split into visual and text (the text before the image included, with its attention sinks).
A query's *mass* on a part is the share of its attention, averaged over heads, that falls on the part's keys, so
for every query the mass on visual keys plus the mass on text keys is 1: `visual_self + visual_text = 1` for a
visual query and `cross + text_self = 1` for a text query. The paper plots "averaged attention scores" of each
block; a block's mean weight is its mass divided by the number of keys a query sees in it, which does not change
with the layer, so the layer curves and the stage boundaries are those of the masses. A sample's value at a layer
is the mean over its queries (and heads); the spread is the standard deviation over samples (population, ddof 0).
The entropy of a part (nats) is that of a query's attention over the part's keys renormalised to sum to 1,
per head, averaged over heads and the text queries; a sample whose visual tokens have left has no cross entropy
(not counted) and its text self entropy is that of attention over the text keys, which is then all it has.

The attention is recomputed layer by layer for the chosen queries only, from each layer's own input, projections
and rotary (`adapter.query_probabilities`), inside the engine's own prefill (the recorder is an `ExitPolicy` that
observes every sub-batch a layer runs on and decides nothing), so the model keeps running with SDPA.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import PromptCollator, Sample
from ..engine import Decision, ExitPolicy, PrefillState, SubBatch, VisualExit
from ..files import atomic_write_text
from ..policies import NoExit, StaticExit
from .compare import PolicyRun, run_policy, sample_groups, summarize
from .plots import plot_attention_stages, plot_entropy, plot_withdrawal
from .tables import markdown_table, number

PARTS = ("visual_self", "visual_text", "cross", "text_self")
PART_TITLES = {
    "visual_self": "visual self-attention (visual → visual)",
    "visual_text": "visual → text",
    "cross": "cross-attention (text → visual)",
    "text_self": "text self-attention (text → text)",
}
ENTROPIES = ("cross", "text_self")
STAGES = ("early_fusion", "intra_modality", "multimodal_reasoning")
MIN_DIP = 0.1  # the intra-modality level must lie this share of the curve's range below both outer levels


def stage_rule(min_dip: float = MIN_DIP) -> str:
    """The rule `stage_boundaries` applies, in words (written to the report)."""
    return (
        "The layer means of the cross-attention mass (text queries on visual keys) are fit by a step function of "
        "three levels, the means over layers [0, b1), [b1, b2) and [b2, L), with 1 <= b1 < b2 <= L-1. Among the "
        "splits whose middle level lies below both outer levels by at least "
        f"{min_dip:g} of the curve's range (max - min over layers) (the paper's high-low-high: early fusion, the "
        "dip of intra-modality modelling, multimodal reasoning as cross-attention resumes), the one with the least "
        "squared error is taken (ties: the smallest b1, then b2). b1 is the first layer of intra-modality modelling "
        "and b2 the first of multimodal reasoning (the paper's two red lines). No such split: no stages."
    )


class AttentionRecorder(ExitPolicy):
    """Records, per sample and decoder layer, the attention masses of `PARTS` and the entropies of `ENTROPIES`
    (see the module docstring), from the sub-batches each layer really runs on; decides nothing.

    Compose it with an exit policy (`DynamicExit(heads) + AttentionRecorder()`) to record attention under exit.
    After a prefill, `values[name]` is [B, L] (NaN where a sample has no such queries or keys at that layer).
    `query_chunk` bounds the queries whose weights are held at once ([b, heads, query_chunk, n] per call).
    """

    name = "attention_recorder"

    def __init__(self, query_chunk: int = 64):
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be at least 1, got {query_chunk}.")
        self.query_chunk = query_chunk
        self.values: dict[str, torch.Tensor] = {}
        self._text_queries: torch.Tensor | None = None  # [B, T] this prefill's text queries

    def reset(self, state: PrefillState) -> None:
        batch, num_layers = state.input_ids.shape[0], state.num_layers
        self._text_queries = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        )
        names = [*PARTS, *(f"entropy_{name}" for name in ENTROPIES)]
        self.values = {name: torch.full((batch, num_layers), float("nan")) for name in names}

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        return Decision()

    def observe(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> None:
        adapter = state.adapter
        layer = adapter.layers[layer_idx]
        visual_keys = sub.slots_of(state.visual_mask)
        rows = sub.rows.cpu()
        sums = self._query_sums(adapter, layer, sub, visual_keys, visual_keys)
        self._store("visual_self", layer_idx, rows, sums["on_visual"], sums["count"])
        self._store("visual_text", layer_idx, rows, sums["on_text"], sums["count"])
        sums = self._query_sums(adapter, layer, sub, sub.slots_of(self._text_queries), visual_keys, entropy=True)
        self._store("cross", layer_idx, rows, sums["on_visual"], sums["count"])
        self._store("text_self", layer_idx, rows, sums["on_text"], sums["count"])
        has_visual = visual_keys.any(dim=1)
        self._store("entropy_cross", layer_idx, rows, sums["entropy_visual"], sums["count"] * has_visual)
        self._store("entropy_text_self", layer_idx, rows, sums["entropy_text"], sums["count"])

    def _store(self, name: str, layer_idx: int, rows: torch.Tensor, total: torch.Tensor, count: torch.Tensor):
        """The per-query mean `total / count` of each row, NaN where `count` is 0."""
        mean = (total / count.clamp(min=1)).masked_fill(count == 0, float("nan"))
        self.values[name][rows, layer_idx] = mean.float().cpu()

    def _query_sums(self, adapter, layer, sub: SubBatch, queries: torch.Tensor, visual_keys: torch.Tensor,
                    entropy: bool = False) -> dict[str, torch.Tensor]:
        """Per row of `sub`, sums over its `queries` and the heads ([b] each): the mass on visual keys
        (`on_visual`) and on text keys (`on_text`), the number of (query, head) pairs (`count`) and, with
        `entropy`, the entropies over the visual keys and over the text keys."""
        text_keys = sub.valid & ~visual_keys
        rank = queries.long().cumsum(dim=1) - 1
        names = ("on_visual", "on_text", "count", "entropy_visual", "entropy_text")
        sums = {name: torch.zeros(len(sub), device=queries.device) for name in names}
        most = int(queries.sum(dim=1).max()) if len(sub) else 0
        for chunk in range(math.ceil(most / self.query_chunk)):
            chosen = queries & (rank >= chunk * self.query_chunk) & (rank < (chunk + 1) * self.query_chunk)
            probabilities, _, used = adapter.query_probabilities(layer, sub, chosen)  # [b, heads, w, n]
            probabilities = probabilities.float()
            sums["on_visual"] += (probabilities * visual_keys[:, None, None, :]).sum(dim=(1, 2, 3))
            sums["on_text"] += (probabilities * text_keys[:, None, None, :]).sum(dim=(1, 2, 3))
            sums["count"] += used.sum(dim=1) * probabilities.shape[1]
            if entropy:
                sums["entropy_visual"] += _renormalised_entropy(probabilities, visual_keys).sum(dim=(1, 2))
                sums["entropy_text"] += _renormalised_entropy(probabilities, text_keys).sum(dim=(1, 2))
        return sums


def _renormalised_entropy(probabilities: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[b, heads, w] entropy (nats) of each query's attention over `keys` ([b, n]), renormalised over them (0 for
    filler queries and for queries without such keys)."""
    part = probabilities * keys[:, None, None, :]
    part = part / part.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(part.dtype).tiny)
    return -torch.special.xlogy(part, part).sum(dim=-1)


@dataclass
class AttentionRecord:
    """Per sample (in batch order) and layer, the recorded attention values, and each sample's exit layer."""

    values: dict[str, torch.Tensor]  # name -> [N, L]
    exit_layer: torch.Tensor  # [N]


@torch.no_grad()
def record_attention(engine: VisualExit, batches: list[dict], policy: ExitPolicy | None = None,
                     query_chunk: int = 64) -> AttentionRecord:
    """`AttentionRecorder`'s values over every processor batch, in the engine's prefill (generation positions),
    under `policy` (None: the full model)."""
    recorder = AttentionRecorder(query_chunk)
    running = recorder if policy is None else policy + recorder
    values, exits = [], []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        out = engine.prefill(**inputs, policy=running, use_cache=False)
        values.append(recorder.values)
        exits.append(out.exit_layer.cpu())
    names = values[0].keys() if values else []
    return AttentionRecord({name: torch.cat([v[name] for v in values]) for name in names},
                           torch.cat(exits) if exits else torch.zeros(0, dtype=torch.long))


def layer_stats(values: torch.Tensor) -> dict:
    """Per layer of `values` [N, L]: the mean and standard deviation (ddof 0) over the samples where it is
    defined (not NaN), and how many those are."""
    defined = ~values.isnan()
    samples = defined.sum(dim=0)
    mean = values.nan_to_num().sum(dim=0) / samples.clamp(min=1)
    spread = ((values - mean).nan_to_num() ** 2).sum(dim=0) / samples.clamp(min=1)
    missing = samples == 0
    return {
        "mean": _floats(mean.masked_fill(missing, float("nan"))),
        "std": _floats(spread.sqrt().masked_fill(missing, float("nan"))),
        "samples": samples.tolist(),
    }


def _floats(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def stage_boundaries(cross: list[float], min_dip: float = MIN_DIP) -> dict:
    """The stage boundaries of one cross-attention curve (a mean per layer) by `stage_rule(min_dip)`.

    Returns `boundaries` `[b1, b2]`, the `stages` as inclusive layer ranges, the three fitted `levels` and the
    `squared_error`; or `boundaries` None and the `reason`."""
    num_layers = len(cross)
    if num_layers < 3:
        return {"boundaries": None, "reason": f"three stages need at least 3 layers; the curve has {num_layers}"}
    if any(value is None or math.isnan(value) for value in cross):
        return {"boundaries": None, "reason": "the cross-attention curve is undefined at some layer"}
    margin = min_dip * (max(cross) - min(cross))
    best = None
    for b1 in range(1, num_layers - 1):
        for b2 in range(b1 + 1, num_layers):
            segments = (cross[:b1], cross[b1:b2], cross[b2:])
            levels = [sum(segment) / len(segment) for segment in segments]
            if not (levels[1] + margin < levels[0] and levels[1] + margin < levels[2]):
                continue
            error = sum((value - level) ** 2 for segment, level in zip(segments, levels) for value in segment)
            if best is None or error < best[0]:
                best = (error, b1, b2, levels)
    if best is None:
        return {"boundaries": None, "reason": f"no split has a middle level {min_dip:g} of the range below both "
                                              "outer ones: cross-attention does not dip and resume"}
    error, b1, b2, levels = best
    return {
        "boundaries": [b1, b2],
        "stages": dict(zip(STAGES, ([0, b1 - 1], [b1, b2 - 1], [b2, num_layers - 1]))),
        "levels": levels,
        "squared_error": error,
    }


@dataclass
class WithdrawalSweep:
    """Generation with every sample's visual tokens withdrawn before layer `k`, for each `k` of `layers`; `full`
    is the full model (the reference for agreement)."""

    layers: list[int]
    full: PolicyRun
    runs: dict[int, PolicyRun]


def withdrawal_sweep(engine: VisualExit, processor, batches: list[dict], layers: list[int],
                     max_new_tokens: int) -> WithdrawalSweep:
    """Static exit at each `k` of `layers` (`k = L`: every layer sees the image) through `compare.run_policy`."""
    bad = [k for k in layers if not 0 <= k <= engine.num_layers]
    if bad:
        raise ValueError(f"withdrawal layers {bad} outside [0, {engine.num_layers}] (0 = text only, "
                         f"{engine.num_layers} = the full model).")
    full = run_policy(engine, processor, batches, NoExit(), max_new_tokens, timed=False)
    runs = {k: run_policy(engine, processor, batches, StaticExit(k), max_new_tokens, timed=False) for k in layers}
    return WithdrawalSweep(list(layers), full, runs)


def _rows_of(run: PolicyRun, rows: list[int]) -> PolicyRun:
    """The samples `rows` of `run` (untimed)."""
    def pick(values):
        return [values[i] for i in rows]

    return PolicyRun(pick(run.answers), pick(run.exit_layer), pick(run.prefill_flops), pick(run.vision_flops),
                     pick(run.kv_bytes), 0.0, 0.0, 0, pick(run.visual_share))


def sweep_summary(sweep: WithdrawalSweep, samples: list[Sample], groups: dict[str, list[int]]) -> dict:
    """Per group of sample rows: the full model's accuracy, and accuracy, agreement and FLOPs saved at each `k`."""
    out = {}
    for group, rows in groups.items():
        chosen = [samples[i] for i in rows]
        full = _rows_of(sweep.full, rows)
        reference = summarize(full, chosen, full.answers, full.prefill_flops)
        points = []
        for k in sweep.layers:
            metrics = summarize(_rows_of(sweep.runs[k], rows), chosen, full.answers, full.prefill_flops)
            points.append({"k": k, **{key: metrics[key] for key in ("accuracy", "agreement", "flops_saved")}})
        out[group] = {"full_model_accuracy": reference["accuracy"], "points": points}
    return out


@dataclass
class AnalysisSettings:
    """What `analyze` runs: `policy` (an exit policy, or None) is compared with the full model in the entropy
    part under the name `policy_name`; `withdrawal_layers` None is every layer `0..L`."""

    policy: ExitPolicy | None = None
    policy_name: str = "none"
    withdrawal_layers: list[int] | None = None
    batch_size: int = 16
    max_new_tokens: int = 16
    query_chunk: int = 64
    on_bad_sample: str = "skip"
    min_dip: float = MIN_DIP  # of the stage rule


def analyze(engine: VisualExit, processor, samples: list[Sample], settings: AnalysisSettings) -> dict:
    """The three findings on `samples` (see the module docstring), as one JSON-ready dict."""
    engine.adapter.check_query_attention("the attention analysis (attention stages and entropy)")
    collator = PromptCollator(processor, on_bad_sample=settings.on_bad_sample, require_answer=False)
    size = settings.batch_size
    batches = [collator(samples[i : i + size]) for i in range(0, len(samples), size)]
    batches = [b for b in batches if b["samples"]]
    kept = [s for b in batches for s in b["samples"]]
    if not kept:
        raise ValueError("no usable samples to analyse (every sample was skipped as bad; see data.on_bad_sample).")
    groups = sample_groups(kept)
    num_layers = engine.num_layers

    full = record_attention(engine, batches, None, settings.query_chunk)
    attention, stages = {}, {"rule": stage_rule(settings.min_dip), "min_dip": settings.min_dip}
    for group, rows in groups.items():
        attention[group] = {part: layer_stats(full.values[part][rows]) for part in PARTS}
        stages[group] = stage_boundaries(attention[group]["cross"]["mean"], settings.min_dip)

    entropy = {"policy": settings.policy_name, "without": _entropy_stats(full, groups)}
    if settings.policy is not None:
        exited = record_attention(engine, batches, settings.policy, settings.query_chunk)
        entropy["with"] = _entropy_stats(exited, groups)
        entropy["mean_exit_layer"] = {group: float(exited.exit_layer[rows].float().mean()) for group, rows in
                                      groups.items()}
        entropy["text_self_shift"] = _text_self_shift(full, exited, groups)

    layers = list(range(num_layers + 1)) if settings.withdrawal_layers is None else list(settings.withdrawal_layers)
    sweep = withdrawal_sweep(engine, processor, batches, layers, settings.max_new_tokens)
    return {
        "num_layers": num_layers,
        "samples": len(kept),
        "skipped": [s for b in batches for s in b["skipped"]],
        "groups": {group: len(rows) for group, rows in groups.items()},
        "stages": stages,
        "attention": attention,
        "withdrawal": sweep_summary(sweep, kept, groups),
        "entropy": entropy,
    }


def _entropy_stats(record: AttentionRecord, groups: dict[str, list[int]]) -> dict:
    return {group: {name: layer_stats(record.values[f"entropy_{name}"][rows]) for name in ENTROPIES}
            for group, rows in groups.items()}


def _text_self_shift(full: AttentionRecord, exited: AttentionRecord, groups: dict[str, list[int]]) -> dict:
    """Per group and layer, the mean change of the text self entropy under the policy (with minus without) over
    the samples whose visual tokens have left by that layer, and how many those are."""
    num_layers = full.values["entropy_text_self"].shape[1]
    gone = exited.exit_layer[:, None] <= torch.arange(num_layers)[None, :]  # [N, L]
    change = (exited.values["entropy_text_self"] - full.values["entropy_text_self"]).masked_fill(~gone, float("nan"))
    out = {}
    for group, rows in groups.items():
        stats = layer_stats(change[rows])
        out[group] = {"mean": stats["mean"], "samples": stats["samples"]}
    return out


def write_analysis(results: dict, output_dir: Path) -> str:
    """`analysis.json`, `analysis.md` (returned) and the plots: `attention_stages.png` (all samples),
    `attention_stages_by_family.png` (when there are families), `withdrawal.png` and `entropy.png`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "analysis.json", json.dumps(results, indent=2))
    report = format_analysis(results)
    atomic_write_text(output_dir / "analysis.md", report + "\n")
    plot_attention_stages(results, output_dir / "attention_stages.png", ["all"])
    families = [group for group in results["groups"] if group != "all"]
    if families:
        plot_attention_stages(results, output_dir / "attention_stages_by_family.png", families, dpi=80)
    plot_withdrawal(results, output_dir / "withdrawal.png")
    plot_entropy(results, output_dir / "entropy.png")
    return report


def _mean_std(stats: dict, layer: int) -> str:
    mean, std = stats["mean"][layer], stats["std"][layer]
    return "—" if mean is None else f"{mean:.3f} ± {std:.3f}"


def format_analysis(results: dict) -> str:
    """The findings as Markdown: stage boundaries per group, attention masses and entropy per layer (all samples),
    and the withdrawal sweep's accuracy per group."""
    stages = results["stages"]
    stage_rows = []
    for group in results["groups"]:
        found = stages[group]
        if found["boundaries"] is None:
            stage_rows.append([group, results["groups"][group], "—", "—", "—", found["reason"]])
            continue
        ranges = ["–".join(map(str, found["stages"][stage])) for stage in STAGES]
        levels = " / ".join(f"{level:.3f}" for level in found["levels"])
        stage_rows.append([group, results["groups"][group], *ranges, levels])
    stage_table = markdown_table(["group", "samples", "early fusion", "intra-modality", "multimodal reasoning",
                                  "cross-attention levels"], stage_rows)

    attention = results["attention"]["all"]
    entropy = results["entropy"]
    with_policy = "with" in entropy
    header = ["layer", *(PART_TITLES[part] for part in PARTS), "cross entropy", "text self entropy"]
    if with_policy:
        header += [f"cross entropy ({entropy['policy']})", f"text self entropy ({entropy['policy']})",
                   "text self entropy shift (exited samples)"]
    layer_rows = []
    for layer in range(results["num_layers"]):
        row = [layer, *(_mean_std(attention[part], layer) for part in PARTS),
               *(_mean_std(entropy["without"]["all"][name], layer) for name in ENTROPIES)]
        if with_policy:
            cross = entropy["with"]["all"]["cross"]
            shift = entropy["text_self_shift"]["all"]
            row += [f"{_mean_std(cross, layer)} (n={cross['samples'][layer]})",
                    _mean_std(entropy["with"]["all"]["text_self"], layer),
                    "—" if shift["mean"][layer] is None
                    else f"{shift['mean'][layer]:+.4f} (n={shift['samples'][layer]})"]
        layer_rows.append(row)
    layer_table = markdown_table(header, layer_rows)

    withdrawal = results["withdrawal"]
    groups = list(withdrawal)
    ks = [point["k"] for point in withdrawal["all"]["points"]]
    sweep_rows = [[k, *(number(withdrawal[g]["points"][i]["accuracy"]) for g in groups),
                   number(withdrawal["all"]["points"][i]["agreement"]),
                   number(withdrawal["all"]["points"][i]["flops_saved"])] for i, k in enumerate(ks)]
    sweep_rows.append(["full model", *(number(withdrawal[g]["full_model_accuracy"]) for g in groups), "1", "0"])
    sweep_table = markdown_table(["k", *(f"accuracy {g}" for g in groups), "agreement all", "FLOPs saved all"],
                                 sweep_rows)
    policy_line = (f"Entropy with `{entropy['policy']}` (mean exit layer {entropy['mean_exit_layer']['all']:.2f})."
                   if with_policy else "No exit policy was compared (analysis.policy=none).")
    return "\n\n".join([
        f"# Findings ({results['samples']} samples, {results['num_layers']} layers)",
        f"## Attention stages\n\n{stages['rule']}\n\n{stage_table}",
        f"## Attention mass and entropy per layer (all samples, mean ± std)\n\n{policy_line}\n\n{layer_table}",
        f"## Withdrawal sweep: visual tokens withdrawn before layer k\n\n{sweep_table}",
    ])
