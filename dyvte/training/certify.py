"""Certified exit thresholds: Learn-then-Test along a Pareto path, tested on rows the deployed heads never saw.

The question a deployment asks is how many answers exit changes. With per-head thresholds `tau` ([L], head `i`
exits at `i + 1` when `p_exit > tau_i`, the first such head wins), the risk is the share of new samples whose
answer exit spoils, `R(tau) = P(loss)`. The loss of a sample at exit `k` (`exit_losses`) is

    labels.reference=model          the answer with exit differs from the full model's      (1 - agreement)
    labels.reference=ground_truth   the full model answers right and the answer with exit is wrong

so "never exit" has no loss under either. `certify` picks `tau` such that

    P_certification( R(tau_hat) <= 1 - target ) >= confidence        (LTT's (alpha, delta) risk control)

over the draw of the certification rows, which must be exchangeable with the new samples and unseen by the heads
that are deployed: the certification split is scored by those heads, and shares no sample and no image with the
rows they trained on (`dyvte.configs.check_certification` refuses it otherwise, before model time).

Procedure (Angelopoulos, Bates, Candes, Jordan, Lei 2021, "Learn then Test"; Pareto Testing, Laufer-Goldshtein,
Fisch, Barzilay, Jaakkola 2023, "Efficiently controlling multiple risks with Pareto testing"):
1. `pareto_path`, on path rows independent of the certification rows (the rows the point estimate is chosen on:
   val, or the out-of-fold train rows plus val): the candidates are the point-estimate threshold vectors over a
   fine grid of agreements (`candidate_thresholds`) and the global thresholds. Those on the path rows' Pareto
   front of (risk, LM prefill FLOPs) are ordered by their path-row risk, after "never exit" (index 0). The path is
   fixed before any certification row is read, as fixed-sequence testing requires.
2. On the certification rows (n of them), each path point `j >= 1` gets the exact binomial p-value of the null
   `H_j: R(tau_j) > epsilon` (epsilon = 1 - target; LTT's binomial tail p-value for a 0/1 loss):

       p_j = P( Binomial(n, epsilon) <= e_j ),    e_j = losses of the n rows at tau_j,

   valid because under `H_j`, `e_j` is Binomial(n, R(tau_j)) with R > epsilon, stochastically larger.
3. Fixed-sequence testing: walk the path in order and reject `H_j` while `p_j <= delta` (delta = 1 - confidence);
   the certified point is the last rejected one. The family-wise error is at most delta with no multiplicity
   correction, so the certified point's risk is at most epsilon with probability at least 1 - delta (LTT's main
   theorem). If `H_1` is not rejected, no exit is certified: index 0, every threshold 1.

With groups (`validate.groups=family`), `H_j` is the union over certified groups of `R_g(tau_j) > epsilon`, rejected
when every group's p-value is at most delta (an intersection-union test, valid at level delta without correction):
one threshold vector whose risk is at most epsilon in every certified group at once with probability at least
1 - delta. Groups with fewer rows than `min_certification_size` cannot pass even with no loss; they are named and
left out.
"""

import math

import torch

from .simulate import point_estimate_thresholds

NEVER = 1.0  # p_exit > 1 never holds: a head at this threshold never exits
RISK_DEFINITIONS = {
    "model": "answers exit changes (1 - agreement with the full model)",
    "ground_truth": "answers the full model gets right and exit gets wrong",
}


