"""Withdrawal curve: accuracy per question family when every sample's visual tokens exit after layer k.

    python -m dyvte.testbed.report --split test --out reports/testbed

For k = 0..L it generates greedily with `VisualExit` (static exit k for the whole batch) and scores an answer as
correct when it equals the reference after lower-casing and stripping. It also runs the stock `model.generate`
as the full model, so the table shows that k = L reproduces it. Writes `withdrawal_curve.{json,md,png}`.
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from rich.progress import Progress

from dyvte import VisualExit
from dyvte.data import normalize_answer
from dyvte.evaluation.tables import markdown_table
from dyvte.loading import load_mllm
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR
from dyvte.testbed.scenes import FAMILIES, load_split

# A family "recovers" at the first k from which accuracy stays within this margin of the full model.
RECOVERY_MARGIN = 0.01


def question_of(record: dict) -> str:
    return record["conversations"][0]["value"].removeprefix("<image>\n")


def answer_of(record: dict) -> str:
    return record["conversations"][1]["value"]


def batches(records: list[dict], batch_size: int):
    """Batches of one family each, so `max_new_tokens` can follow that family's longest answer."""
    for family in FAMILIES:
        chunk = [r for r in records if r["family"] == family]
        for start in range(0, len(chunk), batch_size):
            yield chunk[start : start + batch_size]


def decode_answers(processor, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """New tokens up to the first `</s>`, decoded and normalised for exact-match scoring."""
    eos = processor.tokenizer.eos_token_id
    answers = []
    for row in sequences[:, prompt_length:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        answers.append(normalize_answer(processor.tokenizer.decode(row, skip_special_tokens=True)))
    return answers


@torch.no_grad()
def withdrawal_curve(model, processor, records: list[dict], images_dir: Path, batch_size: int = 64) -> dict:
    """Per-sample correctness for every static exit k and for the stock full model."""
    engine = VisualExit(model)
    num_layers = engine.num_layers
    correct = {k: {} for k in [*range(num_layers + 1), "full"]}
    matches_full = 0
    with Progress() as progress:
        task = progress.add_task("withdrawal curve", total=len(records))
        for chunk in batches(records, batch_size):
            prompts = [chat_prompt(processor, question_of(r)) for r in chunk]
            images = [Image.open(images_dir / r["image"]).convert("RGB") for r in chunk]
            inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
            references = [normalize_answer(answer_of(r)) for r in chunk]
            max_new = 1 + max(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in references)
            length = inputs["input_ids"].shape[1]
            full = decode_answers(processor, model.generate(**inputs, max_new_tokens=max_new, do_sample=False), length)
            for k in correct:
                if k == "full":
                    answers = full
                else:
                    exit_layer = torch.full((len(chunk),), k)
                    out = engine.generate(**inputs, exit_layer=exit_layer, max_new_tokens=max_new, do_sample=False)
                    answers = decode_answers(processor, out, length)
                    if k == num_layers:
                        matches_full += sum(a == f for a, f in zip(answers, full))
                for record, answer, reference in zip(chunk, answers, references):
                    correct[k].setdefault(record["family"], []).append(answer == reference)
            progress.update(task, advance=len(chunk))
    return {"num_layers": num_layers, "correct": correct, "exit_L_matches_full": matches_full / len(records)}


def summarise(curve: dict) -> dict:
    """Accuracy tables, the gap at k = 0 and the recovery layer of every family."""
    num_layers = curve["num_layers"]

    def accuracy(per_family: dict) -> dict:
        table = {family: sum(v) / len(v) for family, v in per_family.items()}
        table["overall"] = sum(sum(v) for v in per_family.values()) / sum(len(v) for v in per_family.values())
        return table

    by_k = {k: accuracy(curve["correct"][k]) for k in range(num_layers + 1)}
    full = accuracy(curve["correct"]["full"])
    recovery = {}
    for family in full:
        k = num_layers
        while k > 0 and by_k[k - 1][family] >= full[family] - RECOVERY_MARGIN:
            k -= 1
        recovery[family] = k
    return {
        "num_layers": num_layers,
        "full_model": full,
        "accuracy_by_exit": by_k,
        "gap_at_exit_0": {family: full[family] - by_k[0][family] for family in full},
        "recovery_layer": recovery,
        "exit_L_matches_full": curve["exit_L_matches_full"],
        "counts": {family: len(v) for family, v in curve["correct"]["full"].items()},
    }


def markdown(summary: dict, split: str) -> str:
    columns = [f for f in FAMILIES if f in summary["full_model"]] + ["overall"]
    lines = [
        f"# Withdrawal curve of the testbed model ({split} split)",
        "",
        "Exact-match accuracy (%) with all visual tokens withdrawn after layer k (k = 0: text only; "
        f"k = {summary['num_layers']}: every layer sees the image). `full` is stock `model.generate`.",
        "",
    ]
    rows = [[k, *(f"{100 * row[c]:.1f}" for c in columns)] for k, row in summary["accuracy_by_exit"].items()]
    rows.append(["full", *(f"{100 * summary['full_model'][c]:.1f}" for c in columns)])
    rows.append(["gap at k=0", *(f"{100 * summary['gap_at_exit_0'][c]:.1f}" for c in columns)])
    rows.append(["recovery layer", *(summary["recovery_layer"][c] for c in columns)])
    rows.append(["n", *(summary["counts"].get(c, sum(summary["counts"].values())) for c in columns)])
    lines += [
        markdown_table(["k", *columns], rows),
        "",
        f"Recovery layer: first k from which accuracy stays within {100 * RECOVERY_MARGIN:.0f} point of the full "
        f"model. Exit at k = L agrees with stock generation on {100 * summary['exit_L_matches_full']:.1f}% of samples.",
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict, path: Path, split: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(summary["accuracy_by_exit"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in [f for f in FAMILIES if f in summary["full_model"]] + ["overall"]:
        values = [100 * summary["accuracy_by_exit"][k][family] for k in ks]
        style = {"color": "black", "linewidth": 2.5} if family == "overall" else {}
        ax.plot(ks, values, marker="o", markersize=3, label=family, **style)
    ax.set_xlabel("exit layer k (visual tokens withdrawn from layer k on)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title(f"Testbed withdrawal curve ({split})")
    ax.set_xticks(ks)
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed", help='"testbed", a local checkpoint or a Hub id')
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="reports/testbed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N records per family (quick looks)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = load_mllm(args.model)
    records = load_split(Path(args.data_dir), args.split)
    if args.limit is not None:
        records = [r for f in FAMILIES for r in [r for r in records if r["family"] == f][: args.limit]]
    curve = withdrawal_curve(model, processor, records, Path(args.data_dir) / "images", args.batch_size)
    summary = summarise(curve)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "withdrawal_curve.json").write_text(json.dumps(summary, indent=1))
    (out / "withdrawal_curve.md").write_text(markdown(summary, args.split))
    plot(summary, out / "withdrawal_curve.png", args.split)
    print(markdown(summary, args.split))


if __name__ == "__main__":
    main()
