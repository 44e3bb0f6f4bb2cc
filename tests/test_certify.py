"""Certified thresholds (Learn-then-Test): the binomial tail against exact arithmetic, validity on synthetic
scores whose true risk is known (and the same check failing the naive point estimate), and the bad-input errors."""

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
from dyvte.training.certify import binomial_cdf, certify, min_calibration_size

ROOT = Path(__file__).resolve().parent.parent
cli.register_resolvers()

GRID = [i / 50 for i in range(1, 50)]


def exact_binomial_cdf(k: int, n: int, p: Fraction) -> float:
    """P(Binomial(n, p) <= k) in exact rational arithmetic: the reference."""
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)))


@pytest.mark.parametrize("k, n, p", [(0, 10, "1/2"), (3, 10, "1/3"), (8, 400, "1/50"), (26, 1700, "1/50"),
                                     (0, 114, "1/50"), (50, 60, "9/10"), (60, 60, "1/7")])
def test_binomial_tail_matches_exact_arithmetic(k, n, p):
    assert binomial_cdf(k, n, float(Fraction(p))) == pytest.approx(exact_binomial_cdf(k, n, Fraction(p)), rel=1e-9)


def test_min_calibration_size_is_where_zero_errors_first_certify():
    for target, confidence in ((0.98, 0.9), (0.95, 0.9), (0.99, 0.95), (0.9, 0.5)):
        n = min_calibration_size(target, confidence)
        assert target ** n <= 1 - confidence < target ** (n - 1)
    assert min_calibration_size(0.98, 0.9) == 114


def synthetic(n: int, generator: torch.Generator):
    """One head over two exits. Score s ~ U(0, 1); exit 1 keeps the answer with probability s; exit 2 is the full
    model. At threshold t (exit when s > t) the true disagreement rate is (1 - t)^2 / 2."""
    score = torch.rand(n, generator=generator)
    kept = torch.rand(n, generator=generator) < score
    p_exit = torch.stack([score, torch.zeros(n)], dim=1)
    match = torch.stack([torch.zeros(n, dtype=torch.bool), kept, torch.ones(n, dtype=torch.bool)], dim=1)
    costs = torch.tensor([[0, 1, 2]]).expand(n, 3)
    return p_exit, match, costs


def true_risk(threshold: float) -> float:
    return (1.0 - threshold) ** 2 / 2.0


def naive_point_estimate(p_exit, match, costs, target):
    """Today's calibration: the lowest grid threshold whose empirical agreement reaches the target."""
    grid = torch.tensor(GRID)
    errors = ((p_exit[None, :, 0] > grid[:, None]) & ~match[None, :, 1]).sum(dim=1)
    passing = grid[errors <= (1 - target) * len(p_exit)]
    return float(passing.min()) if len(passing) else 1.0


def violation_rate(procedure, trials=300, n=300, target=0.95):
    generator = torch.Generator().manual_seed(0)
    return sum(true_risk(procedure(*synthetic(n, generator), target)) > 1 - target for _ in range(trials)) / trials


def assert_valid(procedure, confidence=0.9, trials=300):
    """Risk above 1 - target in at most delta of the calibration draws, with 3 binomial standard errors of slack."""
    delta = 1 - confidence
    rate = violation_rate(procedure, trials=trials)
    assert rate <= delta + 3 * math.sqrt(delta * (1 - delta) / trials), f"risk above the target in {rate:.1%} draws"


@pytest.mark.parametrize("decision", ["global", "per_layer"])
def test_certified_thresholds_hold_the_target_with_the_confidence(decision):
    def certified(p_exit, match, costs, target):
        return certify(p_exit, match, costs, target, 0.9, GRID, decision=decision)["thresholds"][0]

    assert_valid(certified)
    # not vacuous: it exits, at thresholds whose true risk is well above never exiting's zero
    generator = torch.Generator().manual_seed(1)
    risks = [true_risk(certified(*synthetic(300, generator), 0.95)) for _ in range(50)]
    assert sum(risks) / 50 > 0.01