def binomial_cdf_table(n: int, p: float) -> torch.Tensor:
    """P(Binomial(n, p) <= k) for every k = 0..n ([n + 1], float64), exact up to rounding: the log-pmf from
    log-gamma terms, accumulated in log space (no scipy)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    if p <= 0.0:
        return torch.ones(n + 1, dtype=torch.float64)
    if p >= 1.0:
        return (k == n).double()
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return torch.logcumsumexp(log_pmf, dim=0).exp().clamp(max=1.0)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """Exact P(Binomial(n, p) <= k)."""
    if k < 0:
        return 0.0
    return 1.0 if k >= n else float(binomial_cdf_table(n, p)[k])


def min_certification_size(target: float, confidence: float) -> int:
    """Fewest certification rows on which `target` can be certified at `confidence` at all: with no loss the
    p-value is target ** n, which must reach 1 - confidence, so n >= log(1 - confidence) / log(target)."""
    return math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-9)


def exit_losses(match: torch.Tensor, reference: str) -> torch.Tensor:
    """Loss [N, L+1] bool of every exit `k = 0..L` from the label cache's `match` [N, L+1] (the module docstring):
    under `model`, `match` says whether exit `k` reproduces the full model's answer; under `ground_truth`, whether it
    reproduces the dataset's answer, which the full model (`k = L`) may miss itself."""
    if reference == "model":
        return ~match
    if reference == "ground_truth":
        return match[:, -1:] & ~match
    raise ValueError(f"labels.reference must be one of {', '.join(RISK_DEFINITIONS)}, got {reference!r}")


def global_thresholds(grid: list[float], num_layers: int) -> torch.Tensor:
    """One shared threshold per vector [G, L], for each value of `grid` below 1 (CALM's path)."""
    values = sorted({float(t) for t in grid if t < NEVER}, reverse=True)
    return torch.tensor(values, dtype=torch.float64)[:, None].expand(len(values), num_layers).clone()


#: The agreements whose point estimates are path candidates: 0.999 down to 0.900 in steps of 0.001, so one path
#: passes every target from 0.90 to 0.999 finely and serves them all (validity studies test several on one path).
AGREEMENTS = tuple(round(1.0 - i / 1000, 3) for i in range(1, 101))


def candidate_thresholds(p_exit: torch.Tensor, kept: torch.Tensor, costs: torch.Tensor, grid: list[float],
                         decision: str) -> torch.Tensor:
    """Threshold vectors [C, L] worth certifying, from path rows: `p_exit` [N, L], `kept` [N, L+1] bool (no loss at
    exit k), `costs` [N, L+1] LM prefill FLOPs. `decision=global`: one shared threshold per value of `grid`;
    `per_layer`: those, and the point estimate (`simulate.point_estimate_thresholds`) at each of `AGREEMENTS`."""
    candidates = [global_thresholds(grid, p_exit.shape[1])]
    if decision == "per_layer":
        candidates.append(torch.tensor([point_estimate_thresholds(p_exit, kept, costs, agreement, grid, decision)
                                        for agreement in AGREEMENTS], dtype=torch.float64))
    return torch.cat(candidates)


def path_exits(path: torch.Tensor, p_exit: torch.Tensor) -> torch.Tensor:
    """Exit layer [N, J] of every row (`p_exit` [N, L]) under each threshold vector of `path` [J, L]: `i + 1` for
    the first head `i` with `p_exit > threshold`, else `L` (`simulate.first_exit`, for every vector at once)."""
    above = p_exit[:, None, :] > path.to(p_exit.dtype)[None, :, :]  # [N, J, L]
    num_layers = p_exit.shape[1]
    return torch.where(above.any(dim=2), above.int().argmax(dim=2) + 1, num_layers)


