"""Dynamic exit simulated from the label cache: what the heads would decide, and what that would cost and keep.

Exact, not an estimate: the cache says for every exit layer whether greedy generation reproduces the full
model's answer (`match`) and whether it is right (`accurate`), so no model pass is needed to score a threshold.
"""

import torch
from datasets import Dataset

from .. import flops
from ..heads import ExitHeads
from .heads_module import EVAL_BATCH, head_inputs, head_labels, head_stat_scores, layer_metrics, torch_columns


@torch.no_grad()
def exit_probabilities(heads: ExitHeads, dataset: Dataset) -> torch.Tensor:
    """p(exit) [N, L] of every head for every sample of `dataset` (read `EVAL_BATCH` rows at a time)."""
    chunks = [heads(head_inputs(dataset, heads.config, slice(start, start + EVAL_BATCH))).softmax(dim=-1)[..., 1]
              for start in range(0, len(dataset), EVAL_BATCH)]
    return torch.cat(chunks) if chunks else torch.zeros(0, heads.num_layers)


def first_exit(p_exit: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Exit layer per sample: `i + 1` for the first head `i` with `p_exit > threshold` (one threshold, or one per
    head [L]), else `L` (no exit)."""
    above = p_exit > torch.as_tensor(threshold, dtype=p_exit.dtype)
    num_layers = p_exit.shape[1]
    return torch.where(above.any(dim=1), above.int().argmax(dim=1) + 1, torch.full_like(above[:, 0], num_layers,
                                                                                         dtype=torch.long))


def first_safe_exit(dataset: Dataset) -> torch.Tensor:
    """Exit layer per sample at its first safe label among the exits a head can take (1..L): what heads trained
    on these labels would do if they were perfect, reported next to them so their headroom is visible."""
    safe = torch_columns(dataset, ["labels"])["labels"][:, 1:] == 1
    return torch.where(safe.any(dim=1), safe.int().argmax(dim=1) + 1, safe.shape[1])


def family_static_exits(calibration: Dataset, min_agreement: float) -> dict[str, int]:
    """Per question family, the earliest exit layer that keeps `min_agreement` of the family's answers on
    `calibration`: one static layer per task, as VTW chooses it, but by agreement. Heads that only recognised the
    family would do as well as this; exiting earlier needs evidence from the sample itself."""
    match = torch_columns(calibration, ["match"])["match"].float()
    families = calibration["family"]
    layers = {}
    for family in sorted(set(families)):
        rows = [i for i, f in enumerate(families) if f == family]
        layers[family] = int((match[rows].mean(dim=0) >= min_agreement).int().argmax())  # exit L always agrees
    return layers


def score_family_static(calibration: Dataset, dataset: Dataset, model_config, min_agreement: float) -> dict:
    """`family_static_exits` chosen on `calibration`, scored on `dataset` (a family unseen in calibration: no exit)."""
    layers = family_static_exits(calibration, min_agreement)
    num_layers = len(calibration[0]["match"]) - 1
    exit_layer = torch.tensor([layers.get(family, num_layers) for family in dataset["family"]])
    return {"layers": layers, **score_exits(dataset, exit_layer, model_config)}


def labelled_everywhere(dataset: Dataset) -> bool:
    """Every exit layer of every sample labelled (`labels.layers=all`), as static and oracle scores need."""
    return bool((torch_columns(dataset, ["labels"])["labels"] >= 0).all())


def prefill_costs(dataset: Dataset, model_config) -> torch.Tensor:
    """[N, L+1] LM prefill FLOPs of every sample with exit at every layer `k = 0..L` (int64, exact)."""
    table = torch_columns(dataset, ["n_text", "n_visual"])
    num_layers = flops.DecoderShape.from_config(model_config).num_layers
    return torch.tensor([
        [flops.prefill_flops(model_config, t, v, k) for k in range(num_layers + 1)]
        for t, v in zip(table["n_text"].tolist(), table["n_visual"].tolist())
    ])


def score_exits(dataset: Dataset, exit_layer: torch.Tensor, model_config) -> dict:
    """Agreement with the full model, accuracy, the answer flips (answers changed, full model right and exit wrong,
    and the reverse: accuracy = full accuracy - correct_to_wrong + wrong_to_correct), LM prefill FLOPs saved and
    TFLOPs per sample for given exit layers.

    `lm_tflops` counts the LM prefill at each sample's exit; `vision_tflops` the vision tower and projector, which
    every exit layer pays in full; `total_tflops` both (the paper's whole-model figure)."""
    table = torch_columns(dataset, ["match", "accurate", "vision_flops"])
    rows = torch.arange(len(exit_layer))
    costs = prefill_costs(dataset, model_config)
    full, spent = costs[:, -1].tolist(), costs[rows, exit_layer].tolist()
    vision = sum(table["vision_flops"].tolist())
    accurate, full_accurate = table["accurate"][rows, exit_layer].bool(), table["accurate"][:, -1].bool()
    return {
        "agreement": float(table["match"][rows, exit_layer].float().mean()),
        "accuracy": float(accurate.float().mean()),
        "full_accuracy": float(full_accurate.float().mean()),
        "changed": float(1 - table["match"][rows, exit_layer].float().mean()),
        "correct_to_wrong": float((full_accurate & ~accurate).float().mean()),
        "wrong_to_correct": float((~full_accurate & accurate).float().mean()),
        "flops_saved": 1.0 - sum(spent) / sum(full),
        "mean_exit_layer": float(exit_layer.float().mean()),
        "lm_tflops": sum(spent) / len(spent) / 1e12,
        "vision_tflops": vision / len(spent) / 1e12,
        "total_tflops": (sum(spent) + vision) / len(spent) / 1e12,
        "full_lm_tflops": sum(full) / len(full) / 1e12,
        "full_total_tflops": (sum(full) + vision) / len(full) / 1e12,
    }


def lowest_agreeing_threshold(p_exit: torch.Tensor, kept: torch.Tensor, min_agreement: float,
                              thresholds: list[float]) -> float:
    """The lowest of `thresholds` (most saving) whose agreement on the rows (p(exit) [N, L], `kept` [N, L+1] bool:
    the answer is kept with exit at k) is at least `min_agreement`; the highest if none is."""
    rows = torch.arange(len(p_exit))
    for threshold in sorted(thresholds):
        if kept[rows, first_exit(p_exit, threshold)].float().mean() >= min_agreement:
            return threshold
    return max(thresholds)


def point_estimate_thresholds(p_exit: torch.Tensor, kept: torch.Tensor, costs: torch.Tensor, min_agreement: float,
                              thresholds: list[float], decision: str) -> tuple[float, ...]:
    """The point estimate [L] on the rows (p(exit) [N, L], `kept` [N, L+1], LM prefill FLOPs `costs` [N, L+1]): the
    lowest global threshold keeping `min_agreement` (`lowest_agreeing_threshold`), for every head; with
    `decision=per_layer`, then lowered head by head (`layer_thresholds`)."""
    start = lowest_agreeing_threshold(p_exit, kept, min_agreement, thresholds)
    if decision == "global":
        return (float(start),) * p_exit.shape[1]
    return layer_thresholds(p_exit, kept, costs, min_agreement, thresholds, start)


def choose_threshold(p_exit: torch.Tensor, dataset: Dataset, model_config, min_agreement: float,
                     thresholds: list[float]) -> tuple[float, list]:
    """`lowest_agreeing_threshold` on the rows of `dataset`, given the heads' p(exit) [N, L] for them
    (`exit_probabilities`, or out-of-fold ones), with the sweep of every threshold's scores."""
    sweep = [{"threshold": t, **score_exits(dataset, first_exit(p_exit, t), model_config)} for t in thresholds]
    match = torch_columns(dataset, ["match"])["match"].bool()
    return lowest_agreeing_threshold(p_exit, match, min_agreement, thresholds), sweep


def choose_layer_thresholds(p_exit: torch.Tensor, dataset: Dataset, model_config, min_agreement: float,
                            thresholds: list[float], start: float) -> tuple[float, ...]:
    """One threshold per head, given the heads' p(exit) [N, L] for the rows of `dataset`: `layer_thresholds` on
    the rows' labels and LM prefill FLOPs."""
    match = torch_columns(dataset, ["match"])["match"]
    return layer_thresholds(p_exit, match, prefill_costs(dataset, model_config), min_agreement, thresholds, start)


def layer_thresholds(p_exit: torch.Tensor, match: torch.Tensor, costs: torch.Tensor, min_agreement: float,
                     thresholds: list[float], start: float) -> tuple[float, ...]:
    """One threshold per head from one global threshold `start` that keeps `min_agreement` on the rows (p(exit)
    [N, L], `match` [N, L+1] bool: the answer is kept with exit at k, LM prefill FLOPs `costs` [N, L+1]): again
    and again, lower one head's threshold to the next lower value of `thresholds`, the change that saves the most
    LM prefill FLOPs while agreement stays at least `min_agreement`, until no change passes. So the result agrees
    and saves at least as much as `start` on the rows; the last head's exit is the full model, and its threshold
    stays `start`. All changes of one step are scored at once."""
    num_layers = p_exit.shape[1]
    grid = sorted(thresholds)

    def exits(vectors: torch.Tensor) -> torch.Tensor:  # [V, L] threshold vectors -> [N, V] exit layers
        above = p_exit[:, None, :] > vectors.to(p_exit.dtype)[None]
        return torch.where(above.any(dim=2), above.int().argmax(dim=2) + 1, num_layers)

    current = torch.full((1, num_layers), float(start), dtype=torch.float64)
    chosen = exits(current)
    if match.gather(1, chosen).float().mean() < min_agreement:
        return tuple(current[0].tolist())
    spent = int(costs.gather(1, chosen).sum())
    while True:
        trials = []
        for head in range(num_layers - 1):
            lower = [t for t in grid if t < current[0, head]]
            if lower:
                trial = current.clone()
                trial[0, head] = lower[-1]
                trials.append(trial)
        if not trials:
            break
        trial_exits = exits(torch.cat(trials))
        agreeing = match.gather(1, trial_exits).float().mean(dim=0) >= min_agreement
        trial_spent = costs.gather(1, trial_exits).sum(dim=0)
        better = agreeing & (trial_spent < spent)
        if not better.any():
            break
        best = int(torch.where(better, trial_spent, trial_spent.max() + 1).argmin())  # the first of equal savings
        current, spent = trials[best], int(trial_spent[best])
    return tuple(current[0].tolist())


def head_metrics(heads: ExitHeads, dataset: Dataset) -> list[dict]:
    """Per head: accuracy, precision/recall of the exit class at 0.5 against the labels the heads were trained
    on, and how often exit is safe."""
    p_exit = exit_probabilities(heads, dataset)
    labels = head_labels(dataset, heads.config.label_shape, heads.config.label_target)
    stats = head_stat_scores(heads.num_layers, sync_on_compute=False)  # one process scores the whole split
    stats.update((p_exit > 0.5).int(), labels)
    return [{"layer": i, **m} for i, m in enumerate(layer_metrics(stats.compute()))]


def validate(heads: ExitHeads, dataset: Dataset, model_config, threshold: float | tuple[float, ...],
             calibration: Dataset | None, min_agreement: float) -> dict:
    """Dynamic exit at `threshold` (one, or one per head) on `dataset`, per family, and (with every exit layer
    labelled) the references: static exit at each layer, the label oracle, and per-family static exit chosen on
    `calibration`."""
    p_exit = exit_probabilities(heads, dataset)
    exit_layer = first_exit(p_exit, torch.tensor(threshold) if isinstance(threshold, tuple) else threshold)
    result = {"threshold": list(threshold) if isinstance(threshold, tuple) else threshold, "samples": len(dataset),
              **score_exits(dataset, exit_layer, model_config)}
    families = dataset["family"]
    by_family = {}
    for family in sorted(set(families)):
        rows = [i for i, f in enumerate(families) if f == family]
        by_family[family] = score_exits(dataset.select(rows), exit_layer[rows], model_config)
    result["families"] = by_family
    dense = labelled_everywhere(dataset)
    result["static_sweep"] = [
        {"k": k, **score_exits(dataset, torch.full((len(dataset),), k), model_config)}
        for k in range(heads.num_layers + 1)
    ] if dense else []
    result["label_oracle"] = score_exits(dataset, first_safe_exit(dataset), model_config) if dense else {}
    if dense and calibration is not None and labelled_everywhere(calibration):
        result["family_static"] = score_family_static(calibration, dataset, model_config, min_agreement)
    return result
