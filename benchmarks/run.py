"""`python -m benchmarks.run [--quick] [--out DIR]`: speed of visual-token exit vs the FLOPs ideal on this CPU.

Writes one JSON per measurement (prefill, mixed_batch, decode, head_overhead, labelling, head_training), `run.json`
(environment, plan, targets) and `summary.md` into `benchmarks/results/` (or `--out`). Files are rewritten after
every section, so an interrupted run keeps what it measured. `--quick` uses tiny shapes (a smoke test, < 1 min).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dyvte.engine import VisualExit

from . import sections
from .common import LLAVA_7B, QUICK_LLAVA, QUICK_QWEN, QWEN2VL_2B, Shape, build_model, environment, free, other_load
from .summary import targets, write_summary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HEADS = OmegaConf.load(ROOT / "conf" / "head_training" / "dyvte.yaml")  # train.py's default heads
FILES = ("prefill", "mixed_batch", "decode", "head_overhead", "labelling", "head_training")


def plan(quick: bool) -> dict:
    """Ordered steps `(shape, section, kwargs)`: most informative per second first, the costliest last, so a run
    cut short by `--budget-minutes` still holds every kind of figure."""
    if quick:
        q, l = QUICK_QWEN, QUICK_LLAVA
        steps = [
            (q, "prefill", dict(batch=1, repeats=3, warmup=1)),
            (q, "prefill", dict(batch=8, repeats=3, warmup=1, mixed=True)),
            (q, "decode", dict(repeats=3, warmup=1, new_tokens=8)),
            (l, "prefill", dict(batch=1, repeats=3, warmup=1)),
            (l, "head_overhead", dict(repeats=3, warmup=1)),
            (l, "decode", dict(repeats=3, warmup=1, new_tokens=8)),
            (l, "labelling", dict(repeats=3, warmup=1, n_text=14, answer=4)),
            (None, "head_training", dict(hidden_size=l.hidden_size, num_layers=4, samples=256, repeats=3,
                                         full_depth=l.full_depth)),
            (l, "prefill", dict(batch=8, repeats=3, warmup=1, mixed=True)),
        ]
        return {"steps": steps}
    q, l = QWEN2VL_2B, LLAVA_7B
    # Batch-8 runs need no warm-up round of their own: the same model and per-sample shapes ran at batch 1 first.
    steps = [
        (q, "prefill", dict(batch=1, repeats=5, warmup=1)),
        (q, "decode", dict(repeats=3, warmup=0)),
        (l, "prefill", dict(batch=1, repeats=3, warmup=1)),
        (l, "head_overhead", dict(repeats=3, warmup=0)),
        (l, "head_overhead", dict(repeats=3, warmup=0, head_hidden=256)),
        (l, "head_overhead", dict(repeats=3, warmup=0, head_hidden=DEFAULT_HEADS.hidden,
                                  head_inputs=tuple(DEFAULT_HEADS.inputs))),
        (l, "decode", dict(repeats=3, warmup=0, exits=[2])),
        (l, "labelling", dict(repeats=3, warmup=0, n_text=60, answer=8)),
        (None, "head_training", dict(hidden_size=l.hidden_size, num_layers=l.num_layers, samples=1024, repeats=3,
                                     full_depth=l.full_depth)),
        (None, "testbed_labelling", {}),
        (q, "prefill", dict(batch=8, repeats=3, warmup=0, mixed=True)),
        (l, "prefill", dict(batch=8, repeats=3, warmup=0)),
        (l, "head_overhead", dict(repeats=2, warmup=0, batch=8)),
    ]
    return {"steps": steps}


class Results:
    """Every measurement of a run; with `update`, the entries already in `out` stay unless re-measured."""

    def __init__(self, out: Path, env: dict, settings: dict, update: bool = False):
        self.out, self.env, self.settings = out, env, settings
        self.data = {name: {} for name in FILES}
        if update:
            for name in FILES:
                if (out / f"{name}.json").exists():
                    self.data[name] = json.loads((out / f"{name}.json").read_text())["results"]
        out.mkdir(parents=True, exist_ok=True)

    def put(self, file: str, model: str, key: str, value: dict, shape: dict | None = None) -> None:
        entry = self.data[file].setdefault(model, {})
        if shape is not None:
            entry["shape"] = shape
        entry[key] = {**value, "machine_load_after": other_load(),
                      "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write()

    def write(self, finished: bool = False) -> None:
        for name in FILES:
            payload = {"env": self.env, "settings": self.settings, "results": self.data[name]}
            (self.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=float))
        run = {"env": self.env, "settings": self.settings, "finished": finished,
               "elapsed_s": time.perf_counter() - self.settings["_start"], "machine_load_now": other_load(),
               "targets": targets(self.data)}
        (self.out / "run.json").write_text(json.dumps(run, indent=1, default=float))
        write_summary(self.out / "summary.md", self.env, self.settings, self.data, run)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test in under a minute")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default 2; 1 with --quick; use 1 when the CPU is shared)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop starting new sections (and new repeat rounds, once one is done) after this long")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to skip: " + ", ".join(FILES))
    parser.add_argument("--update", action="store_true",
                        help="keep the results already in --out and replace only what this run measures")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = plan(args.quick)
    begin = time.perf_counter()
    sections.DEADLINE = begin + 60 * args.budget_minutes if args.budget_minutes else None
    settings = {"quick": args.quick, "threads": args.threads, "skip": args.skip, "update": args.update,
                "_start": begin,
                "budget_minutes": args.budget_minutes,
                "timing": "LM only: vision features precomputed and passed as mm_encoder_outputs; wall clock "
                          "(time.perf_counter); medians over repeats after warm-up; full and exit runs interleaved "
                          "round-robin",
                "plan": [(shape.name if shape else None, name, kw) for shape, name, kw in steps["steps"]],
                "not_run": []}
    results = Results(args.out, environment(args.threads), settings, args.update)
    engines: dict[str, VisualExit] = {}
    round_b1: dict[str, float] = {}  # seconds of one batch-1 prefill round per model (for the budget)
    for shape, name, kw in steps["steps"]:
        wanted = {"testbed_labelling": "labelling"}.get(name, name) if not kw.get("mixed") else ("prefill", "mixed_batch")
        if (wanted in args.skip) if isinstance(wanted, str) else all(w in args.skip for w in wanted):
            continue
        if sections.DEADLINE is not None:
            # one round at batch B (a prefill, or the prefill under the heads) costs about B times the
            # batch-1 prefill round of the same model
            estimate = 0.0
            if kw.get("batch", 1) > 1 and shape.name in round_b1:
                estimate = kw["batch"] * round_b1[shape.name] * (1.5 if kw.get("mixed") else 1.0)
            if time.perf_counter() + estimate > sections.DEADLINE:
                settings["not_run"].append([shape.name if shape else None, name, kw,
                                            f"over --budget-minutes (one round estimated {estimate:.0f} s)"])
                print(f"[benchmarks] over budget, not running {name} {kw}", flush=True)
                continue
        started = time.perf_counter()
        if name == "testbed_labelling":
            print("[benchmarks] labelling on the testbed model", flush=True)
            try:
                testbed_labelling(results)
            except Exception as error:  # e.g. a checkpoint being rewritten by a running pre-training
                results.put("labelling", "testbed", "skipped", {"reason": f"{type(error).__name__}: {error}"})
        elif name == "head_training":
            print(f"[benchmarks] head training {kw}", flush=True)
            results.put("head_training", f"hidden {kw['hidden_size']}", "fit", sections.head_training(**kw))
        else:
            if shape.name not in engines:
                print(f"[benchmarks] building {shape.name} ({shape.num_layers} layers)", flush=True)
                engines[shape.name] = VisualExit(build_model(shape))
            print(f"[benchmarks] {shape.name}: {name} {kw}", flush=True)
            run_section(results, engines[shape.name], shape, shape.record(), name, dict(kw))
            if name == "prefill" and kw["batch"] == 1:
                res = results.data["prefill"].get(shape.name, {}).get("batch_1")
                if res:
                    round_b1[shape.name] = res["full"]["median_s"] + sum(e["median_s"] for e in res["exits"])
        print(f"[benchmarks]   done in {time.perf_counter() - started:.1f}s", flush=True)
    engines.clear()
    free()
    results.write(finished=True)
    print(f"[benchmarks] wrote {args.out} in {time.perf_counter() - settings['_start']:.0f}s", flush=True)
    return args.out


def testbed_labelling(results: Results) -> None:
    """Labelling cost on the project's testbed model, when it has been built."""
    testbed = sections.load_testbed()
    if testbed is None:
        results.put("labelling", "testbed", "skipped", {"reason": "dyvte/testbed/data/model/config.json not found"})
        return
    model, path = testbed
    text, vision = model.config.text_config, model.config.vision_config
    n_visual = (vision.image_size // vision.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")
    shape = Shape("testbed", "llava", text.hidden_size, text.intermediate_size, text.num_attention_heads,
                  text.num_key_value_heads, text.vocab_size, text.num_hidden_layers, text.num_hidden_layers,
                  n_visual=n_visual, n_text=60)
    results.put("labelling", "testbed", "batch_1",
                sections.labelling(VisualExit(model), shape, repeats=5, warmup=1, n_text=60, answer=8),
                shape={**shape.record(), "path": str(path)})


def run_section(results: Results, engine, shape: Shape, record: dict, name: str, kw: dict) -> None:
    if name == "prefill":
        out = sections.prefill(engine, shape, **kw)
        mixed = out.pop("mixed", None)
        if "prefill" not in results.settings["skip"]:
            results.put("prefill", shape.name, f"batch_{kw['batch']}", out, record)
        if mixed is not None:
            results.put("mixed_batch", shape.name, f"batch_{kw['batch']}",
                        {**mixed, "full": out["full"], "n_text": out["n_text"], "n_visual": out["n_visual"]}, record)
    elif name == "decode":
        results.put("decode", shape.name, "batch_1", sections.decode(engine, shape, **kw), record)
    elif name == "head_overhead":
        key = f"batch_{kw.get('batch', 1)}_hidden_{kw.get('head_hidden', 2048)}"
        if "head_inputs" in kw:
            key += "_" + "+".join(kw["head_inputs"])
        results.put("head_overhead", shape.name, key, sections.head_overhead(engine, shape, **kw), record)
    elif name == "labelling":
        results.put("labelling", shape.name, "batch_1", sections.labelling(engine, shape, **kw), record)
    else:
        raise ValueError(name)


if __name__ == "__main__":
    main()
