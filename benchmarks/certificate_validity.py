"""Does the certificate hold for the heads `train.py` ships? `python -m benchmarks.certificate_validity RUN_DIR`.

RUN_DIR is a `train.py validate.target_agreement=...` run on the testbed: its `heads/` are the deployed heads and its
`validate.json` holds the certificate's path (learned on the run's tuning rows, never on certification rows).

The judge is the true risk, not a test split's estimate of it. An independent pool is drawn with the testbed's
generator and another seed (`--pool-seed`, `--pool-images` images of 4 questions; no scene of the shipped splits),
labelled once by `train.py stages=[labels]` (the label cache is reused on reruns) and scored by the deployed heads.
Each calibration draw takes `n` rows of the pool with replacement, so the pool's empirical distribution *is* the
distribution the draws are exchangeable with, and a certified point's true risk is its risk on the whole pool,
exactly, with no sampling noise of test rows. Over `--draws` draws per setting:

- validity: the share of draws whose certified point's pool risk exceeds 1 - target, with its Clopper-Pearson 95%
  interval, against delta, for every target in `--targets` and delta in `--deltas`; and the mean LM prefill FLOPs
  saved and agreement on the pool;
- sizes: the same at target 0.98, delta 0.1 for calibration sizes `--sizes`;
- per family: `validate.groups=family` certification on stratified draws of `--family-sizes` rows per family:
  the share of draws whose certified point's pool risk exceeds 1 - target in any family, the mean saving, and per
  family the share of draws certifying any exit;
- the run's own certified thresholds on the whole pool: agreement and its standard error.

Writes `--out` (JSON) and `--report` (Markdown).
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from transformers import AutoConfig

from dyvte.cli import register_resolvers
from dyvte.configs import read_train_settings
from dyvte.data import load_splits
from dyvte.evaluation.tables import markdown_table
from dyvte.heads import ExitHeads
from dyvte.loading import resolve_model_path
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR
from dyvte.testbed.scenes import SceneConfig, build_split, render, scene_hash
from dyvte.training.certify import certified_index, exit_losses, path_exits
from dyvte.training.heads_module import torch_columns
from dyvte.training.pipeline import label_stores
from dyvte.training.simulate import exit_probabilities, prefill_costs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SPLITS = ("train", "val", "test", "certification")


def write_pool(out_dir: Path, seed: int, images: int) -> Path:
    """`images` testbed images of 4 questions each, drawn with `seed` (stream "pool"), none of them a scene of the
    shipped splits; written once as `pool.json` and `images/` under `out_dir` (a complete folder is reused)."""
    records_path = out_dir / "pool.json"
    if records_path.exists():
        return records_path
    shipped = {record["scene"] for split in SHIPPED_SPLITS
               for record in json.loads((TESTBED_DATA_DIR / f"{split}.json").read_text())}
    records, scenes = build_split("pool", images, seed, SceneConfig(), shipped)
    assert not {scene_hash(scene) for _, scene in scenes} & shipped
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for name, scene in scenes:
        render(scene, SceneConfig()).save(out_dir / "images" / name, optimize=True)
    partial = records_path.with_suffix(".partial")
    partial.write_text(json.dumps(records, indent=1))
    partial.rename(records_path)
    return records_path


def pool_overrides(records: Path) -> list[str]:
    return [f"data.json_path={records}", f"data.image_dir={records.parent / 'images'}", "data.val_json_path=null",
            "data.test_json_path=null", "data.certification_json_path=null", "data.limit=null"]


def run_overrides(run_dir: Path) -> list[str]:
    """The run's own Hydra overrides, less the ones about its data splits and outputs."""
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    return [o for o in overrides if not o.split("=")[0].lstrip("+~").startswith(("data.", "hydra.", "stages"))]


def label_pool(run_dir: Path, records: Path) -> None:
    """`train.py stages=[labels]` on the pool with the run's model and label settings (a complete cache is reused)."""
    command = [sys.executable, str(ROOT / "train.py"), "stages=[labels]", *run_overrides(run_dir),
               *pool_overrides(records), f"hydra.run.dir={records.parent / 'labels'}"]
    subprocess.run(command, cwd=ROOT, check=True)


