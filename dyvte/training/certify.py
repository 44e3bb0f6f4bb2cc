"""Certified exit thresholds: Learn-then-Test with fixed-sequence testing along an ordered path of threshold vectors.

The question a deployment asks is how many answers exit changes. With per-head thresholds `tau` ([L], head `i`
exits at `i + 1` when `p_exit > tau_i`, the first such head wins), the risk is the disagreement rate with the full
model on new samples, `R(tau) = P(answer with exit != full answer)`. `certify` picks `tau` such that

    P_calibration( R(tau_hat) <= 1 - target ) >= confidence        (LTT's (alpha, delta) risk control)

over the draw of the calibration rows, which must be exchangeable with the new samples and unseen by the heads.

Procedure (Angelopoulos, Bates, Candes, Jordan, Lei 2021, "Learn then Test"; CALM, Schuster et al. 2022, calibrates
its early exits the same way; the papers' section and equation numbers are not cited, they were not checked here):
1. Split the calibration rows at random into path rows and test rows (the split "Pareto testing", Laufer-Goldshtein
   et al. 2023, makes for LTT): the path is learned on the path rows only, so on the test rows it is a fixed
   sequence, as fixed-sequence testing requires.
2. `threshold_path`: from "never exit" (every threshold 1), lower one head's threshold at a time to the next lower
   grid value, each time the step that saves the most LM prefill FLOPs per disagreement added on the path rows.
   Every vector is at or below the one before it in every head, so exits only move earlier along the path.
3. On the test rows (n of them), each path point `j` gets the exact binomial p-value of the null hypothesis
   `H_j: R(tau_j) > epsilon` (epsilon = 1 - target; LTT's binomial tail p-value for a 0/1 loss):

       p_j = P( Binomial(n, epsilon) <= n * R_hat_j ),

   valid because under `H_j` the number of disagreements is a Binomial(n, R(tau_j)) with R > epsilon.
4. Fixed-sequence testing (LTT; CALM uses it along its threshold grid): walk the path in order and reject `H_j`
   while `p_j <= delta` (delta = 1 - confidence); the certified point is the last rejected one. The family-wise
   error is at most delta, so the certified point's risk is at most epsilon with probability at least 1 - delta
   (LTT's main theorem: FWER control at delta gives risk control). If `H_1` is not rejected, no exit is
   certified: all thresholds stay 1.

With groups (`validate.groups=family`), `H_j` is the union over certified groups of `R_g(tau_j) > epsilon`,
rejected when every group's p-value is at most delta (an intersection-union test, valid at level delta without
correction): one threshold vector, deployable without knowing the group, whose risk is at most epsilon in every
certified group simultaneously with probability at least 1 - delta. Groups with fewer test rows than
`min_calibration_size` cannot pass even with zero disagreements; they are named and left out.
"""

import math

import torch
from datasets import Dataset

from .heads_module import torch_columns
from .simulate import first_exit, prefill_costs

NEVER = 1.0  # p_exit > 1 never holds: a head at this threshold never exits


