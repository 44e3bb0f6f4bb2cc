"""`python -m benchmarks.llava7b [--samples 8] [--max-new-tokens 8] [--quantization 4bit]`: a full-depth
LLaVA-1.5-7B (random weights, llava-hf format, `benchmarks.llava7b_folder`) through `train.py` and `infer.py`.

Runs, one after the other, each in its own process:
1. `python train.py model=llava7b ...` on `--samples` LLaVA-665k-format samples made here (a quarter held out as
   val): the stages' wall times and the peak resident memory after each (from train.py's own log), the process's
   peak resident memory (`wait4`), the label cache's bytes per sample and their projection to 6,650 samples
   (1% of LLaVA-665k);
2. `python infer.py model=llava7b image=... heads=...` on one image (its JSON: prefill and decode times, the exit);
3. `--steps margins`: the full model's teacher-forced argmax against its own greedy answer, with the logit gaps;
4. in this process, the model once more: the prefill of one sample with exit at `k = L/2` and the full model,
   interleaved (`--repeats` rounds after a warm-up), vision features precomputed, beside what the engine predicts
   (the LM FLOPs ratio and the KV-cache bytes, `dyvte.flops`), and the KV bytes the cache really holds.
Results go to `--out` (benchmarks/results/llava7b.json; a `--quantization` run adds its own entry), rewritten after
every step. Run it alone on the machine (under the heavy-job lock): it needs about 16 GiB in bf16.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from dyvte import VisualExit, flops
from dyvte.configs import read_model_settings
from dyvte.prompts import chat_prompt

from .common import environment
from .llava7b_folder import build, default_folder
from .sections import _interleaved, _ratio_stats

ROOT = Path(__file__).resolve().parent.parent
LLAVA_665K_SAMPLES = 665_298  # llava_v1_5_mix665k.json
PAPER_SUBSET = 6_650  # DyVTE's 1% of it

# LLaVA-665k's prompt styles: a free-form question (<image> first) and the VQA short-answer prompt (<image> last).
QUESTIONS = [
    ("<image>\nWhat is the main color of the picture?", "The picture is mostly red."),
    ("Is it bright?\nAnswer the question using a single word or phrase.\n<image>", "Yes"),
    ("<image>\nHow many objects are there in the image?", "There are two objects."),
    ("What shape is in the middle?\nAnswer the question using a single word or phrase.\n<image>", "Circle"),
]


def llava_665k(folder: Path, n: int) -> tuple[Path, Path]:
    """`n` records in llava_v1_5_mix665k.json's format and their images (COCO-sized noise with a colored block)."""
    image_dir = folder / "images"
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(n):
        name = f"coco/train2017/{200000 + i:012d}.jpg"
        (image_dir / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (480, 640, 3), generator=generator, dtype=torch.uint8)
        pixels[120:360, 160 + 20 * i : 400 + 20 * i] = torch.tensor([40 * i % 256, 200, 255 - 30 * i % 256])
        Image.fromarray(pixels.numpy()).save(image_dir / name)
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        records.append({"id": f"{200000 + i:012d}", "image": name,
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    json_path = folder / "llava_v1_5_mix665k.json"
    json_path.write_text(json.dumps(records))
    return json_path, image_dir


def run_process(command: list[str], log_path: Path) -> dict:
    """Runs `command` (output to `log_path`); its wall time and peak resident memory (the kernel's, via wait4)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}); see {log_path}:\n"
                           + log_path.read_text()[-3000:])
    return {"command": " ".join(command), "wall_s": time.perf_counter() - start,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "log": str(log_path)}


STAGE_LINE = re.compile(r"stage (\w[\w ]*): ([\d.]+) s, peak resident memory so far ([\d.]+) GiB")


def model_overrides(folder: Path, args) -> list[str]:
    """The model of every step: LLaVA-1.5 7B's config on `folder`, at --dtype or --quantization."""
    return ["model=llava7b", f"model.name_or_path={folder}", f"model.dtype={args.dtype}",
            f"model.quantization={args.quantization or 'null'}"]


def load_model(folder: Path, args):
    """`(model, processor)` as the train.py and infer.py steps load them (their config, `model_overrides`)."""
    with initialize_config_module("dyvte.conf", version_base="1.3"):
        return read_model_settings(compose("infer", overrides=model_overrides(folder, args))).load()


def train(folder: Path, work: Path, json_path: Path, image_dir: Path, args, tag: str) -> dict:
    run_dir, cache = work / f"train-{tag}", work / f"cache-{tag}"
    command = [sys.executable, "train.py", *model_overrides(folder, args),
               "data=llava665k", f"data.json_path={json_path}", f"data.image_dir={image_dir}", "data.fraction=1.0",
               "data.val_fraction=0.25", f"validate.folds={min(5, max(2, args.samples * 3 // 4))}",  # <= train rows
               f"labels.max_new_tokens={args.max_new_tokens}",
               f"labels.batch_size={args.batch_size}", f"labels.reference={args.reference}", f"cache_dir={cache}",
               f"hydra.run.dir={run_dir}"]
    result = run_process(command, work / f"train-{tag}.log")
    stages = {}
    for name, seconds, peak in STAGE_LINE.findall(Path(result["log"]).read_text()):
        stages[name] = {"wall_s": float(seconds), "peak_rss_gib_so_far": float(peak)}
    result["stages"] = stages
    result["load_and_startup_s"] = result["wall_s"] - sum(s["wall_s"] for s in stages.values())
    result["validate"] = {k: v for k, v in json.loads((run_dir / "validate.json").read_text()).items()
                          if k in ("split", "agreement", "accuracy", "full_accuracy", "flops_saved", "mean_exit_layer")}
    shards = [shard for store in cache.iterdir() for shard in store.glob("shard-*")]
    n_rows = sum(len(datasets.load_from_disk(str(shard))) for shard in shards)
    cache_bytes = sum(path.stat().st_size for path in cache.rglob("*") if path.is_file())
    result["label_cache"] = {"bytes": cache_bytes, "rows": n_rows, "shards": len(shards),
                             "bytes_per_sample": cache_bytes / n_rows,
                             "projected_bytes_6650_samples": cache_bytes / n_rows * PAPER_SUBSET,
                             "projected_bytes_all_665k": cache_bytes / n_rows * LLAVA_665K_SAMPLES}
    result["heads_dir"] = str(run_dir / "heads")
    return result


def infer(folder: Path, work: Path, image: Path, question: str, heads: str, args, tag: str) -> dict:
    command = [sys.executable, "infer.py", *model_overrides(folder, args), f"image={image}",
               f"question={question}", f"heads={heads}", f"max_new_tokens={args.max_new_tokens}",
               f"hydra.run.dir={work / f'infer-{tag}'}"]
    result = run_process(command, work / f"infer-{tag}.log")
    text = Path(result["log"]).read_text()
    result["output"] = json.loads(text[text.index('{\n  "answer"') : text.index("\n}", text.index('{\n  "answer"')) + 2])
    return result


def exit_ratio(folder: Path, image: Path, question: str, args) -> dict:
    """Prefill time with exit at L/2 against the full model, one sample, beside the FLOPs and KV the engine
    predicts."""
    model, processor = load_model(folder, args)
    engine = VisualExit(model)
    inputs = processor(images=[Image.open(image).convert("RGB")], text=[chat_prompt(processor, question, images=1)],
                       return_tensors="pt")
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=inputs.pop("pixel_values").to(model.dtype),
                                                 return_dict=True)
    inputs["mm_encoder_outputs"] = {"image": encoded}
    L, k = engine.num_layers, engine.num_layers // 2
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = int(inputs["attention_mask"].sum()) - n_visual
    kv = {}

    def prefill(name, exit_layer):
        kv[name] = engine.prefill(**inputs, exit_layer=exit_layer).cache.nbytes()

    times = _interleaved({"full": lambda: prefill("full", L), f"exit_{k}": lambda: prefill(f"exit_{k}", k)},
                         repeats=args.repeats, warmup=1)
    bytes_per_value = torch.finfo(model.dtype).bits // 8
    predicted_flops = flops.prefill_flops(model.config, n_text, n_visual, k) / flops.prefill_flops(
        model.config, n_text, n_visual, L)
    ratio = _ratio_stats(times[f"exit_{k}"], times["full"])
    return {
        "n_text": n_text, "n_visual": n_visual, "num_layers": L, "exit_layer": k, "repeats": args.repeats,
        "full_s": times["full"], f"exit_{k}_s": times[f"exit_{k}"],
        "time_ratio_exit_over_full": ratio, "flops_ratio_exit_over_full": predicted_flops,
        "time_ratio_over_flops_ratio": ratio["median"] / predicted_flops,
        "kv_bytes": {"full": kv["full"], f"exit_{k}": kv[f"exit_{k}"],
                     "predicted_full": flops.kv_cache_bytes(model.config, n_text, n_visual, L, bytes_per_value),
                     f"predicted_exit_{k}": flops.kv_cache_bytes(model.config, n_text, n_visual, k, bytes_per_value)},
    }


def greedy_vs_teacher_forced(folder: Path, records: list[dict], image_dir: Path, args) -> list[list[dict]]:
    """Per answer position of the first 3 samples' greedy answers A (cached decoding, `labels.max_new_tokens`
    tokens): the full model's teacher-forced argmax over prompt + A, and the logit gaps (max - A's token, top 1 -
    top 2). The label pass counts A as reproduced only where they agree."""
    from dyvte.engine import generation_eos_ids, greedy_answers

    model, processor = load_model(folder, args)
    engine = VisualExit(model)
    positions = []
    for record in records[:3]:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        inputs = processor(images=[Image.open(image_dir / record["image"]).convert("RGB")],
                           text=[chat_prompt(processor, question, images=1)], return_tensors="pt")
        answer = greedy_answers(engine, inputs, args.max_new_tokens, generation_eos_ids(model, processor.tokenizer))[0]
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
        logits = engine(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=inputs["pixel_values"]).logits[0].float()
        start = inputs["input_ids"].shape[1] - 1
        rows = []
        for offset, token in enumerate(answer):
            row = logits[start + offset]
            top = row.topk(2)
            rows.append({"target": token, "argmax": int(top.indices[0]),
                         "target_logit_gap": float(top.values[0] - row[token]),
                         "top1_top2_gap": float(top.values[0] - top.values[1]), "max_abs_logit": float(row.abs().max())})
        positions.append(rows)
    return positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reference", default="model", help="labels.reference: model (greedy answer, the default) "
                        "or ground_truth (the dataset answer: no generation, one dense pass per sample)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", default="train,infer,ratio", help="any of train, infer, ratio, margins")
    parser.add_argument("--folder", type=Path, default=None,
                        help="the model folder (default: the LLaVA-1.5-7B one, built if missing)")
    parser.add_argument("--work", type=Path, default=Path(".cache/llava7b-benchmark"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llava7b.json")
    args = parser.parse_args()
    tag = args.quantization or args.dtype
    folder = args.folder or build(default_folder())
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path, image_dir = llava_665k(work / "data", args.samples)
    records = json.loads(json_path.read_text())
    image, question = image_dir / records[0]["image"], records[0]["conversations"][0]["value"].replace("<image>", "")
    question = question.strip()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    entry = results.setdefault(tag, {})  # one entry per precision; each step run replaces its own record
    entry.update(folder=str(folder), samples=args.samples, max_new_tokens=args.max_new_tokens,
                 batch_size=args.batch_size, reference=args.reference,
                 environment=environment(torch.get_num_threads()))
    command = " ".join(["python -m benchmarks.llava7b", *sys.argv[1:]])

    def save():
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    steps = args.steps.split(",")
    if "train" in steps:
        entry["train"] = {"benchmark_command": command, **train(folder, work, json_path, image_dir, args, tag)}
        save()
    if "infer" in steps:
        heads = str(work / f"train-{tag}" / "heads")
        entry["infer"] = {"benchmark_command": command, **infer(folder, work, image, question, heads, args, tag)}
        save()
    if "margins" in steps:
        entry["greedy_vs_teacher_forced"] = {"benchmark_command": command,
                                             "positions": greedy_vs_teacher_forced(folder, records, image_dir, args)}
        save()
    if "ratio" in steps:
        entry["exit_ratio"] = {"benchmark_command": command, **exit_ratio(folder, image, question, args)}
        save()
    print(json.dumps(entry, indent=2, default=str))


if __name__ == "__main__":
    main()
