"""Does the certificate hold? Random calibration/test partitions of the labelled prompts, and leave-one-family-out.

    python -m dyvte.evaluation.certified outputs/DAY/TIME      # a `python train.py` run (its heads, its caches)

Every prompt of the run's train, val and test splits gets a score from heads that never trained on it: the
train rows their out-of-fold scores (`calibration_scores.pt`, written by the validate stage with
`validate.calibration=crossfit`), val and test rows the final heads' scores. Risk is exact from the label cache.

- validity: `partitions` random splits of the pool into `calibration_size` calibration rows and the rest as test
  rows; per procedure (today's point estimate, Learn-then-Test certified, certified per family) the share of
  partitions whose test agreement falls under the target, overall and per family (LTT promises at most
  1 - confidence for the certified rows, plus the test rows' own sampling noise).
- shift: calibrate on every family but one, test on the one left out (the heads still trained on all families).

Writes `validity.{json,md}` and `shift.{json,md}` under `--out` (reports/testbed/certified).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..cli import register_resolvers
from ..data import load_splits
from ..heads import ExitHeads
from ..loading import load_mllm
from ..training.certify import certify
from ..training.heads_module import torch_columns
from ..training.pipeline import label_stores
from ..training.simulate import exit_probabilities, first_exit, layer_thresholds, prefill_costs
from .tables import markdown_table


def pooled_rows(run_dir: Path) -> dict:
    """Every labelled prompt of a run with a score from heads that never trained on it: `p_exit` [N, L], `match`
    [N, L+1] bool, `costs` [N, L+1], `oracle` [N] (first safe exit), `family` and `split` per row."""
    register_resolvers()
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    stores = label_stores(cfg, None, None, load_splits(cfg.data), compute=False)
    model, _ = load_mllm(cfg.model.name_or_path, dtype=cfg.model.dtype, revision=cfg.model.revision)
    heads = ExitHeads.from_pretrained(run_dir / "heads")
    calibration = torch.load(run_dir / "calibration_scores.pt")
    parts = []
    train = stores["train"].load()
    out_of_fold = dict(zip(calibration["id"], calibration["p_exit"]))
    parts.append((train, torch.stack([out_of_fold[i] for i in train["id"]]), "train"))
    for split in ("val", "test"):
        rows = stores[split].load()
        parts.append((rows, exit_probabilities(heads, rows), split))
    pool = {"p_exit": [], "match": [], "costs": [], "family": [], "split": []}
    for rows, p_exit, split in parts:
        pool["p_exit"].append(p_exit)
        pool["match"].append(torch_columns(rows, ["match"])["match"].bool())
        pool["costs"].append(prefill_costs(rows, model.config))
        pool["family"] += list(rows["family"])
        pool["split"] += [split] * len(rows)
    for key in ("p_exit", "match", "costs"):
        pool[key] = torch.cat(pool[key])
    labels = torch.cat([torch_columns(rows, ["labels"])["labels"][:, 1:] == 1 for rows, _, _ in parts])
    pool["oracle"] = torch.where(labels.any(dim=1), labels.int().argmax(dim=1) + 1, labels.shape[1])
    pool["grid"] = list(cfg.validate.thresholds)
    pool["min_agreement"] = cfg.validate.min_agreement
    return pool


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


def procedures(target: float, confidence: float, min_agreement: float, grid: list[float], seed: int) -> dict:
    """name -> function(p_exit, match, costs, families) -> thresholds [L], for the procedures compared."""
    def certified(groups: bool):
        return lambda p, m, c, f: certify(p, m, c, target, confidence, grid, seed=seed,
                                          groups=f if groups else None)["thresholds"]

    return {
        f"point estimate ({min_agreement})": lambda p, m, c, f: point_estimate(p, m, c, min_agreement, grid),
        f"point estimate ({target})": lambda p, m, c, f: point_estimate(p, m, c, target, grid),
        "certified": certified(groups=False),
        "certified per family": certified(groups=True),
    }


def validity(pool: dict, calibration_size: int, partitions: int, target: float, confidence: float,
             seed: int = 0) -> dict:
    """Share of `partitions` random calibration/test splits whose test agreement is under `target`, per
    procedure, overall and per family; with the mean agreement and FLOPs saved on the test rows."""
    methods = procedures(target, confidence, pool["min_agreement"], pool["grid"], seed)
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
    """Per family: thresholds calibrated on the train and val rows of every other family (point estimate and
    certified), scored on every pooled row of the family left out; beside them, calibrated on all families."""
    methods = procedures(target, confidence, pool["min_agreement"], pool["grid"], seed)
    methods.pop("certified per family")
    calibration = [i for i, s in enumerate(pool["split"]) if s != "test"]
    rows = {}
    for family in sorted(set(pool["family"])):
        held = torch.tensor([i for i, f in enumerate(pool["family"]) if f == family])
        rows[family] = {"samples": len(held)}
        for setting, cal in (("in distribution", calibration),
                             ("left out", [i for i in calibration if pool["family"][i] != family])):
            cal = torch.tensor(cal)
            for name, method in methods.items():
                thresholds = method(pool["p_exit"][cal], pool["match"][cal], pool["costs"][cal],
                                    [pool["family"][i] for i in cal.tolist()])
                score = scores(thresholds, pool["p_exit"][held], pool["match"][held], pool["costs"][held],
                               [family] * len(held))
                rows[family][f"{name}, {setting}"] = {k: score[k] for k in ("agreement", "flops_saved")}
    return {"target_agreement": target, "confidence": confidence, "families": rows}


def validity_markdown(report: dict) -> str:
    procedures_ = report["procedures"]
    families = sorted(next(iter(procedures_.values()))["families_under_target"])
    header = ["procedure", "under target: all", *families, "mean agreement", "mean FLOPs saved"]
    table = [[name, f"{p['under_target']:.1%}", *(f"{p['families_under_target'][f]:.1%}" for f in families),
              f"{p['mean_agreement']:.2%}", f"{p['mean_flops_saved']:.1%}"] for name, p in procedures_.items()]
    return (f"Share of {report['partitions']} random partitions (calibration {report['calibration_size']}, test "
            f"{report['test_size']} rows) whose test agreement falls under {report['target_agreement']:.0%}; "
            f"certified at confidence {report['confidence']} (allowed: {1 - report['confidence']:.0%} plus "
            f"sampling slack ±{report['slack']:.1%}).\n\n" + markdown_table(header, table) + "\n")


def shift_markdown(report: dict) -> str:
    families = report["families"]
    settings = [k for k in next(iter(families.values())) if k != "samples"]
    header = ["family left out", "rows", *(f"{s}: agreement / saved" for s in settings)]
    table = [[f, str(r["samples"]), *(f"{r[s]['agreement']:.2%} / {r[s]['flops_saved']:.1%}" for s in settings)]
             for f, r in families.items()]
    return ("Leave one family out: thresholds calibrated on the train (out-of-fold) and val rows of the other "
            "families, scored on every row of the family left out (the heads trained on all families). "
            f"Target {report['target_agreement']:.0%}, confidence {report['confidence']}.\n\n"
            + markdown_table(header, table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `python train.py` output folder (validate.calibration=crossfit)")
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--calibration-size", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("reports/testbed/certified"))
    args = parser.parse_args()
    pool = pooled_rows(args.run)
    args.out.mkdir(parents=True, exist_ok=True)
    report = validity(pool, args.calibration_size, args.partitions, args.target, args.confidence)
    (args.out / "validity.json").write_text(json.dumps(report, indent=2))
    (args.out / "validity.md").write_text(validity_markdown(report))
    shift = leave_one_family_out(pool, args.target, args.confidence)
    (args.out / "shift.json").write_text(json.dumps(shift, indent=2))
    (args.out / "shift.md").write_text(shift_markdown(shift))
    print(validity_markdown(report), shift_markdown(shift), sep="\n")


if __name__ == "__main__":
    main()
