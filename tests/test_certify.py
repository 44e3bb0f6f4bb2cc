"""Certified thresholds (Learn-then-Test along a Pareto path): the binomial tail against exact arithmetic, validity
with power on a synthetic problem whose true risk is known (deliberately broken variants beside the real procedure,
each caught), the path, groups, the ground-truth risk, and the bad-input errors."""

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_train import checkpoint, train  # noqa: F401 (checkpoint: the tiny testbed checkpoint fixture)

from dyvte import cli
from dyvte.configs import ConfigError, check_certification, check_train_config
from dyvte.data import Sample
from dyvte.heads import ExitHeads
from dyvte.training.certify import (
    binomial_cdf,
    binomial_cdf_table,
    certified_index,
    certify,
    exit_losses,
    min_certification_size,
    pareto_path,
    path_losses,
)

ROOT = Path(__file__).resolve().parent.parent
cli.register_resolvers()


def exact_binomial_cdf(k: int, n: int, p: Fraction) -> Fraction:
    """P(Binomial(n, p) <= k) in exact rational arithmetic: the reference."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k, n, p", [(0, 10, "1/2"), (3, 10, "1/3"), (8, 400, "1/50"), (26, 1700, "1/50"),
                                     (0, 114, "1/50"), (50, 60, "9/10"), (60, 60, "1/7")])
def test_binomial_tail_matches_exact_arithmetic(k, n, p):
    assert binomial_cdf(k, n, float(Fraction(p))) == pytest.approx(float(exact_binomial_cdf(k, n, Fraction(p))),
                                                                   rel=1e-9)


def test_binomial_table_matches_exact_arithmetic_at_every_k():
    table = binomial_cdf_table(66, 0.05)
    exact = [float(exact_binomial_cdf(k, 66, Fraction(1, 20))) for k in range(67)]
    assert table.tolist() == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_min_certification_size_is_where_no_loss_first_certifies():
    for target, confidence in ((0.98, 0.9), (0.95, 0.9), (0.99, 0.95), (0.9, 0.5)):
        n = min_certification_size(target, confidence)
        assert target ** n <= 1 - confidence < target ** (n - 1)
    assert min_certification_size(0.98, 0.9) == 114


# A synthetic problem with three heads and known risk. Each row has a score s_h ~ U(0, 1) per head; head h exits
# (at layer h + 1) when s_h > tau_h, the first such head wins, and head 2's exit is the full model (L = 3). Exit at
# head h spoils the answer with probability C[h] * (1 - s_h), so the true risk of (tau_0, tau_1, tau_2) is
#     R = C[0] (1 - tau_0)^2 / 2 + tau_0 C[1] (1 - tau_1)^2 / 2,
# and exit at layer k costs k. The candidates lie on iso-risk curves of a ladder of risks around EPSILON, several
# per level at different costs; one level sits just above EPSILON, where the procedure is tight.
C = (0.3, 0.15)
EPSILON, CONFIDENCE = 0.05, 0.9
DELTA = 1 - CONFIDENCE
N_CERTIFICATION = 122  # Binomial(122, 0.05): the exact test's size is 0.053, one more loss allowed gives 0.136
REPETITIONS = 10_000  # certification draws for the real procedure and the p-value variants (vectorised)
REUSE_REPETITIONS = 2000  # draws for the variant that relearns its path on every draw
LEVELS = [EPSILON * m for m in (0.3, 1.001, 1.2, 1.5, 2.0)]


def true_risk(thresholds: torch.Tensor) -> torch.Tensor:
    t0, t1 = thresholds[..., 0].double(), thresholds[..., 1].double()
    return C[0] * (1 - t0) ** 2 / 2 + t0 * C[1] * (1 - t1) ** 2 / 2


def candidates() -> torch.Tensor:
    rows = []
    for level in LEVELS:
        for t0 in torch.linspace(0.45, 0.99, 12).tolist():
            rest = level - C[0] * (1 - t0) ** 2 / 2
            if rest < 0:
                continue
            t1 = 1 - math.sqrt(2 * rest / (t0 * C[1]))
            if 0 <= t1 <= 1:
                rows.append((t0, t1, 1.0))
    return torch.tensor(rows, dtype=torch.float64)


def synthetic_rows(n: int, generator: torch.Generator):
    """`n` rows: p_exit [n, 3], loss [n, 4] bool (exit 0 is never a head's), costs [n, 4]."""
    score = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    spoils = torch.rand(n, 2, generator=generator, dtype=torch.float64) < torch.tensor(C) * (1 - score[:, :2])
    loss = torch.cat([torch.ones(n, 1, dtype=torch.bool), spoils, torch.zeros(n, 1, dtype=torch.bool)], dim=1)
    return score.float(), loss, torch.arange(4).expand(n, 4)


def exact_tables(n: int, epsilon: Fraction) -> tuple[list[float], list[float]]:
    """pmf and cdf of Binomial(n, epsilon) from exact arithmetic (the test's own reference)."""
    pmf = [math.comb(n, i) * epsilon ** i * (1 - epsilon) ** (n - i) for i in range(n + 1)]
    cdf = [sum(pmf[:i + 1]) for i in range(n + 1)]
    return [float(p) for p in pmf], [float(c) for c in cdf]


PMF, CDF = (torch.tensor(t, dtype=torch.float64) for t in exact_tables(N_CERTIFICATION, Fraction(1, 20)))


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def below(errors: torch.Tensor) -> torch.Tensor:
    """P(X < errors) = P(X <= errors - 1), 0 at errors = 0."""
    return torch.where(errors > 0, CDF[(errors - 1).clamp(min=0)], torch.zeros((), dtype=torch.float64))


# The broken variants, each one change to the real procedure: (its p-value from the losses, its delta).
P_VALUE_VARIANTS = {
    "tie bug: P(X < k) for P(X <= k)": (below, DELTA),
    "mid-p value": (lambda e: below(e) + 0.5 * PMF[e], DELTA),
    "normal approximation": (lambda e: normal_cdf((e - N_CERTIFICATION * EPSILON) /
                                                  math.sqrt(N_CERTIFICATION * EPSILON * (1 - EPSILON))), DELTA),
    "delta doubled": (lambda e: CDF[e], 2 * DELTA),
}


def fixed_sequence(p_values: torch.Tensor, delta: float) -> torch.Tensor:
    """The test's own fixed-sequence testing: how many leading points of [R, J-1] are rejected."""
    return (p_values <= delta).long().cumprod(dim=1).sum(dim=1)


def failure_rates() -> dict[str, float]:
    """Share of REPETITIONS certification draws whose certified point's true risk exceeds EPSILON: the real
    procedure (path learned on independent rows, dyvte's exact test) and each broken variant."""
    generator = torch.Generator().manual_seed(0)
    candidate_set = candidates()
    path = pareto_path(candidate_set, *synthetic_rows(20_000, generator))  # learned once, before any draw
    risk = true_risk(path).clone()
    risk[0] = 0.0  # never exit
    p_exit, loss, _ = synthetic_rows(REPETITIONS * N_CERTIFICATION, generator)
    errors = path_losses(path[1:], p_exit, loss).reshape(REPETITIONS, N_CERTIFICATION, -1).sum(dim=1)
    real = certified_index(errors[:, None, :], [N_CERTIFICATION], 1 - EPSILON, CONFIDENCE)
    # dyvte's test equals the test's own exact one on every draw
    assert torch.equal(real, fixed_sequence(CDF[errors], DELTA))
    rates = {"real": float((risk[real] > EPSILON).double().mean())}
    for name, (p_value, delta) in P_VALUE_VARIANTS.items():
        rates[name] = float((risk[fixed_sequence(p_value(errors), delta)] > EPSILON).double().mean())
    # path rows reused as test rows: the path learned on the same rows that then test it
    reused = []
    for draw in range(REUSE_REPETITIONS):
        rows = slice(draw * N_CERTIFICATION, (draw + 1) * N_CERTIFICATION)
        own_path = pareto_path(candidate_set, p_exit[rows], loss[rows], torch.arange(4).expand(N_CERTIFICATION, 4))
        own_errors = path_losses(own_path[1:], p_exit[rows], loss[rows]).sum(dim=0)
        index = int(fixed_sequence(CDF[own_errors][None], DELTA))
        reused.append(index > 0 and float(true_risk(own_path[index])) > EPSILON)
    rates["path rows reused as test rows"] = sum(reused) / REUSE_REPETITIONS
    rates["mean certified risk"] = float(risk[real].mean())
    return rates


@pytest.fixture(scope="module")
def rates() -> dict[str, float]:
    return failure_rates()


def standard_error(rate: float, repetitions: int) -> float:
    return math.sqrt(rate * (1 - rate) / repetitions)


def test_certified_risk_stays_within_epsilon_with_the_confidence(rates):
    """At most DELTA of the draws certify a risk above EPSILON, up to three standard errors of sampling slack."""
    assert rates["real"] <= DELTA + 3 * standard_error(DELTA, REPETITIONS), rates
    assert rates["mean certified risk"] > 0.2 * EPSILON, rates  # not vacuous: it certifies real exits


@pytest.mark.parametrize("variant", [*P_VALUE_VARIANTS, "path rows reused as test rows"])
def test_each_broken_variant_is_caught_with_power(rates, variant):
    """The check above, run on a variant's draws, fails it when its rate exceeds DELTA + 3 standard errors; the
    variant's observed rate less 1.2816 of its own standard errors exceeds that, so the check catches the variant
    with probability >= 0.9 (normal approximation of the rate over its draws)."""
    repetitions = REUSE_REPETITIONS if variant == "path rows reused as test rows" else REPETITIONS
    rate = rates[variant]
    power_floor = rate - 1.2816 * standard_error(rate, repetitions)
    assert power_floor > DELTA + 3 * standard_error(DELTA, repetitions), (variant, rates)


def test_pareto_path_by_hand():
    """Four rows, one head before the full model (L = 2): exits at layer 1 (cost 1) or 2 (cost 2). Candidates
    0.9 (exits rows with p > 0.9: row 0), 0.5 (rows 0, 1), 0.2 (rows 0..2), 0.6 (same rows as 0.5, so the same
    losses and spend: the first of the tie stays)."""
    p_exit = torch.tensor([[0.95, 0.0], [0.7, 0.0], [0.3, 0.0], [0.1, 0.0]])
    loss = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    costs = torch.tensor([[0, 1, 2]]).expand(4, 3)
    grid = torch.tensor([[0.9, 1.0], [0.5, 1.0], [0.2, 1.0], [0.6, 1.0]], dtype=torch.float64)
    path = pareto_path(grid, p_exit, loss, costs)
    # never (0 losses, spend 8), then 0.5 (0, 6), which dominates 0.9 (0, 7) and ties 0.6, then 0.2 (1 loss, 5)
    assert path[:, 0].tolist() == [1.0, 0.5, 0.2]


def test_certify_tests_the_path_in_order_and_stops_at_the_first_acceptance():
    """Three path points on 200 rows at target 0.95 (epsilon 0.05, delta 0.1) with 4, 4 and 14 losses: the
    binomial tail P(Bin(200, 0.05) <= 4) = 0.026 is rejected twice, P(<= 14) = 0.92 is not, so the certified point
    is the second."""
    p_exit = torch.zeros(200, 2)
    p_exit[:, 0] = torch.linspace(0, 1, 200)
    loss = torch.zeros(200, 3, dtype=torch.bool)
    loss[196:, 1] = True  # rows that exit at every threshold (p > 0.9) ...
    loss[:30, 1] = True  # ... and rows of which only 20..29 exit, at 0.1 (p = i / 199 > 0.1)
    path = torch.tensor([[1.0, 1.0], [0.9, 1.0], [0.5, 1.0], [0.1, 1.0]], dtype=torch.float64)
    result = certify(path, p_exit, loss, 0.95, 0.9)
    assert [t["losses"]["all"] for t in result["tested"]] == [4, 4, 14]
    assert result["tested"][1]["p_value"] == pytest.approx(float(exact_binomial_cdf(4, 200, Fraction(1, 20))))
    assert result["path_index"] == 2 and result["thresholds"] == [0.5, 1.0]


def test_group_certification_names_the_small_groups_and_bounds_each_group():
    generator = torch.Generator().manual_seed(2)
    p_exit, loss, _ = synthetic_rows(600, generator)
    path = torch.cat([torch.ones(1, 3), candidates()[:5]]).double()
    groups = ["big"] * 560 + ["small"] * 40
    result = certify(path, p_exit, loss, 0.95, 0.9, groups=groups)
    assert result["certified_groups"] == ["big"] and result["groups_too_small"] == {"small": 40}
    assert result["min_certification_samples"] == min_certification_size(0.95, 0.9) == 45
    with pytest.raises(ValueError, match="every group is smaller"):
        certify(path, p_exit[:80], loss[:80], 0.95, 0.9, groups=["a", "b"] * 40)


def test_ground_truth_risk_is_a_right_answer_made_wrong():
    """Under labels.reference=ground_truth, `match` says an exit reproduces the dataset's answer: the loss is the
    full model right (k = L) and the exit wrong, so never exiting, and any sample the full model misses, cost
    nothing."""
    match = torch.tensor([[False, True, True], [False, False, True], [True, False, False]])
    assert exit_losses(match, "ground_truth").tolist() == [[True, False, False], [True, True, False],
                                                           [False, False, False]]
    assert exit_losses(match, "model").tolist() == (~match).tolist()


def compose_train(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["validate.target_agreement=1.0"], r"validate.target_agreement=1.0: must be a number strictly between 0 and 1"),
    (["validate.target_agreement=0"], r"validate.target_agreement=0.0: must be a number strictly between 0 and 1"),
    (["validate.target_agreement=0.98", "validate.confidence=1"], r"validate.confidence=1.0: must be a number strictly"),
    (["validate.groups=colour"], r"validate.groups='colour': must be null or one of family"),
    (["validate.groups=family"], r"validate.groups='family': certifies validate.target_agreement within each group"),
    (["data.certification_fraction=0.6", "data.val_fraction=0.5"], r"data.certification_fraction=0.6: and data."),
])
def test_bad_certification_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(*overrides))


