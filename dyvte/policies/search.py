"""Choosing static settings from a few samples: VTW's withdrawal layer, G-Search's and P-Sigmoid's keep rates."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine import ExitPolicy, VisualExit, generation_eos_ids, greedy_answers
from ..extras import require
from .exit import NoExit, VTWSettings
from .schedules import GSearchSettings, KeepRateSchedule, PSigmoid, PSigmoidSettings, check_first_layer
from .tokens import kept_count


def check_visual(engine: VisualExit, batches: list[dict], search: str) -> None:
    if not any(bool(engine.adapter.visual_token_mask(b["input_ids"]).any()) for b in batches):
        raise ValueError(f"{search} needs calibration samples with visual tokens; none of these has any.")


@dataclass
class VTWSearch:
    k: int  # the withdrawal layer: first k >= start_layer with KL below eta (L if none)
    kl: list[float]  # KL(full || exit at k) of the first answer token, averaged over samples, for k = 0..L
    eta: float
    start_layer: int


@torch.no_grad()
def vtw_search(engine: VisualExit, batches: list[dict], eta: float = VTWSettings.eta,
               start_layer: int = VTWSettings.start_layer, n: int = VTWSettings.n) -> VTWSearch:
    """VTW's search: exit at the first layer whose next-token distribution stays within `eta` (KL) of the full
    model's, measured at the first answer token over `n` calibration samples (processor batches)."""
    VTWSettings(eta=eta, start_layer=start_layer, n=n)  # bad settings are refused before any run
    check_visual(engine, batches, "vtw_search")
    totals = torch.zeros(engine.num_layers + 1, dtype=torch.float64)
    seen = 0
    for batch in batches:  # whole batches until at least `n` samples
        if seen >= n:
            break
        def next_token_log_p(exit_layer):
            logits = engine.prefill(**batch, exit_layer=exit_layer, use_cache=False).logits
            return F.log_softmax(logits[:, -1].float(), dim=-1)

        full = next_token_log_p(None)
        for k in range(engine.num_layers + 1):
            kl = F.kl_div(next_token_log_p(k), full, log_target=True, reduction="none").sum(dim=-1)
            totals[k] += kl.sum().double()
        seen += batch["input_ids"].shape[0]
    kl = (totals / seen).tolist()
    below = [k for k in range(start_layer, engine.num_layers + 1) if kl[k] < eta]
    return VTWSearch(k=below[0] if below else engine.num_layers, kl=kl, eta=eta, start_layer=start_layer)



class AnswerScore:
    """G-Search's E: the share of calibration samples whose greedy answer equals its reference answer.

    The references default to the full model's own greedy answers (E = agreement); pass the dataset answers as
    tokens ending in EOS (`labels.answer_tokens`) for E = accuracy. Calls are memoised by the number of visual
    tokens each sample keeps at every layer: rates between two token counts give the same run.
    """

    def __init__(self, engine: VisualExit, batches: list[dict], max_new_tokens: int = 16,
                 references: list[list[int]] | None = None):
        self.engine, self.batches, self.max_new_tokens = engine, batches, max_new_tokens
        self.eos = generation_eos_ids(engine.model)
        counts = torch.cat([engine.adapter.withdrawn_mask(b["input_ids"]).sum(dim=1) for b in batches])
        self.visual_counts = sorted(set(counts.tolist()))
        self.references = self.answers(NoExit()) if references is None else [list(r) for r in references]
        if len(self.references) != len(counts):
            raise ValueError(f"{len(self.references)} references for {len(counts)} calibration samples.")
        self.memo: dict[tuple, float] = {}

    def answers(self, policy: ExitPolicy) -> list[list[int]]:
        return [a for b in self.batches for a in greedy_answers(self.engine, b, self.max_new_tokens, self.eos, policy)]

    def __call__(self, schedule: KeepRateSchedule) -> float:
        key = tuple(tuple(kept_count(rate, n) for n in self.visual_counts) for rate in schedule.rates)
        if key not in self.memo:
            answers = self.answers(schedule)
            self.memo[key] = sum(a == r for a, r in zip(answers, self.references)) / len(answers)
        return self.memo[key]


def _optuna(search: str):
    """Optuna, from the `search` extra; only its warnings are logged (each search logs its result, not every trial)."""
    optuna = require("optuna", "search", search)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _sampler(optuna, trials: int, seed: int):
    """TPE; the first half of the trials (at most 10, as the paper's uniform start) are random."""
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(1, trials // 2)), seed=seed)


class SavedSearch:
    """JSON save / load of a search result; the file's `method` keeps one search's result from loading as the
    other's."""

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path):
        saved = json.loads(Path(path).read_text())
        method = cls.__dataclass_fields__["method"].default
        if saved.get("method") != method:
            raise ValueError(f"{path} is not a saved {method} schedule (its method is {saved.get('method')!r}).")
        return cls(**saved)


@dataclass
class GSearch(SavedSearch):
    """G-Search's keep rates and, per searched layer, every rate tried with its E and objective."""

    rates: list[float]
    score: float  # E of the final schedule
    queries: str
    lam: float
    every: int
    first_layer: int
    steps: list[dict] = field(default_factory=list)
    method: str = "gsearch"

    def policy(self) -> KeepRateSchedule:
        return KeepRateSchedule(self.rates, self.queries)



