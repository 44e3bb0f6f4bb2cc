"""Does the certificate hold? Random calibration/test partitions of the labelled prompts, and leave-one-family-out.

    python -m dyvte.evaluation.certified [--partitions 200] [--calibration-size 700] [HYDRA OVERRIDES ...]

The pool is every row of the train, val and test label caches of `python train.py` with the same overrides (the
rows labelled so far, if a cache is incomplete). Every row gets a score from heads that never trained on it:
`validate.folds` sets of the configured heads are cross-fitted over the pool, each scoring the fold it left out
(as `validate.calibration=crossfit` does for the train split). Risk is exact from the label cache.

- validity: `partitions` random splits of the pool into `calibration_size` calibration rows and the rest as test
  rows; per procedure (today's point estimate, Learn-then-Test certified, certified per family) the share of
  partitions whose test agreement falls under the target, overall and per family (LTT promises at most
  1 - confidence for the certified rows, up to the test rows' own sampling noise).
- shift: calibrate on every family but one, test on the one left out (the heads trained on all families).

Writes `validity.{json,md}` and `shift.{json,md}` under `--out` (reports/testbed/certified).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from datasets import concatenate_datasets
from hydra import compose, initialize_config_module

from ..cli import register_resolvers
from ..data import load_splits
from ..loading import load_mllm
from ..training.certify import certify
from ..training.heads_module import torch_columns
from ..training.pipeline import heads_config, label_stores, out_of_fold_probabilities
from ..training.simulate import first_exit, first_safe_exit, layer_thresholds, prefill_costs
from .tables import markdown_table


def pooled_rows(cfg, work_dir: Path) -> dict:
    """The labelled rows of the train, val and test caches of `cfg`, each scored by heads cross-fitted over the
    pool: `p_exit` [N, L], `match` [N, L+1] bool, `costs` [N, L+1], `oracle` [N] (first safe exit), `family` and
    `split` per row."""
    stores = label_stores(cfg, None, None, load_splits(cfg.data), compute=False)
    parts = {name: store.load() for name, store in stores.items() if store.shards()}
    rows = concatenate_datasets(list(parts.values()))
    model, _ = load_mllm(cfg.model.name_or_path, dtype=cfg.model.dtype, revision=cfg.model.revision)
    return {
        "p_exit": out_of_fold_probabilities(cfg, heads_config(cfg, model), rows, work_dir),
        "match": torch_columns(rows, ["match"])["match"].bool(),
        "costs": prefill_costs(rows, model.config),
        "oracle": first_safe_exit(rows),
        "family": list(rows["family"]),
        "split": [name for name, part in parts.items() for _ in range(len(part))],
        "grid": list(cfg.validate.thresholds),
        "min_agreement": cfg.validate.min_agreement,
        "path_fraction": cfg.validate.path_fraction,
    }


def point_estimate(p_exit, match, costs, min_agreement: float, grid: list[float]) -> tuple[float, ...]:
    """Today's `validate.decision=per_layer` thresholds: the lowest global threshold of `grid` keeping
    `min_agreement` on the rows, then lowered head by head (`layer_thresholds`)."""
    rows = torch.arange(len(p_exit))
    agreeing = [t for t in sorted(grid) if match[rows, first_exit(p_exit, t)].float().mean() >= min_agreement]
    start = agreeing[0] if agreeing else max(grid)
    return layer_thresholds(p_exit, match, costs, min_agreement, grid, start)


def scores(thresholds, p_exit, match, costs, families: list[str]) -> dict:
    """Agreement and LM prefill FLOPs saved at `thresholds` [L], overall and per family."""
    rows = torch.arange(len(p_exit))
    exits = first_exit(p_exit, torch.tensor(thresholds))
    kept, spent = match[rows, exits].float(), costs[rows, exits].double()
    result = {"agreement": float(kept.mean()), "flops_saved": float(1 - spent.sum() / costs[:, -1].double().sum()),
              "families": {}}
    for family in sorted(set(families)):
        members = torch.tensor([i for i, f in enumerate(families) if f == family])
        result["families"][family] = float(kept[members].mean())
    return result


def procedures(target: float, confidence: float, pool: dict, seed: int) -> dict:
    """name -> function(p_exit, match, costs, families) -> thresholds [L], for the procedures compared. Certified
    per family tests CALM's fixed global path with every calibration row (the per-head path would leave half the
    rows, too few per family); a calibration draw with no family large enough certifies nothing: never exit."""
    def certified(decision: str, groups: bool):
        def choose(p_exit, match, costs, families):
            try:
                return certify(p_exit, match, costs, target, confidence, pool["grid"], decision=decision, seed=seed,
                               path_fraction=pool["path_fraction"],
                               groups=families if groups else None)["thresholds"]
            except ValueError:  # too few rows in every group
                return [1.0] * p_exit.shape[1]
        return choose

    grid, min_agreement = pool["grid"], pool["min_agreement"]
    return {
        f"point estimate ({min_agreement})": lambda p, m, c, f: point_estimate(p, m, c, min_agreement, grid),
        f"point estimate ({target})": lambda p, m, c, f: point_estimate(p, m, c, target, grid),
        "certified, per-head path": certified("per_layer", groups=False),
        "certified, global path": certified("global", groups=False),
        "certified per family, global path": certified("global", groups=True),
    }


def validity(pool: dict, calibration_size: int, partitions: int, target: float, confidence: float,
             seed: int = 0) -> dict:
    """Share of `partitions` random calibration/test splits whose test agreement is under `target`, per
    procedure, overall and per family; with the mean agreement and FLOPs saved on the test rows."""
    methods = procedures(target, confidence, pool, seed)
    generator = torch.Generator().manual_seed(seed)
    results = {name: [] for name in methods}
    for _ in range(partitions):
        order = torch.randperm(len(pool["p_exit"]), generator=generator)
        cal, test = order[:calibration_size], order[calibration_size:]
        cal_families = [pool["family"][i] for i in cal.tolist()]
        test_families = [pool["family"][i] for i in test.tolist()]
        for name, method in methods.items():
            thresholds = method(pool["p_exit"][cal], pool["match"][cal], pool["costs"][cal], cal_families)
            results[name].append(scores(thresholds, pool["p_exit"][test], pool["match"][test], pool["costs"][test],
                                        test_families))
    families = sorted(set(pool["family"]))
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "under_target": sum(r["agreement"] < target for r in runs) / partitions,
            "mean_agreement": sum(r["agreement"] for r in runs) / partitions,
            "mean_flops_saved": sum(r["flops_saved"] for r in runs) / partitions,
            "families_under_target": {
                f: sum(r["families"][f] < target for r in runs) / partitions for f in families},
            "families_mean_agreement": {f: sum(r["families"][f] for r in runs) / partitions for f in families},
        }
    return {"calibration_size": calibration_size, "test_size": len(pool["p_exit"]) - calibration_size,
            "partitions": partitions, "target_agreement": target, "confidence": confidence,
            "slack": 2 * math.sqrt(confidence * (1 - confidence) / partitions), "procedures": summary}


def leave_one_family_out(pool: dict, target: float, confidence: float, seed: int = 0) -> dict:
    """Per family: the pool split in random halves; thresholds calibrated on the first half (in distribution) or
    on its rows of every other family (left out), scored on the family's rows of the second half."""
    methods = procedures(target, confidence, pool, seed)
    methods.pop("certified per family, global path")
    order = torch.randperm(len(pool["p_exit"]), generator=torch.Generator().manual_seed(seed)).tolist()
    first, second = order[:len(order) // 2], order[len(order) // 2:]
    rows = {}
    for family in sorted(set(pool["family"])):
        held = torch.tensor([i for i in second if pool["family"][i] == family])
        rows[family] = {"samples": len(held)}
        for setting, cal in (("in distribution", first),
                             ("left out", [i for i in first if pool["family"][i] != family])):
            cal = torch.tensor(cal)
            for name, method in methods.items():
                thresholds = method(pool["p_exit"][cal], pool["match"][cal], pool["costs"][cal],
                                    [pool["family"][i] for i in cal.tolist()])
                score = scores(thresholds, pool["p_exit"][held], pool["match"][held], pool["costs"][held],
                               [family] * len(held))
                rows[family][f"{name}, {setting}"] = {k: score[k] for k in ("agreement", "flops_saved")}
    return {"target_agreement": target, "confidence": confidence, "families": rows}


def _pool(report: dict) -> str:
    return ", ".join(f"{n} {split} rows" for split, n in report.get("pool", {}).items())


def validity_markdown(report: dict) -> str:
    procedures_ = report["procedures"]
    families = sorted(next(iter(procedures_.values()))["families_under_target"])
    header = ["procedure", "under target: all", *families, "mean agreement", "mean FLOPs saved"]
    table = [[name, f"{p['under_target']:.1%}", *(f"{p['families_under_target'][f]:.1%}" for f in families),
              f"{p['mean_agreement']:.2%}", f"{p['mean_flops_saved']:.1%}"] for name, p in procedures_.items()]
    return (f"Share of {report['partitions']} random partitions (calibration {report['calibration_size']}, test "
            f"{report['test_size']} rows) whose test agreement falls under {report['target_agreement']:.0%}; "
            f"certified at confidence {report['confidence']} (allowed: {1 - report['confidence']:.0%} plus "
            f"sampling slack ±{report['slack']:.1%}). Pool: {_pool(report)}.\n\n"
            + markdown_table(header, table) + "\n")


def shift_markdown(report: dict) -> str:
    families = report["families"]
    settings = [k for k in next(iter(families.values())) if k != "samples"]
    header = ["family left out", "rows", *(f"{s}: agreement / saved" for s in settings)]
    table = [[f, str(r["samples"]), *(f"{r[s]['agreement']:.2%} / {r[s]['flops_saved']:.1%}" for s in settings)]
             for f, r in families.items()]
    return ("Leave one family out: the pool in random halves; thresholds calibrated on the first half, with (in "
            "distribution) or without (left out) the family, scored on the family's rows of the second half (the "
            "heads were cross-fitted on all families). "
            f"Target {report['target_agreement']:.0%}, confidence {report['confidence']}. Pool: {_pool(report)}.\n\n"
            + markdown_table(header, table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--calibration-size", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("reports/testbed/certified"))
    parser.add_argument("overrides", nargs="*", help="train.py overrides: the label caches and heads to study")
    args = parser.parse_args()
    register_resolvers()
    with initialize_config_module("dyvte.conf", version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    pool = pooled_rows(cfg, args.out / "folds")
    report = validity(pool, args.calibration_size, args.partitions, args.target, args.confidence)
    shift = leave_one_family_out(pool, args.target, args.confidence)
    report["pool"] = shift["pool"] = {split: pool["split"].count(split) for split in sorted(set(pool["split"]))}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, result, markdown in (("validity", report, validity_markdown), ("shift", shift, shift_markdown)):
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"{name}.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