def pool_rows(run_dir: Path, records: Path, heads: ExitHeads) -> dict:
    """The labelled pool: the deployed heads' p(exit) [N, L], losses [N, L+1], LM prefill FLOPs [N, L+1], family."""
    register_resolvers()
    with initialize_config_module("dyvte.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*run_overrides(run_dir), *pool_overrides(records), "~logger"])
    settings = read_train_settings(cfg)
    store = label_stores(settings, None, None, {"train": load_splits(settings.data)["train"]}, compute=False)["train"]
    rows = store.load()
    model_config = AutoConfig.from_pretrained(str(resolve_model_path(settings.model.name_or_path)),
                                              revision=settings.model.revision)
    return {"p_exit": exit_probabilities(heads, rows),
            "loss": exit_losses(torch_columns(rows, ["match"])["match"].bool(), settings.labels.reference),
            "costs": prefill_costs(rows, model_config), "family": list(rows["family"])}


def clopper_pearson(failures: int, draws: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate, by bisection on the binomial tails."""
    from dyvte.training.certify import binomial_cdf

    def solve(condition) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if condition(mid) else (low, mid)
        return (low + high) / 2

    alpha = 1 - level
    lower = 0.0 if failures == 0 else solve(lambda p: 1 - binomial_cdf(failures - 1, draws, p) < alpha / 2)
    upper = 1.0 if failures == draws else solve(lambda p: binomial_cdf(failures, draws, p) > alpha / 2)
    return lower, upper


def bootstrap_errors(losses: torch.Tensor, rows: torch.Tensor, n: int, draws: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Losses [draws, J-1] of the path points on `draws` draws of `n` of `rows` (indices into `losses` [N, J-1])
    with replacement: per draw, how often each row is drawn, times its losses."""
    counts = torch.zeros(draws, len(rows), dtype=torch.float64)
    picks = torch.randint(len(rows), (draws, n), generator=generator)
    counts.scatter_add_(1, picks, torch.ones(draws, n, dtype=torch.float64))
    return (counts @ losses[rows].double()).round().long()


def validity(path_loss: torch.Tensor, path_cost: torch.Tensor, rows: torch.Tensor, n: int, target: float,
             delta: float, draws: int, seed: int) -> dict:
    """Marginal certification on `draws` bootstrap draws of `n` of the pool's `rows`: failure rate (risk of the
    certified point on `rows` above 1 - target) with its interval, and the certified points' mean LM prefill FLOPs
    saved and agreement on `rows`. `path_loss` [N, J] bool and `path_cost` [N, J] of every pool row at every path
    point (index 0: never exit)."""
    generator = torch.Generator().manual_seed(seed)
    errors = bootstrap_errors(path_loss[:, 1:], rows, n, draws, generator)
    index = certified_index(errors[:, None, :], [n], target, 1 - delta)
    risk = path_loss[rows].double().mean(dim=0)[index]
    saved = 1 - path_cost[rows].double().sum(dim=0) / path_cost[rows, 0].double().sum()
    failures = int((risk > 1 - target).sum())
    low, high = clopper_pearson(failures, draws)
    return {"n": n, "target_agreement": target, "delta": delta, "draws": draws, "failure_rate": failures / draws,
            "failure_rate_95ci": [low, high], "mean_flops_saved": float(saved[index].mean()),
            "mean_agreement": float(1 - risk.mean()), "certified_any_exit": float((index > 0).double().mean())}


def family_validity(path_loss: torch.Tensor, path_cost: torch.Tensor, family: list[str], per_family: int,
                    target: float, delta: float, draws: int, seed: int) -> dict:
    """`validate.groups=family` on stratified draws of `per_family` pool rows per family (with replacement): the
    share of draws whose certified point's risk exceeds 1 - target in any family, and the mean saving."""
    generator = torch.Generator().manual_seed(seed)
    families = sorted(set(family))
    members = [torch.tensor([i for i, g in enumerate(family) if g == f]) for f in families]
    errors = torch.stack([bootstrap_errors(path_loss[:, 1:], rows, per_family, draws, generator) for rows in members],
                         dim=1)  # [draws, G, J-1]
    index = certified_index(errors, [per_family] * len(families), target, 1 - delta)
    risk = torch.stack([path_loss[rows].double().mean(dim=0) for rows in members])  # [G, J]
    failures = int((risk[:, index] > 1 - target).any(dim=0).sum())
    low, high = clopper_pearson(failures, draws)
    saved = 1 - path_cost.double().sum(dim=0) / path_cost[:, 0].double().sum()
    return {"per_family": per_family, "target_agreement": target, "delta": delta, "draws": draws,
            "failure_rate_any_family": failures / draws, "failure_rate_95ci": [low, high],
            "mean_flops_saved": float(saved[index].mean()), "certified_any_exit": float((index > 0).double().mean())}


def percent(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def report_markdown(result: dict) -> str:
    pool = result["pool"]
    lines = [
        (f"Certified exit judged by its true risk. Heads and path: `{result['run_dir']}` (target "
        f"{result['run']['target_agreement']}, confidence {result['run']['confidence']}). Independent pool: "
        f"{pool['samples']} testbed prompts of {pool['images']} images drawn with seed {pool['seed']} (no scene of "
        "the shipped splits), labelled once; each calibration draw takes n pool rows with replacement, and a "
        "certified point fails when its risk on the whole pool exceeds 1 - target. Failure rates with their "
        "Clopper-Pearson 95% intervals; `python -m benchmarks.certificate_validity RUN_DIR`."), "",
        (f"The run's certified thresholds on the pool: agreement {percent(pool['certified_agreement'], 2)} ± "
        f"{percent(pool['certified_agreement_se'], 2)} (one standard error), "
        f"{percent(pool['certified_flops_saved'])} of LM prefill FLOPs saved; the point estimate "
        f"{percent(pool['point_estimate_agreement'], 2)} at {percent(pool['point_estimate_flops_saved'])}."), "",
        f"**Validity** (n = {result['validity'][0]['n']} rows per draw, {result['validity'][0]['draws']} draws):", "",
        markdown_table(["target", "delta", "failure rate", "95% interval", "mean saved", "mean agreement",
                        "draws certifying an exit"],
                       [[str(r["target_agreement"]), str(r["delta"]), percent(r["failure_rate"]),
                         f"{percent(r['failure_rate_95ci'][0])}–{percent(r['failure_rate_95ci'][1])}",
                         percent(r["mean_flops_saved"]), percent(r["mean_agreement"], 2),
                         percent(r["certified_any_exit"])] for r in result["validity"]]), "",
        "**Calibration size** (target 0.98, delta 0.1):", "",
        markdown_table(["n", "failure rate", "95% interval", "mean saved", "mean agreement"],
                       [[str(r["n"]), percent(r["failure_rate"]),
                         f"{percent(r['failure_rate_95ci'][0])}–{percent(r['failure_rate_95ci'][1])}",
                         percent(r["mean_flops_saved"]), percent(r["mean_agreement"], 2)] for r in result["sizes"]]),
        "",
        ("**Per family** (target 0.98, delta 0.1): each family certified alone at n rows of it (share of draws that "
        "certify any exit / mean saving on the family), and `validate.groups=family` with n rows of every family "
        "(a failure: any family's risk above 1 - target):"), "",
    ]
    sizes = sorted({r["n"] for r in result["families_alone"]})
    families = sorted({r["family"] for r in result["families_alone"]})
    table = [[family, *(next(f"{percent(r['certified_any_exit'], 0)} / {percent(r['mean_flops_saved'])}"
                             for r in result["families_alone"] if r["family"] == family and r["n"] == n)
                        for n in sizes)] for family in families]
    table.append(["groups=family (failure rate; saved)", *(next(
        f"{percent(r['failure_rate_any_family'])} ({percent(r['failure_rate_95ci'][0])}–"
        f"{percent(r['failure_rate_95ci'][1])}); {percent(r['mean_flops_saved'])}"
        for r in result["groups"] if r["per_family"] == n) for n in sizes)])
    lines.append(markdown_table(["family", *(f"n = {n} per family" for n in sizes)], table))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a train.py run with validate.target_agreement set")
    parser.add_argument("--pool-seed", type=int, default=1)
    parser.add_argument("--pool-images", type=int, default=3000, help="4 questions each: 12,000 prompts")
    parser.add_argument("--pool-dir", type=Path, default=None, help="default: .cache/dyvte/pool-seed{S}-{images}")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.95, 0.97, 0.98])
    parser.add_argument("--deltas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--family-sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "certificate_validity.json")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "testbed" / "certified" / "validity.md")
    args = parser.parse_args()
    start = time.perf_counter()
    run = json.loads((args.run_dir / "validate.json").read_text())
    if "certified" not in run:
        sys.exit(f"{args.run_dir}/validate.json holds no certificate: run train.py validate.target_agreement=0.98")
    certified = run["certified"]
    pool_dir = args.pool_dir or ROOT / ".cache" / "dyvte" / f"pool-seed{args.pool_seed}-{args.pool_images}"
    records = write_pool(pool_dir, args.pool_seed, args.pool_images)
    label_pool(args.run_dir, records)
    heads = ExitHeads.from_pretrained(args.run_dir / "heads")
    pool = pool_rows(args.run_dir, records, heads)
    path = torch.tensor(certified["path"], dtype=torch.float64)
    exits = path_exits(path, pool["p_exit"])
    path_loss, path_cost = pool["loss"].gather(1, exits), pool["costs"].gather(1, exits)
    rows = torch.arange(len(path_loss))
    full = path_cost[:, 0].double().sum()

    def on_pool(thresholds) -> tuple[float, float, float]:
        chosen = pool["loss"].gather(1, path_exits(torch.tensor([thresholds], dtype=torch.float64),
                                                   pool["p_exit"])).double()
        spent = pool["costs"].gather(1, path_exits(torch.tensor([thresholds], dtype=torch.float64), pool["p_exit"]))
        agreement = 1 - float(chosen.mean())
        return agreement, math.sqrt(agreement * (1 - agreement) / len(chosen)), float(1 - spent.sum() / full)

    agreement, se, saved = on_pool(certified["thresholds"])
    point = certified["point_estimate"]["threshold"]
    point = point if isinstance(point, list) else [point] * path.shape[1]
    point_agreement, _, point_saved = on_pool(point)
    n = certified["certification_samples"]
    result = {
        "run_dir": str(args.run_dir),
        "run": {k: certified[k] for k in ("target_agreement", "confidence", "certification_samples", "path_length",
                                          "path_index")},
        "pool": {"seed": args.pool_seed, "images": args.pool_images, "samples": len(path_loss),
                 "certified_agreement": agreement, "certified_agreement_se": se, "certified_flops_saved": saved,
                 "point_estimate_agreement": point_agreement, "point_estimate_flops_saved": point_saved},
        "validity": [validity(path_loss, path_cost, rows, n, target, delta, args.draws, seed)
                     for seed, (target, delta) in enumerate((t, d) for t in args.targets for d in args.deltas)],
        "sizes": [validity(path_loss, path_cost, rows, size, 0.98, 0.1, args.draws, 100 + seed)
                  for seed, size in enumerate(args.sizes)],
        "families_alone": [],
        "groups": [family_validity(path_loss, path_cost, pool["family"], size, 0.98, 0.1, args.draws, 200 + seed)
                   for seed, size in enumerate(args.family_sizes)],
    }
    for seed, family in enumerate(sorted(set(pool["family"]))):
        members = torch.tensor([i for i, g in enumerate(pool["family"]) if g == family])
        for size in args.family_sizes:
            row = validity(path_loss, path_cost, members, size, 0.98, 0.1, args.draws, 300 + seed)
            result["families_alone"].append({"family": family, **row})
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report_markdown(result))
    print(report_markdown(result))


if __name__ == "__main__":
    main()