def samples(n: int, prefix: str, family: str = "colour") -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", image=f"/data/{prefix}{i}.png", question="q", answer="a", family=family)
            for i in range(n)]


def certifying(*overrides):
    return compose_train("validate.target_agreement=0.98", "validate.confidence=0.9", *overrides)


def test_a_certificate_needs_a_certification_split():
    with pytest.raises(ConfigError, match=r"has no certification split: set data.certification_json_path=FILE, or "
                                          r"data.certification_fraction=0.2"):
        check_certification(certifying(), {"train": samples(10, "t"), "val": samples(400, "v")})


def test_too_small_a_certification_split_is_refused_with_the_minimum():
    splits = {"train": samples(10, "t"), "val": samples(10, "v")}
    check_certification(certifying(), {**splits, "certification": samples(114, "c")})
    with pytest.raises(ConfigError, match=r"needs at least 114 certification rows .* has 113"):
        check_certification(certifying(), {**splits, "certification": samples(113, "c")})


@pytest.mark.parametrize("shared", ["ids", "images"])
def test_a_certification_split_that_overlaps_train_is_refused(shared):
    """A certificate from rows the heads trained on: the same sample ids, or other questions on the same images."""
    train_rows = samples(200, "t")
    certification = samples(200, "c")
    if shared == "ids":
        certification[7].id = train_rows[3].id
    else:
        certification[7].image = train_rows[3].image
    with pytest.raises(ConfigError, match=r"the certification split shares 1 (sample ids|images) .* with the train "
                                          r"split"):
        check_certification(certifying(), {"train": train_rows, "val": [], "certification": certification})


