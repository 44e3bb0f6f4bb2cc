"""`python -m benchmarks.gpu [--smoke] [--out DIR] [--budget-minutes M]`: visual-token exit on a GPU at full depth.

Full-depth random-weight models at the real shapes of LLaVA-1.5-7B, LLaVA-1.5-13B and Qwen2-VL-7B (bf16, SDPA,
576 visual + 64 text tokens; the vision features are computed once and handed to the engine, so only the language
model is timed; the generation-based measurements pass the pixels, as transformers 5.17's `generate` refuses
precomputed features, and the tiny tower's cost cancels in decode and is negligible in labelling) measure:
  - prefill latency and realized / FLOPs-ideal speed-up for exit k in {0, L/4, L/2, 3L/4, L} at batch 1, 8, 32;
  - a mixed-exit batch (the same k's, cycled over the samples) at batch 8 and 32 against the full batch;
  - decode ms/token and KV-cache bytes at batch 1 and 32;
  - dense-label throughput (labelled (sample, exit layer) pairs per second) against the DyVTE paper's scheme, one
    full generation and one generation with exit per label (7B);
  - exit-head overhead: every head evaluated in one prefill (threshold above 1, nobody exits), 7B;
  - peak GPU memory of each measurement.
Timing uses CUDA events after a warm-up call (which also measures the peak memory); medians over repeats, the
configurations of one measurement interleaved round by round. Every JSON records the GPU, torch and transformers.

Runs with torch, transformers (>=5), lightning and safetensors only: no Hydra, OmegaConf, datasets or Optuna.
`--smoke` runs everything on the CPU at tiny shapes, in bf16 too (a test). Writes prefill.json, decode.json,
labelling.json, head_overhead.json, run.json (environment, plan, targets, what the budget cut) and summary.md into
`--out` (default benchmarks/results/gpu), rewritten after every step, so a run cut short keeps what it measured.
"""

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dyvte.engine import VisualExit
from dyvte.evaluation.tables import markdown_table
from dyvte.flops import kv_cache_bytes, prefill_flops
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import DynamicExit
from dyvte.training.dense_labels import LabelConfig, candidate_exits, dense_labels

from . import sections
from .common import PAD, Shape, build_inputs, build_model, environment, summarize

ROOT = Path(__file__).resolve().parent.parent
FILES = ("prefill", "decode", "labelling", "head_overhead")

LLAVA_7B = Shape("llava-1.5-7b", "llava", 4096, 11008, 32, 32, 32064, num_layers=32, full_depth=32, dtype="bfloat16")
LLAVA_13B = Shape("llava-1.5-13b", "llava", 5120, 13824, 40, 40, 32064, num_layers=40, full_depth=40, dtype="bfloat16")
QWEN2VL_7B = Shape("qwen2-vl-7b", "qwen2_vl", 3584, 18944, 28, 4, 152064, num_layers=28, full_depth=28,
                   dtype="bfloat16")
SMOKE_LLAVA = Shape("smoke llava", "llava", 64, 172, 4, 4, 512, num_layers=4, full_depth=4, n_visual=36, n_text=16,
                    dtype="bfloat16")
SMOKE_QWEN = Shape("smoke qwen2-vl", "qwen2_vl", 64, 128, 4, 2, 512, num_layers=4, full_depth=4, n_visual=36,
                   n_text=16, dtype="bfloat16")