def test_the_validity_check_fails_the_naive_point_estimate():
    """The same check rejects today's point estimate: it lands above the target's risk about half the time."""
    with pytest.raises(AssertionError, match=r"risk above the target in [3-6]\d\.\d% draws"):
        assert_valid(naive_point_estimate)


def test_group_conditional_certification_names_the_small_groups():
    generator = torch.Generator().manual_seed(2)
    p_exit, match, costs = synthetic(600, generator)
    groups = ["big"] * 560 + ["small"] * 40
    result = certify(p_exit, match, costs, 0.95, 0.9, GRID, decision="global", groups=groups)
    assert result["certified_groups"] == ["big"] and result["groups_too_small"] == {"small": 40}
    assert result["test_samples"] == 560 and result["min_test_samples"] == min_calibration_size(0.95, 0.9) == 45


def compose_train(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["validate.target_agreement=1.0"], r"validate.target_agreement=1.0: must be a number strictly between 0 and 1"),
    (["validate.target_agreement=0"], r"validate.target_agreement=0: must be a number strictly between 0 and 1"),
    (["validate.target_agreement=0.98", "validate.confidence=1"], r"validate.confidence=1: must be a number strictly"),
    (["validate.groups=colour"], r"validate.groups='colour': must be null or one of family"),
    (["validate.groups=family"], r"validate.groups='family': certifies validate.target_agreement within each group"),
])
def test_bad_certification_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_train(*overrides))


def samples(n: int, family: str = "colour") -> list[Sample]:
    return [Sample(id=str(i), image=None, question="q", answer="a", family=family) for i in range(n)]


def test_too_few_calibration_rows_are_refused_with_the_minimum():
    cfg = compose_train("validate.target_agreement=0.98", "validate.confidence=0.9", "validate.calibration=val")
    check_certification(cfg, {"train": samples(10), "val": samples(152)})  # 38 rows learn the path, 114 test it
    with pytest.raises(ConfigError, match=r"needs at least 114 calibration test rows .* leave 113"):
        check_certification(cfg, {"train": samples(10), "val": samples(151)})


def test_a_group_key_the_data_lacks_is_refused():
    cfg = compose_train("validate.target_agreement=0.98", "validate.groups=family")
    with pytest.raises(ConfigError, match=r"validate.groups=family: the calibration samples do not all carry"):
        check_certification(cfg, {"train": samples(3000, family=""), "val": samples(400, family="")})


def run_train_py(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, capture_output=True,
                          text=True)


def test_train_py_reports_the_certified_point_beside_the_point_estimate(checkpoint, tmp_path):
    """24 calibration rows (16 train out-of-fold + 8 val) certify agreement 0.5 at confidence 0.5 (n >= 1): the
    heads keep the certified thresholds, validate.json scores them and keeps today's point estimate beside."""
    train(f"model.name_or_path={checkpoint}", "data.limit=16", "data.eval_limit=8", "head_training.epochs=2",
          "head_training.hidden=16", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
          "validate.target_agreement=0.5", "validate.confidence=0.5", "validate.folds=2")
    report = json.loads((tmp_path / "run" / "validate.json").read_text())
    certified = report["certified"]
    assert certified["calibration_samples"] == 24 and certified["test_samples"] == 18  # a quarter learn the path
    assert certified["min_test_samples"] == 1 and certified["target_agreement"] == 0.5
    assert report["threshold"] == certified["thresholds"] == list(ExitHeads.from_pretrained(tmp_path / "run" /
                                                                                            "heads").config.thresholds)
    assert set(certified["point_estimate"]) >= {"threshold", "agreement", "flops_saved"}


def test_too_small_a_calibration_set_stops_train_py_before_model_time(tmp_path):
    result = run_train_py("data.limit=16", "data.eval_limit=8", "validate.target_agreement=0.98",
                          f"hydra.run.dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}")
    assert result.returncode != 0
    assert "validate.target_agreement=0.98 at validate.confidence=0.9 needs at least 114" in result.stderr
    assert "load_mllm" not in result.stderr  # stopped before loading the model