@torch.no_grad()
def g_search(engine: VisualExit, batches: list[dict], lam: float = GSearchSettings.lam,
             every: int = GSearchSettings.every, trials: int = GSearchSettings.trials,
             first_layer: int = GSearchSettings.first_layer, queries: str = GSearchSettings.queries,
             max_new_tokens: int = 16, references: list[list[int]] | None = None, seed: int = 0) -> GSearch:
    """G-Search: greedily from shallow to deep layers (`first_layer`, then every `every` layers), choose the rate
    `r <= ` the previous layer's that maximises `E(r | earlier rates) - lam * r` by Bayesian optimisation (Optuna's
    TPE, `trials` runs per layer, the previous rate and 0 among them).

    While a layer is searched, `r` also holds for every deeper layer; the chosen `r` holds until the next searched
    layer. `E` is measured by `AnswerScore` on the calibration `batches` (processor batches).
    """
    num_layers = engine.num_layers
    GSearchSettings(lam=lam, every=every, first_layer=first_layer, trials=trials, queries=queries)
    check_first_layer("g_search", first_layer, num_layers)  # bad settings are refused before any run
    check_visual(engine, batches, "g_search")
    optuna = _optuna("g_search (G-Search's keep rates)")
    score = AnswerScore(engine, batches, max_new_tokens, references)
    rates, steps = [1.0] * num_layers, []
    for layer in range(first_layer, num_layers, every):
        previous = rates[layer - 1]
        if previous == 0.0:  # every visual token is gone: nothing left to search
            break

        def objective(trial: optuna.Trial) -> float:
            rate = trial.suggest_float("rate", 0.0, previous)
            trial.set_user_attr("score", score(KeepRateSchedule(rates[:layer] + [rate] * (num_layers - layer),
                                                                queries)))
            return trial.user_attrs["score"] - lam * rate

        study = optuna.create_study(direction="maximize", sampler=_sampler(optuna, trials, seed + layer))
        study.enqueue_trial({"rate": previous})
        study.enqueue_trial({"rate": 0.0})
        study.optimize(objective, n_trials=trials)
        best = study.best_trial
        rates[layer:] = [best.params["rate"]] * (num_layers - layer)
        tried = [{"rate": t.params["rate"], "score": t.user_attrs["score"], "objective": t.value} for t in study.trials]
        steps.append({"layer": layer, "rate": best.params["rate"], "score": best.user_attrs["score"],
                      "objective": best.value, "trials": tried})
    return GSearch(rates=rates, score=steps[-1]["score"], queries=queries, lam=lam, every=every,
                   first_layer=first_layer, steps=steps)


@dataclass
class PSigmoidSearch(SavedSearch):
    """P-Sigmoid's `k` at a budget, the rates it gives, and every `k` tried with its E."""

    budget: float
    k: float
    alpha: float
    first_layer: int
    rates: list[float]
    score: float  # E of the chosen curve
    queries: str
    trials: list[dict] = field(default_factory=list)
    method: str = "psigmoid"

    def policy(self) -> PSigmoid:
        return PSigmoid(self.budget, self.k, len(self.rates), self.alpha, self.first_layer, self.queries)



@torch.no_grad()
def p_sigmoid_search(engine: VisualExit, batches: list[dict], budget: float, trials: int = PSigmoidSettings.trials,
                     k_max: float = PSigmoidSettings.k_max, alpha: float | None = PSigmoidSettings.alpha,
                     first_layer: int = PSigmoidSettings.first_layer, queries: str = PSigmoidSettings.queries,
                     max_new_tokens: int = 16, references: list[list[int]] | None = None,
                     seed: int = 0) -> PSigmoidSearch:
    """P-Sigmoid: the `k` in `[0, k_max]` that maximises E of `PSigmoid(budget, k)` by Bayesian optimisation
    (Optuna's TPE; `k = 0`, the flat rate `budget`, is always tried first and wins ties)."""
    num_layers = engine.num_layers
    PSigmoidSettings(budget=budget, k_max=k_max, alpha=alpha, first_layer=first_layer, trials=trials, queries=queries)
    check_first_layer("p_sigmoid_search", first_layer, num_layers)  # bad settings are refused before any run
    flat = PSigmoid(budget, 0.0, num_layers, alpha, first_layer, queries)
    check_visual(engine, batches, "p_sigmoid_search")
    optuna = _optuna("p_sigmoid_search (P-Sigmoid's keep rates)")
    score = AnswerScore(engine, batches, max_new_tokens, references)

    def objective(trial: optuna.Trial) -> float:
        return score(PSigmoid(budget, trial.suggest_float("k", 0.0, k_max), num_layers, alpha, first_layer, queries))

    study = optuna.create_study(direction="maximize", sampler=_sampler(optuna, trials, seed))
    study.enqueue_trial({"k": 0.0})
    study.optimize(objective, n_trials=trials)
    best = PSigmoid(budget, study.best_trial.params["k"], num_layers, alpha, first_layer, queries)
    return PSigmoidSearch(budget=budget, k=best.k, alpha=flat.alpha, first_layer=first_layer, rates=best.rates,
                          score=study.best_value, queries=queries,
                          trials=[{"k": t.params["k"], "score": t.value} for t in study.trials])