def test_a_group_key_the_data_lacks_is_refused():
    with pytest.raises(ConfigError, match=r"validate.groups=family: the certification samples do not all carry"):
        check_certification(certifying("validate.groups=family"),
                            {"train": samples(10, "t"), "certification": samples(400, "c", family="")})


def test_group_sizes_are_named_when_no_group_reaches_the_minimum():
    certification = samples(100, "a", family="colour") + samples(100, "b", family="shape")
    with pytest.raises(ConfigError, match=r"needs at least 114 certification rows \(.*\) in some family, and the "
                                          r"certification split has colour: 100, shape: 100"):
        check_certification(certifying("validate.groups=family"), {"train": [], "certification": certification})


def run_train_py(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, capture_output=True,
                          text=True)


def test_train_py_certifies_on_held_out_images_and_reports_the_point_estimate_beside(checkpoint, tmp_path):
    """Certification rows held out of the training data by image (`data.certification_fraction`), scored by the
    deployed heads: the heads keep the certified thresholds; validate.json gives the path, and the certified
    point and the point estimate on the same certification rows."""
    train(f"model.name_or_path={checkpoint}", "data.limit=24", "data.eval_limit=8", "head_training.epochs=2",
          "head_training.hidden=16", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
          "data.certification_json_path=null", "data.certification_fraction=0.5", "validate.target_agreement=0.5",
          "validate.confidence=0.5", "validate.folds=2")
    report = json.loads((tmp_path / "run" / "validate.json").read_text())
    certified = report["certified"]
    assert certified["certification_samples"] == 8  # eval_limit caps the held-out split too
    assert certified["min_certification_samples"] == 1 and certified["target_agreement"] == 0.5
    assert certified["path"][0] == [1.0, 1.0, 1.0] and len(certified["path"]) == certified["path_length"]
    assert certified["thresholds"] == certified["path"][certified["path_index"]]
    heads = ExitHeads.from_pretrained(tmp_path / "run" / "heads")
    assert report["threshold"] == certified["thresholds"] == list(heads.config.thresholds)
    assert set(certified["on_certification_rows"]) == {"certified", "point_estimate"}
    assert set(certified["point_estimate"]) >= {"threshold", "agreement", "flops_saved"}
    assert certified["risk"].startswith("answers exit changes")


def test_no_certification_split_stops_train_py_before_model_time(tmp_path):
    result = run_train_py("data.limit=16", "data.eval_limit=8", "validate.target_agreement=0.98",
                          "data.certification_json_path=null", f"hydra.run.dir={tmp_path}",
                          f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode != 0
    assert "validate.target_agreement=0.98 certifies on rows the deployed heads never trained on" in result.stderr
    assert "load_mllm" not in result.stderr  # stopped before loading the model