def plan(smoke: bool) -> list[tuple[Shape, str, dict]]:
    """Ordered steps `(shape, section, kwargs)`: the 7B figures first (every target is stated at 7B shape), then
    13B and Qwen2-VL-7B (prefill, then decode, each model built once), so a run cut by the budget still holds
    every kind of measurement."""
    if smoke:
        big = SMOKE_LLAVA
        batches, decode_batches, label = (1, 4), (1, 4), dict(batch=2, answer=3, n_text=14)
        repeats, new_tokens = 2, 6
        others = [replace(SMOKE_LLAVA, name="smoke llava, second model", hidden_size=32, intermediate_size=86),
                  SMOKE_QWEN]
    else:
        big = LLAVA_7B
        batches, decode_batches, label = (1, 8, 32), (1, 32), dict(batch=8, answer=8, n_text=60)
        repeats, new_tokens = 5, 16
        others = [LLAVA_13B, QWEN2VL_7B]
    steps = [(big, "prefill", dict(batches=batches, repeats=repeats)),
             (big, "labelling", dict(repeats=max(2, repeats // 2), **label)),
             (big, "decode", dict(batches=decode_batches, repeats=repeats, new_tokens=new_tokens)),
             (big, "head_overhead", dict(batches=batches[:2], repeats=repeats))]
    for shape in others:
        steps.append((shape, "prefill", dict(batches=batches, repeats=repeats)))
        steps.append((shape, "decode", dict(batches=decode_batches, repeats=max(2, repeats // 2),
                                            new_tokens=new_tokens)))
    return steps


# --- measuring ---------------------------------------------------------------------------------------------------
class Device:
    """Timing and memory on one device: CUDA events and the allocator's peak on a GPU, the wall clock on a CPU."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def clock(self, fn) -> float:
        """Seconds of one call of `fn`, measured on the device."""
        if not self.cuda:
            return sections.wall_clock(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def peak_bytes(self, fn) -> int | None:
        """Peak allocated bytes during one (untimed, warm-up) call of `fn`; None on the CPU."""
        if not self.cuda:
            fn()
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def measure(self, fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, int | None]]:
        """Warm-up call of each function (measuring its peak memory), then `repeats` interleaved timed rounds."""
        peaks = {name: self.peak_bytes(fn) for name, fn in fns.items()}
        return sections._interleaved(fns, repeats, warmup=0, clock=self.clock), peaks

    def environment(self) -> dict:
        env = environment(torch.get_num_threads())
        env["device"] = self.device.type
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                       gpu_capability=f"{props.major}.{props.minor}")
        else:
            env.update(gpu=None, gpu_memory_bytes=None, cuda=None, gpu_capability=None)
        return env


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def exits(num_layers: int) -> list[int]:
    """k in {0, L/4, L/2, 3L/4, L}."""
    return [0, *sections.exit_points(num_layers), num_layers]


# --- sections ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def prefill(engine: VisualExit, shape: Shape, device: Device, batches: tuple[int, ...], repeats: int) -> dict:
    """Per batch size: the prefill at every k against the FLOPs ideal and, at batch > 1, a mixed-exit batch (the
    k's cycled over the samples) against the full batch."""
    config, L = engine.model.config, engine.num_layers
    ks = exits(L)
    out = {}
    for batch in batches:
        inputs = build_inputs(engine.model, shape, batch)
        mix = torch.tensor([ks[i % len(ks)] for i in range(batch)], device=device.device)
        fns = {f"exit_{k}": (lambda k=k: engine.prefill(**inputs, exit_layer=k)) for k in ks}
        if batch > 1:
            fns["mixed"] = lambda: engine.prefill(**inputs, exit_layer=mix)
        times, peaks = device.measure(fns, repeats)
        per_sample = {k: prefill_flops(config, shape.n_text, shape.n_visual, k) for k in ks}
        t_full = statistics.median(times[f"exit_{L}"])
        rows = []
        for k in ks:
            t = statistics.median(times[f"exit_{k}"])
            ideal = per_sample[L] / per_sample[k]
            kv = engine.prefill(**inputs, exit_layer=k).cache.nbytes()
            rows.append({
                "exit_layer": k, **summarize(times[f"exit_{k}"]), "lm_flops": batch * per_sample[k],
                "ideal_speedup": ideal, "realized_speedup": t_full / t, "realized_over_ideal": t_full / t / ideal,
                "tokens_per_s": batch * (shape.n_text + shape.n_visual) / t, "peak_memory_bytes": peaks[f"exit_{k}"],
                "kv_cache_bytes": kv,
                "kv_cache_bytes_formula": batch * kv_cache_bytes(config, shape.n_text, shape.n_visual, k,
                                                                 torch.finfo(engine.model.dtype).bits // 8),
            })
        out[f"batch_{batch}"] = {"batch": batch, "n_text": shape.n_text, "n_visual": shape.n_visual,
                                 "num_layers": L, "exits": rows}
        if batch > 1:
            mixed_flops = sum(per_sample[k] for k in mix.tolist())
            t_mixed = statistics.median(times["mixed"])
            ideal = batch * per_sample[L] / mixed_flops
            out[f"batch_{batch}"]["mixed"] = {
                "exit_layers": mix.tolist(), **summarize(times["mixed"]), "lm_flops": mixed_flops,
                "ideal_speedup": ideal, "realized_speedup": t_full / t_mixed,
                "realized_over_ideal": t_full / t_mixed / ideal, "peak_memory_bytes": peaks["mixed"]}
    return out


@torch.no_grad()
def decode(engine: VisualExit, shape: Shape, device: Device, batches: tuple[int, ...], repeats: int,
           new_tokens: int) -> dict:
    """ms per generated token at each k: (time of a `new_tokens + 1`-token greedy generation minus that of a
    1-token one) / `new_tokens`, so the prefill cancels; KV-cache bytes after `new_tokens + 1` tokens."""
    L = engine.num_layers
    ks = exits(L)
    out = {}
    for batch in batches:
        inputs = build_inputs(engine.model, shape, batch, precompute_vision=False)

        def generate(k: int, n: int):
            return engine.generate(**inputs, exit_layer=k, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   return_dict_in_generate=True)

        fns = {}
        for k in ks:
            fns[f"one_{k}"] = lambda k=k: generate(k, 1)
            fns[f"long_{k}"] = lambda k=k: generate(k, new_tokens + 1)
        times, peaks = device.measure(fns, repeats)
        rows = []
        for k in ks:
            per_token = [(a - b) / new_tokens * 1e3 for a, b in zip(times[f"long_{k}"], times[f"one_{k}"])]
            rows.append({"exit_layer": k, "ms_per_token": summarize(per_token) | {"unit": "ms"},
                         "kv_cache_bytes": generate(k, new_tokens + 1).cache.nbytes(),
                         "peak_memory_bytes": peaks[f"long_{k}"]})
        full = rows[-1]["ms_per_token"]["median_s"]
        for row in rows:
            row["speedup_vs_full"] = full / row["ms_per_token"]["median_s"]
            row["kv_ratio_vs_full"] = row["kv_cache_bytes"] / rows[-1]["kv_cache_bytes"]
        out[f"batch_{batch}"] = {"batch": batch, "new_tokens": new_tokens, "by_exit": rows}
    return out


@torch.no_grad()
def labelling(engine: VisualExit, shape: Shape, device: Device, batch: int, answer: int, n_text: int,
              repeats: int) -> dict:
    """Labelled (sample, exit layer) pairs per second: dyvte's dense pass (one reference generation + one
    teacher-forced pass with a text-only branch per exit layer) against the paper's scheme, one full generation
    and one generation with exit per label. The paper's full generation is the same computation for every label
    of a sample, so it is timed once per round and counted `L + 1` times."""
    L = engine.num_layers
    inputs = build_inputs(engine.model, shape, batch, n_text=n_text, seed=1, precompute_vision=False)
    gen = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    candidates = candidate_exits(LabelConfig(layers="all"), [str(i) for i in range(batch)], L)

    def reference():
        return [row.tolist() for row in engine.generate(**inputs, exit_layer=L, **gen)[:, prompt:]]

    answers = reference()
    fns = {"reference": reference,
           "dense": lambda: dense_labels(engine, inputs, answers, candidates, "after_first_visual", PAD)}
    for k in range(L + 1):
        fns[f"exit_{k}"] = lambda k=k: engine.generate(**inputs, exit_layer=k, **gen)
    times, peaks = device.measure(fns, repeats)
    labels = batch * (L + 1)
    dense_s = [r + d for r, d in zip(times["reference"], times["dense"])]
    paper_s = [(L + 1) * times["reference"][i] + sum(times[f"exit_{k}"][i] for k in range(L + 1))
               for i in range(len(dense_s))]
    flops = sections._label_flops(engine.model.config, n_text, shape.n_visual, answer)
    paper_flops = flops["naive"] + (L + 1) * (flops["dense_plus_reference"] - flops["dense"])
    consistent = bool(dense_labels(engine, inputs, answers, candidates, "after_first_visual", PAD).match[:, L].all())
    ratio = statistics.median(paper_s) / statistics.median(dense_s)
    return {f"batch_{batch}": {
        "batch": batch, "answer_tokens": answer, "n_text": n_text, "n_visual": shape.n_visual, "labels": labels,
        "full_branch_reproduces_reference": consistent,
        "dense": {**summarize(dense_s), "labels_per_s": labels / statistics.median(dense_s),
                  "peak_memory_bytes": peaks["dense"]},
        "paper_scheme": {**summarize(paper_s), "labels_per_s": labels / statistics.median(paper_s),
                         "peak_memory_bytes": max(p for name, p in peaks.items() if name.startswith("exit_"))
                         if device.cuda else None},
        "paper_over_dense": ratio,
        "flops": {"dense_plus_reference": flops["dense_plus_reference"], "paper_scheme": paper_flops,
                  "paper_over_dense": paper_flops / flops["dense_plus_reference"]},
    }}


@torch.no_grad()
def head_overhead(engine: VisualExit, shape: Shape, device: Device, batches: tuple[int, ...], repeats: int,
                  head_hidden: int = 2048) -> dict:
    """Prefill with every exit head evaluated (DyVTE's per-layer heads of width `head_hidden`, threshold above 1
    so nobody exits) against the same prefill without heads."""
    L = engine.num_layers
    heads = ExitHeads(ExitHeadsConfig(shape.hidden_size, L, head_hidden)).to(device.device, engine.model.dtype)
    policy = DynamicExit(heads.eval().requires_grad_(False), threshold=2.0, force=True)
    out = {}
    for batch in batches:
        inputs = build_inputs(engine.model, shape, batch)
        fns = {"no_heads": lambda: engine.prefill(**inputs), "heads": lambda: engine.prefill(**inputs, policy=policy)}
        times, peaks = device.measure(fns, repeats)
        assert int(engine.prefill(**inputs, policy=policy).exit_layer.min()) == L, "a head exited above threshold 1"
        t_none, t_heads = statistics.median(times["no_heads"]), statistics.median(times["heads"])
        out[f"batch_{batch}"] = {
            "batch": batch, "head_hidden": head_hidden, "heads_evaluated": L - 1,
            "head_parameters": sum(p.numel() for p in heads.parameters()),
            "no_heads": {**summarize(times["no_heads"]), "peak_memory_bytes": peaks["no_heads"]},
            "heads": {**summarize(times["heads"]), "peak_memory_bytes": peaks["heads"]},
            "overhead_fraction_of_prefill": t_heads / t_none - 1,
            "overhead_in_decoder_layers": (t_heads - t_none) / (t_none / L),
        }
    return out


SECTIONS = {"prefill": prefill, "decode": decode, "labelling": labelling, "head_overhead": head_overhead}


# --- targets and report ------------------------------------------------------------------------------------------
def targets(data: dict) -> list[dict]:
    """The issue's GPU targets on what was measured: prefill >= 0.9 x ideal at batch >= 8 for every k < L, mixed
    batch >= 0.85, dense labels >= 15x cheaper per pair than the paper's scheme at 7B shape."""
    out = []
    for model, entry in data["prefill"].items():
        for res in entry["results"].values():
            if res["batch"] < 8:
                continue
            for row in res["exits"][:-1]:
                out.append({"target": "prefill realized/ideal >= 0.9 (batch >= 8)", "model": model,
                            "batch": res["batch"], "exit_layer": row["exit_layer"],
                            "value": row["realized_over_ideal"], "holds": row["realized_over_ideal"] >= 0.9})
            out.append({"target": "mixed batch realized/ideal >= 0.85", "model": model, "batch": res["batch"],
                        "value": res["mixed"]["realized_over_ideal"],
                        "holds": res["mixed"]["realized_over_ideal"] >= 0.85})
    for model, entry in data["labelling"].items():
        for res in entry["results"].values():
            out.append({"target": "dense labels >= 15x cheaper per pair than the paper's scheme", "model": model,
                        "batch": res["batch"], "value": res["paper_over_dense"],
                        "holds": res["paper_over_dense"] >= 15})
    return out


def _gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:.1f}"


def summary(env: dict, settings: dict, data: dict, run: dict) -> str:
    gpu = env["gpu"] or f"CPU ({env['cpu_model']})"
    lines = ["# dyvte GPU benchmark", "",
             f"{env['time_utc']}, {gpu}, torch {env['torch']}, transformers {env['transformers']}, "
             f"{'smoke run (tiny shapes, CPU)' if settings['smoke'] else 'bf16, SDPA, random weights'}; "
             f"{run['elapsed_s']:.0f} s. Command: `{settings['command']}`.", ""]
    rows = []
    for model, entry in data["prefill"].items():
        for res in entry["results"].values():
            cells = [f"{r['realized_speedup']:.2f} / {r['ideal_speedup']:.2f}" for r in res["exits"][:-1]]
            mixed = f"{res['mixed']['realized_over_ideal']:.2f}" if "mixed" in res else "—"
            rows.append([model, res["batch"], f"{res['exits'][-1]['median_s'] * 1e3:.1f}", *cells, mixed,
                         _gib(res["exits"][-1]["peak_memory_bytes"])])
    if rows:
        lines += ["## Prefill: realized / FLOPs-ideal speed-up", "",
                  "Realized / ideal speed-up over the full prefill at k = 0, L/4, L/2, 3L/4 (L = 32 at 7B, 40 at "
                  "13B, 28 at Qwen2-VL-7B); mixed: realized / ideal of a batch whose samples cycle through "
                  "k = 0, L/4, L/2, 3L/4, L.", "",
                  markdown_table(["model", "batch", "full prefill ms", "k=0", "k=L/4", "k=L/2", "k=3L/4",
                                  "mixed realized/ideal", "peak GiB"], rows), ""]
    rows = []
    for model, entry in data["decode"].items():
        for res in entry["results"].values():
            for r in res["by_exit"]:
                rows.append([model, res["batch"], r["exit_layer"], f"{r['ms_per_token']['median_s']:.2f}",
                             f"{r['speedup_vs_full']:.2f}", f"{r['kv_cache_bytes'] / 2**20:.0f}",
                             f"{r['kv_ratio_vs_full']:.3f}", _gib(r["peak_memory_bytes"])])
    if rows:
        lines += ["## Decode", "", markdown_table(["model", "batch", "k", "ms/token", "speed-up vs full", "KV MiB",
                                                   "KV vs full", "peak GiB"], rows), ""]
    rows = []
    for model, entry in data["labelling"].items():
        for res in entry["results"].values():
            rows.append([model, res["batch"], f"{res['dense']['labels_per_s']:.1f}",
                         f"{res['paper_scheme']['labels_per_s']:.1f}", f"{res['paper_over_dense']:.1f}",
                         f"{res['flops']['paper_over_dense']:.1f}", _gib(res["dense"]["peak_memory_bytes"])])
    if rows:
        lines += ["## Dense labels vs the paper's scheme (labelled (sample, layer) pairs per second)", "",
                  markdown_table(["model", "batch", "dense pairs/s", "paper pairs/s", "measured ratio",
                                  "FLOPs ratio", "peak GiB"], rows), ""]
    rows = []
    for model, entry in data["head_overhead"].items():
        for res in entry["results"].values():
            rows.append([model, res["batch"], res["heads_evaluated"], f"{res['overhead_fraction_of_prefill']:.2%}",
                         f"{res['overhead_in_decoder_layers']:.2f}", _gib(res["heads"]["peak_memory_bytes"])])
    if rows:
        lines += ["## Exit-head overhead (every head evaluated, h = 2048)", "",
                  markdown_table(["model", "batch", "heads", "of the prefill", "in decoder layers", "peak GiB"], rows),
                  ""]
    lines += ["## Targets", "", markdown_table(
        ["target", "model", "batch", "k", "value", "holds"],
        [[t["target"], t["model"], t["batch"], t.get("exit_layer", "—"), f"{t['value']:.3f}", t["holds"]]
         for t in run["targets"]]), ""]
    if settings["not_run"]:
        lines += ["Not run (over the time budget): " + "; ".join(settings["not_run"]), ""]
    return "\n".join(lines)


class Results:
    """Every measurement of a run, written after every step (a run cut at its time limit keeps what it has)."""

    def __init__(self, out: Path, env: dict, settings: dict):
        self.out, self.env, self.settings = out, env, settings
        self.data = {name: {} for name in FILES}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, shape: Shape, results: dict, extra: dict) -> None:
        self.data[section][shape.name] = {"shape": shape.record(), **extra, "results": results}
        self.write()

    def write(self, finished: bool = False) -> dict:
        for name in FILES:
            payload = {"env": self.env, "settings": self.settings, "results": self.data[name]}
            (self.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
        run = {"env": self.env, "settings": self.settings, "finished": finished,
               "elapsed_s": time.perf_counter() - self.settings["start"], "targets": targets(self.data)}
        (self.out / "run.json").write_text(json.dumps(run, indent=1))
        (self.out / "summary.md").write_text(summary(self.env, self.settings, self.data, run))
        return run


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script end to end")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/gpu; with --smoke a temporary folder)")
    parser.add_argument("--budget-minutes", type=float, default=7.0,
                        help="start no step (and no further repeat round) after this many minutes (default 7)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --smoke)")
    args = parser.parse_args(argv)
    device = Device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (use --smoke for the CPU check).")
    out = args.out or (Path(tempfile.mkdtemp(prefix="dyvte-gpu-smoke-")) if args.smoke
                       else ROOT / "benchmarks" / "results" / "gpu")
    torch.manual_seed(0)
    start = time.perf_counter()
    sections.DEADLINE = start + 60 * args.budget_minutes
    steps = plan(args.smoke)
    settings = {"smoke": args.smoke, "budget_minutes": args.budget_minutes, "start": start,
                "command": "python -m benchmarks.gpu" + (" --smoke" if args.smoke else ""),
                "timing": "language model only (vision features precomputed); CUDA events (wall clock on the CPU) "
                          "after one warm-up call that also measures peak memory; medians over interleaved rounds",
                "plan": [[shape.name, name, kw] for shape, name, kw in steps], "not_run": []}
    results = Results(out, device.environment(), settings)
    engine, built = None, None
    for shape, name, kw in steps:
        if time.perf_counter() > sections.DEADLINE:
            settings["not_run"].append(f"{shape.name} {name}")
            print(f"[gpu] over the budget: not running {shape.name} {name}", flush=True)
            continue
        if built != shape.name:
            engine = None
            gc.collect()
            if device.cuda:
                torch.cuda.empty_cache()
            began = time.perf_counter()
            engine = VisualExit(build_model(shape, device=device.device))
            built = shape.name
            print(f"[gpu] built {shape.name} ({shape.num_layers} layers, {model_bytes(engine.model) / 2**30:.1f} GiB)"
                  f" in {time.perf_counter() - began:.1f}s", flush=True)
        began = time.perf_counter()
        measured = SECTIONS[name](engine, shape, device, **kw)
        results.put(name, shape, measured, {"model_bytes": model_bytes(engine.model)})
        print(f"[gpu] {shape.name} {name}: {time.perf_counter() - began:.1f}s", flush=True)
    run = results.write(finished=True)
    print((out / "summary.md").read_text(), flush=True)
    print(f"[gpu] wrote {out} in {run['elapsed_s']:.0f}s", flush=True)
    return out


if __name__ == "__main__":
    main()