def binomial_cdf(k: int, n: int, p: float) -> float:
    """Exact P(Binomial(n, p) <= k), summed in log space from log-gamma terms (no scipy)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def risk_p_value(errors: int, n: int, epsilon: float) -> float:
    """p-value of `H: risk > epsilon` after `errors` disagreements on `n` rows: P(Binomial(n, epsilon) <= errors)."""
    return binomial_cdf(errors, n, epsilon)


def min_calibration_size(target: float, confidence: float) -> int:
    """Fewest test rows on which agreement `target` can be certified at `confidence` at all: with zero
    disagreements the p-value is target ** n, which must reach 1 - confidence, so n >= log(1 - confidence) /
    log(target)."""
    return math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-9)


def test_rows(n: int, decision: str, path_fraction: float) -> int:
    """How many of `n` calibration rows test the path: all of them for the fixed global path (`decision=global`),
    the rows not used to learn it for the per-head path."""
    return n if decision == "global" else n - int(round(path_fraction * n))


def global_path(grid: list[float], num_layers: int) -> list[tuple[float, ...]]:
    """The path of one shared threshold, from "never exit" down `grid` (CALM's path): fixed before any data."""
    return [(NEVER,) * num_layers] + [(t,) * num_layers for t in sorted(set(grid), reverse=True) if t < NEVER]


def _exits_cost_errors(p_exit, thresholds, match, costs):
    exits = first_exit(p_exit, torch.as_tensor(thresholds, dtype=p_exit.dtype))
    rows = torch.arange(len(exits))
    return int(costs[rows, exits].sum()), int((~match[rows, exits]).sum())


def threshold_path(p_exit: torch.Tensor, match: torch.Tensor, costs: torch.Tensor, grid: list[float],
                   floor: float) -> list[tuple[float, ...]]:
    """An ordered path of threshold vectors [L] from "never exit" toward more exit, learned on the given rows.

    `p_exit` [N, L] scores, `match` [N, L+1] bool (answer with exit at k equals the full one), `costs` [N, L+1]
    LM prefill FLOPs. Each step lowers one head's threshold to the next lower value of `grid`, choosing the step
    with the most FLOPs saved per added disagreement (+1, so zero-error steps are ranked by savings); the path
    stops when agreement on these rows falls under `floor` or no head can go lower. The last head's exit is the
    full model, so its threshold stays at 1."""
    num_layers = p_exit.shape[1]
    grid = sorted(set(float(t) for t in grid if t < NEVER))
    current = [NEVER] * num_layers
    spent, errors = _exits_cost_errors(p_exit, current, match, costs)
    path = [tuple(current)]
    while True:
        best = None
        for head in range(num_layers - 1):
            lower = [t for t in grid if t < current[head]]
            if not lower:
                continue
            trial = current[:head] + [lower[-1]] + current[head + 1:]
            trial_spent, trial_errors = _exits_cost_errors(p_exit, trial, match, costs)
            gain = (spent - trial_spent) / (max(trial_errors - errors, 0) + 1)
            if best is None or gain > best[0]:
                best = (gain, trial, trial_spent, trial_errors)
        if best is None:
            break
        _, current, spent, errors = best
        if 1.0 - errors / len(p_exit) < floor:
            break
        path.append(tuple(current))
    return path


def fixed_sequence_test(path: list[tuple[float, ...]], p_exit: torch.Tensor, match: torch.Tensor,
                        groups: list[str] | None, target: float, confidence: float) -> dict:
    """Test `path` in order on held-out rows (LTT fixed-sequence testing); returns the index of the last rejected
    null (0: nothing certified beyond "never exit"), and per tested point the disagreements and p-value (the
    largest over groups). `groups`: one label per row, or None for marginal certification."""
    epsilon, delta = 1.0 - target, 1.0 - confidence
    labels = groups if groups is not None else ["all"] * len(p_exit)
    members = {g: torch.tensor([i for i, label in enumerate(labels) if label == g]) for g in sorted(set(labels))}
    certified, tested = 0, []
    rows = torch.arange(len(p_exit))
    for index, thresholds in enumerate(path[1:], start=1):
        exits = first_exit(p_exit, torch.as_tensor(thresholds, dtype=p_exit.dtype))
        wrong = ~match[rows, exits]
        errors = {g: int(wrong[m].sum()) for g, m in members.items()}
        p_value = max(risk_p_value(errors[g], len(m), epsilon) for g, m in members.items())
        tested.append({"index": index, "errors": errors, "p_value": p_value})
        if p_value > delta:
            break
        certified = index
    return {"index": certified, "tested": tested}


def certify(p_exit: torch.Tensor, match: torch.Tensor, costs: torch.Tensor, target: float, confidence: float,
            grid: list[float], decision: str = "per_layer", path_fraction: float = 0.25, seed: int = 0,
            groups: list[str] | None = None) -> dict:
    """Certified thresholds from calibration rows the heads never trained on.

    `p_exit` [N, L], `match` [N, L+1] bool, `costs` [N, L+1] as in `threshold_path`; `groups` one label per row
    for group-conditional certification. `decision=per_layer`: the rows are split at random (`seed`),
    `path_fraction` of them learn the per-head path and the rest test it; `decision=global`: the one-threshold
    path is fixed in advance and every row tests it. Returns the certified `thresholds` [L], the bound (`target`
    at `confidence`), the sizes, the test rows' agreement at the certified point, and the groups certified and too
    small to certify."""
    n, num_layers = p_exit.shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_path = n - test_rows(n, decision, path_fraction)
    path_rows, tested = order[:n_path], order[n_path:]
    minimum = min_calibration_size(target, confidence)
    too_small, tested_groups = {}, None
    if groups is not None:
        counts = {}
        for i in tested.tolist():
            counts[groups[i]] = counts.get(groups[i], 0) + 1
        too_small = {g: c for g, c in sorted(counts.items()) if c < minimum}
        tested = torch.tensor([i for i in tested.tolist() if groups[i] not in too_small], dtype=torch.long)
        tested_groups = [groups[i] for i in tested.tolist()]
    if len(tested) < minimum:
        raise ValueError(f"{len(tested)} calibration test rows cannot certify agreement {target} at confidence "
                         f"{confidence}: that needs at least {minimum} (log(1 - confidence) / log(target)); "
                         f"too small: {too_small or 'all rows'}")
    if decision == "global":
        path = global_path(grid, num_layers)
    else:
        floor = target - 2 * (1.0 - target)  # past the target, so the test rows decide where the path stops
        path = threshold_path(p_exit[path_rows], match[path_rows], costs[path_rows], grid, floor)
    result = fixed_sequence_test(path, p_exit[tested], match[tested], tested_groups, target, confidence)
    thresholds = path[result["index"]]
    exits = first_exit(p_exit[tested], torch.as_tensor(thresholds, dtype=p_exit.dtype))
    return {
        "thresholds": list(thresholds),
        "target_agreement": target,
        "confidence": confidence,
        "p_value": "exact binomial tail",
        "calibration_samples": n,
        "path_samples": n_path,
        "test_samples": len(tested),
        "min_test_samples": minimum,
        "path_length": len(path),
        "path_index": result["index"],
        "calibration_test_agreement": float(match[tested, exits].float().mean()),
        "certified_groups": sorted(set(tested_groups)) if groups is not None else None,
        "groups_too_small": too_small if groups is not None else None,
    }


def certify_rows(rows: Dataset, p_exit: torch.Tensor, model_config, validate_cfg, seed: int) -> dict:
    """`certify` on the calibration rows of a label cache (`rows`, with the heads' unseen-row scores `p_exit`
    [N, L]), with the settings of `validate` (`target_agreement`, `confidence`, `decision`, `path_fraction`,
    `groups`, `thresholds` as the grid)."""
    key = validate_cfg.groups
    if key is not None and key not in rows.column_names:
        raise ValueError(f"validate.groups={key}: the label cache has no {key} column (it has "
                         f"{', '.join(rows.column_names)}); use validate.groups=null")
    return certify(
        p_exit, torch_columns(rows, ["match"])["match"].bool(), prefill_costs(rows, model_config),
        validate_cfg.target_agreement, validate_cfg.confidence, list(validate_cfg.thresholds),
        decision=validate_cfg.decision, path_fraction=validate_cfg.path_fraction, seed=seed,
        groups=list(rows[key]) if key is not None else None,
    )
