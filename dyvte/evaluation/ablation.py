"""Head ablations as one Hydra multirun over the cached labels, and the table that compares them.

    python train.py -m experiment=ablation      # every setting in conf/ablation/, then reports/testbed/ablation.*

Each job trains and validates heads of one setting (`conf/ablation/<name>.yaml`) on the same label cache (no
relabelling: the cache stores every feature group); `AblationReport`, a Hydra callback, collects their
`validate.json` when the multirun ends and writes one table in the layout of the DyVTE paper's Tables 3 and 6:
per setting, agreement with the full model, accuracy, LM prefill FLOPs saved, mean exit layer and head
parameters on the held-out split, next to the label oracle and the per-family static exit.
"""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .tables import markdown_table


def collect(sweep_dir: Path) -> list[dict]:
    """One row per finished job of a multirun: its setting (the `ablation` override) and validate.json."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        report_path = job / "validate.json"
        if not report_path.exists():
            continue
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        setting = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("ablation=")), job.name)
        config = OmegaConf.load(job / ".hydra" / "config.yaml")
        report = json.loads(report_path.read_text())
        rows.append({
            "setting": setting,
            "inputs": list(config.head_training.inputs),
            "architecture": config.head_training.architecture,
            "hidden": config.head_training.hidden,
            "label_shape": config.head_training.label_shape,
            "label_target": config.head_training.label_target,
            "decision": config.validate.decision,
            "calibration": config.validate.get("calibration", "val"),
            **{k: report[k] for k in ("agreement", "accuracy", "flops_saved", "mean_exit_layer", "head_parameters")},
            "val": report.get("val", {}),
            "label_oracle": report.get("label_oracle", {}),
            "family_static": report.get("family_static", {}),
        })
    return rows


def write_report(rows: list[dict], out_dir: Path) -> str:
    """`ablation.json` and `ablation.md` in `out_dir`; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablation.json").write_text(json.dumps(rows, indent=2))
    oracle = rows[0]["label_oracle"] if rows else {}
    header = ["setting", "inputs", "heads", "labels", "decision", "val: agreement", "val: FLOPs saved",
              "agreement", "accuracy", "FLOPs saved", "share of oracle", "mean exit", "parameters"]
    table = []
    for row in rows:
        share = row["flops_saved"] / oracle["flops_saved"] if oracle.get("flops_saved") else None
        heads = f"{row['architecture']}, h = {row['hidden']}"
        labels = row["label_shape"] if row["label_target"] == "safe" else f"{row['label_shape']}, match"
        decision = row["decision"] if row["calibration"] == "val" else f"{row['decision']}, {row['calibration']}"
        table.append([row["setting"], " + ".join(row["inputs"]), heads, labels, decision,
                      f"{100 * row['val'].get('agreement', float('nan')):.2f}%",
                      f"{100 * row['val'].get('flops_saved', float('nan')):.1f}%", f"{100 * row['agreement']:.2f}%",
                      f"{100 * row['accuracy']:.2f}%", f"{100 * row['flops_saved']:.1f}%",
                      "—" if share is None else f"{100 * share:.0f}%", f"{row['mean_exit_layer']:.2f}",
                      f"{row['head_parameters']:,}"])
    references = []
    for name, key in (("label oracle (first safe exit)", "label_oracle"), ("per-family static exit", "family_static")):
        ref = rows[0][key] if rows else {}
        if ref:
            references.append([name, f"{100 * ref['agreement']:.2f}%", f"{100 * ref['accuracy']:.2f}%",
                               f"{100 * ref['flops_saved']:.1f}%", f"{ref['mean_exit_layer']:.2f}"])
    markdown = "\n".join([
        "# Exit-head ablations on the shipped testbed",
        "",
        "`python train.py -m experiment=ablation`: one job per setting of `conf/ablation/`, all on the same label "
        "cache; the thresholds of each keep `validate.min_agreement` on val (with `crossfit`, on out-of-fold scores "
        "of the train split plus val); settings are compared on val, the other figures are on test.",
        "",
        markdown_table(header, table),
        "",
        "References on the same split:",
        "",
        markdown_table(["reference", "agreement", "accuracy", "FLOPs saved", "mean exit"], references),
        "",
    ])
    (out_dir / "ablation.md").write_text(markdown)
    return markdown


class AblationReport(Callback):
    """Hydra callback: when the multirun ends, `write_report` over its jobs into `out_dir`."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = collect(Path(config.hydra.sweep.dir))
        print(write_report(rows, self.out_dir))
