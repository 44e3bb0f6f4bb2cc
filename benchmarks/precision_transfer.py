"""Do labels and heads transfer across precisions of the frozen model? `python -m benchmarks.precision_transfer`.

On the shipped testbed (a seeded subsample of its splits, the same for every precision), `train.py` runs with the
frozen model in fp32, bf16, LLM.int8 (bitsandbytes' default outlier threshold 6.0) and NF4 (fp32 compute). Then:

- labels: per exit layer, the share of samples whose label (exit at `k` safe or not) equals the fp32 label, and
  the share whose full-depth answer equals the fp32 model's;
- heads: each precision's own `validate.json` (agreement with its own full model, FLOPs saved);
- cross: heads trained on one precision's labels, deployed on another's: as trained (their calibrated per-layer
  thresholds) and recalibrated on the deployment precision (`train.py stages=[validate] heads=...`).

Every step skips what a previous run of this script finished (the outputs and the label cache stay), and the
JSON is rewritten after each step. Each `train.py` runs under `flock LOCK` (`--lock`, default the shared machine's
heavy-job lock), so that it has the machine's cores to itself; `--lock ""` runs without.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from dyvte.heads import ExitHeads
from dyvte.loading import resolve_model_path
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR
from dyvte.training.label_store import LabelStore
from dyvte.training.simulate import validate

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = {
    "fp32": ["model.dtype=float32"],
    "bf16": ["model.dtype=bfloat16"],
    "int8": ["model.quantization=8bit"],
    "nf4": ["model.quantization=nf4"],
}
# (trained on, deployed on): the swaps users make between a quantized labelling model and a bf16 server
CROSS = [("nf4", "bf16"), ("bf16", "nf4"), ("fp32", "nf4"), ("fp32", "int8"), ("nf4", "fp32")]


def train(args: list[str], log: Path, lock: str) -> float:
    """Run `train.py args` (under `flock lock`); the seconds it took once it held the lock."""
    command = [sys.executable, str(ROOT / "train.py"), *args]
    if lock:
        command = ["flock", lock, "bash", "-c", 'echo "lock held $(date +%s.%N)"; exec "$@"', "_", *command]
    start = time.time()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed; see {log}")
    if lock:
        start = float(log.read_text().split("lock held ", 1)[1].split()[0])
    return time.time() - start


def stores(cache_dir: Path, sizes: dict[str, int]) -> dict[tuple[str, str], LabelStore]:
    """The complete label caches under `cache_dir` of `sizes[split]` samples (this run's `data.limit` and
    `data.eval_limit`; a run of other limits left its caches beside them), by (precision, split)."""
    found = {}
    for meta in cache_dir.glob("*/meta.json"):
        fields = json.loads(meta.read_text())
        fields.pop("schema")
        complete = meta.parent / "complete.json"
        if not complete.exists() or json.loads(complete.read_text())["samples"] != sizes[fields["split"]]:
            continue
        precision = {"8bit": "int8", "nf4": "nf4"}.get(fields["quantization"]) or (
            "bf16" if fields["dtype"] == "bfloat16" else "fp32")
        store = LabelStore(cache_dir, fields)
        if store.complete:
            found[(precision, fields["split"])] = store
    return found


def label_agreement(reference, other) -> dict:
    """Per exit layer 0..L: the share of samples (matched by id) whose label equals the reference's; and the share
    whose full-depth answer does."""
    assert reference["id"] == other["id"], "the two caches hold different samples"
    ref, oth = torch.tensor(reference["labels"]), torch.tensor(other["labels"])
    same_answer = [a == b for a, b in zip(reference["answer"], other["answer"])]
    return {"per_exit_layer": (ref == oth).float().mean(0).tolist(), "all_layers": float((ref == oth).float().mean()),
            "full_answer": sum(same_answer) / len(same_answer)}


def summary(report: dict) -> dict:
    return {k: report[k] for k in ("agreement", "accuracy", "full_accuracy", "flops_saved", "mean_exit_layer")}


def markdown(results: dict) -> str:
    """The tables of docs/precision.md from the results JSON."""
    runs, labels = results["runs"], results["labels_vs_fp32"]
    lines = ["| frozen model | full-model accuracy (test) | labels = fp32 labels (test, all exits) | full answer = fp32 "
             "answer (test) | heads' agreement (test) | FLOPs saved | train.py seconds |", "|---|---|---|---|---|---|---|"]
    for name in ("fp32", "bf16", "int8", "nf4"):
        if name not in labels:
            continue
        run, test = runs[name], labels[name]["test"]
        lines.append(f"| {name} | {run['full_accuracy']:.1%} | {test['all_layers']:.1%} | {test['full_answer']:.1%} | "
                     f"{run['agreement']:.1%} | {run['flops_saved']:.1%} | "
                     + (f"{run['seconds']:.0f} |" if "seconds" in run else "- |"))
    exits = [name for name in ("bf16", "int8", "nf4") if name in labels]
    if exits:
        layers = len(labels[exits[0]]["test"]["per_exit_layer"])
        lines += ["", "Label agreement with the fp32 labels per exit layer k (test split):", "",
                  "| k | " + " | ".join(exits) + " |", "|---|" + "---|" * len(exits)]
        for k in range(layers):
            lines.append(f"| {k} | " + " | ".join(f"{labels[n]['test']['per_exit_layer'][k]:.0%}" for n in exits) + " |")
    if results["cross"]:
        lines += ["", "| heads trained on -> deployed on | as trained: agreement / FLOPs saved | recalibrated on the "
                  "deployment's val: agreement / FLOPs saved | heads trained on the deployment precision |",
                  "|---|---|---|---|"]
        for key, cross in results["cross"].items():
            cells = [f"{c['agreement']:.1%} / {c['flops_saved']:.1%}" if c else "not run"
                     for c in (cross["as_trained"], cross.get("recalibrated"), cross["native"])]
            lines.append(f"| {key.replace('->', ' -> ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=240, help="training prompts (data.limit)")
    parser.add_argument("--eval-limit", type=int, default=80,
                        help="val and test prompts each (data.eval_limit); 3000 and 640: the whole testbed")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "precision_transfer"))
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "precision_transfer.json"))
    parser.add_argument("--lock", default="/tmp/dyvte-heavy.lock", help="flock this file around each train.py")
    parser.add_argument("--markdown", action="store_true", help="print the tables of an existing results JSON")
    options = parser.parse_args()
    if options.markdown:
        print(markdown(json.loads(Path(options.results).read_text())))
        return
    out, results_path = Path(options.out), Path(options.results)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = out / "cache"
    common = [f"data.limit={options.limit}", f"data.eval_limit={options.eval_limit}", f"cache_dir={cache_dir}"]
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results.update({"limit": options.limit, "eval_limit": options.eval_limit, "commands": {},
                    "runs": results.get("runs", {}), "labels_vs_fp32": {}, "cross": {}})
    model_config = AutoConfig.from_pretrained(resolve_model_path("testbed"))
    # the samples each split's cache holds: the limits, or the whole split where it is smaller (val has 400)
    sizes = {split: min(limit, len(json.loads((TESTBED_DATA_DIR / f"{split}.json").read_text())))
             for split, limit in (("train", options.limit), ("val", options.eval_limit), ("test", options.eval_limit))}

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    done = []
    for name in ("fp32", "nf4", "bf16", "int8"):  # the slowest (LLM.int8 on a CPU) last
        run_dir = out / name
        args = [*PRECISIONS[name], *common, f"hydra.run.dir={run_dir}"]
        results["commands"][name] = "python train.py " + " ".join(args)
        if not (run_dir / "validate.json").exists():
            results["runs"][name] = {"seconds": train(args, out / f"{name}.log", options.lock)}
        report = json.loads((run_dir / "validate.json").read_text())
        results["runs"][name] = {**results["runs"].get(name, {}), **summary(report),
                                 "threshold": report["threshold"]}
        done.append(name)
        caches = stores(cache_dir, sizes)
        results["labels_vs_fp32"][name] = {
            split: label_agreement(caches[("fp32", split)].load(), caches[(name, split)].load())
            for split in ("train", "val", "test")
        }
        save()
        for source, target in CROSS:
            if name not in (source, target) or source not in done or target not in done:
                continue
            heads = ExitHeads.from_pretrained(out / source / "heads")
            as_trained = validate(heads, caches[(target, "test")].load(), model_config,
                                  tuple(heads.config.thresholds), calibration=None, min_agreement=0.985)
            cross_dir = out / f"{source}_heads_on_{target}"
            args = ["stages=[validate]", f"heads={out / source / 'heads'}", "validate.calibration=val",
                    *PRECISIONS[target], *common, f"hydra.run.dir={cross_dir}"]
            results["commands"][f"{source}->{target} recalibrated"] = "python train.py " + " ".join(args)
            if not (cross_dir / "validate.json").exists():
                train(args, out / f"{source}_heads_on_{target}.log", options.lock)
            recalibrated = json.loads((cross_dir / "validate.json").read_text())
            results["cross"][f"{source}->{target}"] = {
                "as_trained": {k: as_trained[k] for k in ("agreement", "accuracy", "flops_saved", "mean_exit_layer")},
                "recalibrated": summary(recalibrated),
                "native": {k: results["runs"][target][k] for k in ("agreement", "accuracy", "flops_saved")},
            }
            save()
    print(markdown(results))


if __name__ == "__main__":
    main()