def path_losses(path: torch.Tensor, p_exit: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Loss [N, J] bool of every row (`p_exit` [N, L], `loss` [N, L+1]) at its exit under each threshold vector of
    `path` [J, L]."""
    return loss.gather(1, path_exits(path, p_exit))


def path_spend(path: torch.Tensor, p_exit: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """LM prefill FLOPs [J] the rows (`p_exit` [N, L], `costs` [N, L+1]) spend under each vector of `path` [J, L]."""
    return costs.gather(1, path_exits(path, p_exit)).sum(dim=0)


def pareto_path(candidates: torch.Tensor, p_exit: torch.Tensor, loss: torch.Tensor,
                costs: torch.Tensor) -> torch.Tensor:
    """The path [J, L] to test: "never exit", then the candidates [C, L] on the path rows' Pareto front of (risk,
    FLOPs spent), in order of rising path-row risk (so of falling FLOPs). A candidate that another one matches or
    beats in both is left out: it could only stop the test earlier or save less. Path rows: `p_exit` [N, L],
    `loss` [N, L+1] bool, `costs` [N, L+1]."""
    errors = path_losses(candidates, p_exit, loss).sum(dim=0)
    spend = path_spend(candidates, p_exit, costs)
    order = torch.sort(spend, stable=True).indices  # by losses, ties by spend: two stable sorts
    order = order[torch.sort(errors[order], stable=True).indices]
    spend = spend[order]
    cheapest_before = torch.cat([costs[:, -1].sum().reshape(1), spend.cummin(dim=0).values[:-1]])
    front = order[spend < cheapest_before]  # cheaper than every candidate of fewer (or as few) losses
    never = torch.full((1, candidates.shape[1]), NEVER, dtype=candidates.dtype)
    return torch.cat([never, candidates[front]])


def certified_index(errors: torch.Tensor, sizes: list[int], target: float, confidence: float) -> torch.Tensor:
    """Fixed-sequence testing of path points 1..J-1 from their losses `errors` [..., G, J-1] (per group, per point)
    on `sizes` [G] certification rows: the number of leading points whose null `R > 1 - target` is rejected in
    every group (p-value <= 1 - confidence), which is the index of the certified point in the path ([...], 0:
    never exit). Vectorised over leading dimensions (validity studies test many draws at once)."""
    epsilon, delta = 1.0 - target, 1.0 - confidence
    p_values = torch.stack([binomial_cdf_table(n, epsilon)[errors[..., g, :].clamp(max=n)]
                            for g, n in enumerate(sizes)], dim=-2)
    rejected = (p_values <= delta).all(dim=-2)
    return rejected.long().cumprod(dim=-1).sum(dim=-1)


def certify(path: torch.Tensor, p_exit: torch.Tensor, loss: torch.Tensor, target: float, confidence: float,
            groups: list[str] | None = None) -> dict:
    """Test `path` [J, L] (from `pareto_path`, learned on other rows) on the certification rows: `p_exit` [N, L]
    from the deployed heads, `loss` [N, L+1] (`exit_losses`); `groups` one label per row for group-conditional
    certification. Returns the certified `thresholds` [L], its `path_index`, the bound (`target` at `confidence`),
    the sizes, per tested point its losses and p-value, and the groups certified and too small to certify."""
    minimum = min_certification_size(target, confidence)
    labels = groups if groups is not None else ["all"] * len(p_exit)
    counts = {g: labels.count(g) for g in sorted(set(labels))}
    too_small = {g: c for g, c in counts.items() if c < minimum}
    certified_groups = [g for g in counts if g not in too_small]
    if not certified_groups:
        raise ValueError(f"{len(p_exit)} certification rows cannot certify agreement {target} at confidence "
                         f"{confidence}: that needs at least {minimum} rows (log(1 - confidence) / log(target))"
                         + (f" in some group; every group is smaller: {too_small}" if groups is not None else ""))
    losses = path_losses(path[1:], p_exit, loss)  # [N, J-1]
    members = [torch.tensor([label == g for label in labels]) for g in certified_groups]
    errors = torch.stack([losses[m].sum(dim=0) for m in members])  # [G, J-1]
    sizes = [int(m.sum()) for m in members]
    index = int(certified_index(errors, sizes, target, confidence))
    epsilon = 1.0 - target
    tables = [binomial_cdf_table(n, epsilon) for n in sizes]
    tested = [{"index": j + 1, "losses": {g: int(errors[i, j]) for i, g in enumerate(certified_groups)},
               "p_value": max(float(tables[i][errors[i, j]]) for i in range(len(sizes)))}
              for j in range(min(index + 1, len(path) - 1))]
    return {
        "thresholds": path[index].tolist(),
        "path_index": index,
        "path_length": len(path),
        "target_agreement": target,
        "confidence": confidence,
        "p_value": "exact binomial tail",
        "certification_samples": len(p_exit),
        "min_certification_samples": minimum,
        "tested": tested,
        "certified_groups": certified_groups if groups is not None else None,
        "groups_too_small": too_small if groups is not None else None,
    }
