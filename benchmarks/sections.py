"""The measurements: prefill speed-up vs the FLOPs ideal, mixed-exit batches, decode, exit-head overhead,
dense vs naive labelling, and head-training throughput. Each returns a JSON-ready dict."""

import copy
import statistics
import time

import torch

from dyvte.engine import VisualExit
from dyvte.flops import DecoderShape, decode_step_flops, kv_cache_bytes, layer_flops, lm_head_flops, prefill_flops
from dyvte.heads import PAPER_INPUTS, ExitHeads, ExitHeadsConfig
from dyvte.policies import DynamicExit
from dyvte.testbed import MODEL_DIR as TESTBED_MODEL_DIR
from dyvte.training.dense_labels import LabelConfig, candidate_exits, dense_labels

from .common import Shape, build_inputs, select_rows, summarize


def exit_points(num_layers: int) -> list[int]:
    """k in {L/4, L/2, 3L/4}."""
    return sorted({max(1, num_layers // 4), num_layers // 2, (3 * num_layers) // 4})


def _prefill(engine: VisualExit, inputs: dict, exit_layer, policy=None):
    return engine.prefill(**inputs, exit_layer=exit_layer, policy=policy)


#: wall-clock time (time.perf_counter) after which repeated rounds stop early (set by `run.py --budget-minutes`)
DEADLINE: float | None = None


def wall_clock(fn) -> float:
    """Seconds one call of `fn` takes on the host (CPU work is synchronous)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(fns: dict, repeats: int, warmup: int, clock=wall_clock) -> dict[str, list[float]]:
    """Run every function once per round (round-robin, so slow drifts of a shared machine hit all alike), timing
    each call with `clock(fn) -> seconds`.

    Once a round has completed, no new round starts that would end past `DEADLINE` (the result then has fewer
    than `repeats` runs: see each entry's `n`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for round_ in range(repeats):
        if round_ and DEADLINE is not None:
            last_round = sum(t[-1] for t in times.values())
            if time.perf_counter() + last_round > DEADLINE:
                break
        for name, fn in fns.items():
            times[name].append(clock(fn))
    return times


class LayerClock:
    """Forward hooks on the decoder layers: wall time of each layer call and its token count, to split a prefill
    into full-length layer calls, text-only layer calls and everything else (embedding, sub-batch moves, cache
    gathering, lm_head)."""

    def __init__(self, layers):
        self.calls: list[tuple[int, int, float]] = []  # (rows, tokens, seconds)
        self._start = 0.0
        self.handles = []
        for layer in layers:
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        hidden = args[0]
        self.calls.append((hidden.shape[0], hidden.shape[1], time.perf_counter() - self._start))

    def split(self, total: float, n_text: int) -> dict:
        visual = sum(t for _, n, t in self.calls if n > n_text)
        text = sum(t for _, n, t in self.calls if n <= n_text)
        return {"layers_with_visual_s": visual, "layers_text_only_s": text, "other_s": total - visual - text,
                "layer_calls": len(self.calls)}

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _clocked(engine: VisualExit, fn, n_text: int, splits: list):
    """`fn` wrapped so each call appends its time split (see LayerClock) to `splits`."""
    def run():
        clock = LayerClock(engine.adapter.layers)
        start = time.perf_counter()
        try:
            fn()
        finally:
            total = time.perf_counter() - start
            clock.remove()
        splits.append(clock.split(total, n_text))
    return run


def _median_split(splits: list[dict], skip: int) -> dict:
    kept = splits[skip:] or splits
    return {key: statistics.median(s[key] for s in kept) for key in kept[0]}


def _ratio_stats(numerator: list[float], denominator: list[float]) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# --- 1 + 2: prefill, and a batch of mixed exits ----------------------------------------------------------------
def prefill(engine: VisualExit, shape: Shape, batch: int, repeats: int, warmup: int, mixed: bool = False) -> dict:
    """Wall time of the LM prefill (vision features precomputed) for the full model and exit at L/4, L/2, 3L/4;
    with `mixed`, also a batch whose samples exit at those layers and L, and the same samples one by one."""
    config = engine.model.config
    L = engine.num_layers
    inputs = build_inputs(engine.model, shape, batch)
    n_text, n_visual = shape.n_text, shape.n_visual
    ks = exit_points(L)
    splits = {name: [] for name in ["full"] + [f"exit_{k}" for k in ks]}
    kv_bytes: dict[str, int] = {}  # KV-cache bytes left by each configuration's (last) timed prefill

    def prefill_keeping_kv(name: str, k: int):
        kv_bytes[name] = _prefill(engine, inputs, k).cache.nbytes()

    fns = {"full": _clocked(engine, lambda: prefill_keeping_kv("full", L), n_text, splits["full"])}
    for k in ks:
        fns[f"exit_{k}"] = _clocked(engine, lambda k=k: prefill_keeping_kv(f"exit_{k}", k), n_text,
                                    splits[f"exit_{k}"])
    mix = [(ks + [L])[i % (len(ks) + 1)] for i in range(batch)]
    if mixed:
        mix_tensor = torch.tensor(mix)
        singles = [select_rows(inputs, [i]) for i in range(batch)]
        fns["mixed"] = lambda: _prefill(engine, inputs, mix_tensor)
        fns["mixed_one_by_one"] = lambda: [_prefill(engine, s, mix[i]) for i, s in enumerate(singles)]
    times = _interleaved(fns, repeats, warmup)

    full_flops = batch * prefill_flops(config, n_text, n_visual, L)
    split = {name: _median_split(v, warmup) for name, v in splits.items()}
    n_full = n_text + n_visual
    # one layer's time at each length (from the full run and the exit runs) and the GEMM rate it achieves
    t_full_layer = split["full"]["layers_with_visual_s"] / L
    t_text_layer = statistics.median(split[f"exit_{k}"]["layers_text_only_s"] / (L - k) for k in ks)
    f_full_layer = batch * layer_flops(config, n_full, n_full * (n_full + 1) // 2)
    f_text_layer = batch * layer_flops(config, n_text, n_text * (n_text + 1) // 2)
    out = {"batch": batch, "n_text": n_text, "n_visual": n_visual, "num_layers": L,
           "layer_diagnostics": {
               "full_length_layer_s": t_full_layer, "text_only_layer_s": t_text_layer,
               "full_length_layer_gflops_per_s": f_full_layer / t_full_layer / 1e9,
               "text_only_layer_gflops_per_s": f_text_layer / t_text_layer / 1e9,
               "time_ratio_text_over_full_layer": t_text_layer / t_full_layer,
               "flops_ratio_text_over_full_layer": f_text_layer / f_full_layer,
               "other_s_full": split["full"]["other_s"]},
           "full": {**summarize(times["full"]), "lm_flops": full_flops, "split": split["full"],
        "kv_cache_bytes": kv_bytes["full"]}, "exits": []}
    bpv = torch.finfo(getattr(torch, shape.dtype)).bits // 8
    full_kv_formula = batch * kv_cache_bytes(config, n_text, n_visual, L, bpv)
    for k in ks:
        flops = batch * prefill_flops(config, n_text, n_visual, k)
        ideal = full_flops / flops
        realized = _ratio_stats(times["full"], times[f"exit_{k}"])
        realized["of_medians"] = statistics.median(times["full"]) / statistics.median(times[f"exit_{k}"])
        kv = kv_bytes[f"exit_{k}"]
        out["exits"].append({
            "exit_layer": k, **summarize(times[f"exit_{k}"]), "lm_flops": flops, "ideal_speedup": ideal,
            "realized_speedup": realized, "realized_over_ideal": realized["of_medians"] / ideal,
            "realized_over_ideal_min": realized["min"] / ideal, "target_0.9_holds": realized["of_medians"] / ideal >= 0.9,
            "kv_cache_bytes": kv, "kv_ratio_vs_full": kv / out["full"]["kv_cache_bytes"], "split": split[f"exit_{k}"],
            # what the exit run would take if its layers cost what they cost in isolation and the engine added
            # nothing beyond the full run's non-layer time: realized below this = engine overhead
            "speedup_predicted_from_layer_times": statistics.median(times["full"]) / (
                split["full"]["other_s"] + k * t_full_layer + (L - k) * t_text_layer),
            "extra_non_layer_s_vs_full": split[f"exit_{k}"]["other_s"] - split["full"]["other_s"],
            "kv_ratio_expected": batch * kv_cache_bytes(config, n_text, n_visual, k, bpv) / full_kv_formula,
        })
    if mixed:
        mix_flops = sum(prefill_flops(config, n_text, n_visual, k) for k in mix)
        ideal = full_flops / mix_flops
        t_full, t_mixed, t_single = (statistics.median(times[n]) for n in ("full", "mixed", "mixed_one_by_one"))
        out["mixed"] = {
            "exit_layers": mix, "lm_flops": mix_flops, "ideal_speedup": ideal,
            "batched": {**summarize(times["mixed"]), "samples_per_s": batch / t_mixed},
            "one_by_one": {**summarize(times["mixed_one_by_one"]), "samples_per_s": batch / t_single},
            "full_batch_samples_per_s": batch / t_full,
            "ideal_samples_per_s": batch / t_full * ideal,
            "realized_speedup": _ratio_stats(times["full"], times["mixed"]),
            "realized_over_ideal": t_full / t_mixed / ideal,
            "one_by_one_over_ideal": t_full / t_single / ideal,
            "target_0.85_holds": t_full / t_mixed / ideal >= 0.85,
        }
    return out


# --- 3: decode -------------------------------------------------------------------------------------------------
def decode(engine: VisualExit, shape: Shape, repeats: int, warmup: int = 0, new_tokens: int = 32, batch: int = 1,
           exits: list[int] | None = None) -> dict:
    """ms per generated token and KV-cache bytes after `new_tokens` tokens, full model vs exit.

    After an untimed 4-token warm-up generation: per exit layer, one `engine.generate(..., min_new_tokens=
    new_tokens)` whose `decode_step` calls are timed (the first run) and whose cache is copied just before its first
    step; further runs replay the same greedy decode steps from a copy of that cache (the same `decode_step` calls,
    without paying the prefill again); `warmup` extra untimed replays per exit layer."""
    config = engine.model.config
    L = engine.num_layers
    inputs = build_inputs(engine.model, shape, batch)
    ks = [L] + (exit_points(L) if exits is None else list(exits))
    original = engine.decode_step
    step_times: list[float] = []
    first: dict = {}

    def timed_step(tokens, positions, cache):
        if not first:
            first.update(tokens=tokens.clone(), positions=positions.clone(), cache=copy.deepcopy(cache))
        start = time.perf_counter()
        out = original(tokens, positions, cache)
        step_times.append(time.perf_counter() - start)
        return out

    def replay() -> float:
        cache = copy.deepcopy(first["cache"])
        tokens, positions, times = first["tokens"], first["positions"], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            logits = original(tokens, positions, cache)
            times.append(time.perf_counter() - start)
            tokens, positions = logits.argmax(dim=-1), positions + 1
        return sum(times) / len(times)

    per_run = {k: [] for k in ks}
    cache_bytes, generated = {}, {}
    engine.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # untimed warm-up
    engine.decode_step = timed_step  # instance attribute: the generate loop's calls are timed, nothing else changes
    try:
        for k in ks:
            step_times.clear(), first.clear()
            out = engine.generate(**inputs, exit_layer=k, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, return_dict_in_generate=True)
            cache_bytes[k] = out.cache.nbytes()
            generated[k] = out.sequences.shape[1] - inputs["input_ids"].shape[1]
            runs = [sum(step_times) / len(step_times)]
            for _ in range(warmup):
                replay()
            runs += [replay() for _ in range(repeats - 1)]
            per_run[k] = runs
    finally:
        del engine.decode_step
    bpv = torch.finfo(getattr(torch, shape.dtype)).bits // 8
    steps = new_tokens - 1  # the last token is sampled, never fed back
    full_ms = statistics.median(per_run[L]) * 1e3
    full_expected = batch * kv_cache_bytes(config, shape.n_text + steps, shape.n_visual, L, bpv)
    results = {}
    for k in ks:
        ms = [t * 1e3 for t in per_run[k]]
        expected = batch * kv_cache_bytes(config, shape.n_text + steps, shape.n_visual, k, bpv)
        results[str(k)] = {
            "exit_layer": k, "generated_tokens": generated[k], "ms_per_token": summarize(ms) | {"unit": "ms"},
            "step_flops_first": batch * decode_step_flops(config, shape.n_text, shape.n_visual, k, 0),
            "kv_cache_bytes": cache_bytes[k], "kv_cache_bytes_formula": expected,
            "kv_ratio_vs_full": cache_bytes[k] / cache_bytes[L], "kv_ratio_expected": expected / full_expected,
            "speedup_vs_full": full_ms / statistics.median(ms),
        }
    exits_only = [results[str(k)] for k in ks if k != L]
    return {
        "batch": batch, "new_tokens": new_tokens, "min_new_tokens": new_tokens, "by_exit": results,
        "timing": "mean decode_step time per run (prefill excluded); run 1 inside engine.generate, later runs "
                  "replay the same steps from a copy of its cache",
        "target_not_slower_holds": all(r["ms_per_token"]["median_s"] <= full_ms for r in exits_only),
        "not_slower_within_noise": all(r["ms_per_token"]["min_s"] <= max(per_run[L]) * 1e3 for r in exits_only),
        "target_kv_bytes_holds": all(abs(r["kv_ratio_vs_full"] - r["kv_ratio_expected"]) < 0.02
                                     for r in results.values()),
    }


# --- 4: exit-head overhead -------------------------------------------------------------------------------------
def head_overhead(engine: VisualExit, shape: Shape, repeats: int, warmup: int, batch: int = 1,
                  head_hidden: int = 2048, head_inputs: tuple[str, ...] = PAPER_INPUTS) -> dict:
    """Time of every exit-head evaluation in one prefill (threshold above 1: nobody exits, every head runs),
    as a fraction of one decoder layer's time. The time includes computing the heads' features (`head_inputs`:
    the attention status and the logit lens cost more than the text states)."""
    L = engine.num_layers
    inputs = build_inputs(engine.model, shape, batch)
    dtype = getattr(torch, shape.dtype)
    config = ExitHeadsConfig(shape.hidden_size, L, head_hidden, inputs=tuple(head_inputs),
                             num_attention_heads=shape.num_heads)
    heads = ExitHeads(config).to(dtype).eval().requires_grad_(False)
    policy = DynamicExit(heads, threshold=2.0, force=True)
    head_time = []
    original = policy.before_layer

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        head_time[-1] += time.perf_counter() - start
        return out

    policy.before_layer = timed
    totals, per_prefill_heads = [], []
    for round_ in range(warmup + repeats):
        head_time.append(0.0)
        start = time.perf_counter()
        out = _prefill(engine, inputs, None, policy=policy)
        total = time.perf_counter() - start
        assert int(out.exit_layer.min()) == L, "a head exited although the threshold is above 1"
        if round_ >= warmup:
            totals.append(total)
            per_prefill_heads.append(head_time[-1])
    evaluated = L - 1  # head i runs before layer i+1; the last layer's head has no layer to skip
    layer_times = [(t - h) / L for t, h in zip(totals, per_prefill_heads)]
    fraction = [h / lt for h, lt in zip(per_prefill_heads, layer_times)]
    per_head = [h / evaluated for h in per_prefill_heads]
    full_depth_fraction = [p * (shape.full_depth - 1) / lt for p, lt in zip(per_head, layer_times)]
    med = statistics.median
    return {
        "batch": batch, "head_hidden": head_hidden, "head_inputs": list(config.inputs),
        "head_input": config.input_size, "head_parameters": sum(p.numel() for p in heads.parameters()),
        "heads_evaluated_per_prefill": evaluated, "prefill": summarize(totals),
        "all_heads_per_prefill": summarize(per_prefill_heads), "one_layer": summarize(layer_times),
        "fraction_of_one_layer": {"median": med(fraction), "min": min(fraction), "max": max(fraction)},
        "projected_full_depth": {"heads": shape.full_depth - 1, "fraction_of_one_layer": med(full_depth_fraction)},
        "target_2pct_holds": med(fraction) <= 0.02,
        "target_2pct_holds_at_full_depth": med(full_depth_fraction) <= 0.02,
    }


# --- 5: labelling cost -----------------------------------------------------------------------------------------
def _label_flops(config, n_text: int, n_visual: int, answer: int, num_layers: int | None = None) -> dict:
    """FLOPs of dense labelling (one pass + text-only branches) and of the naive scheme (one generation per
    exit layer 0..L), both per sample; `num_layers` overrides the depth (projection to the real checkpoint)."""
    s = DecoderShape.from_config(config)
    if num_layers is not None:
        s = DecoderShape(s.hidden_size, s.intermediate_size, num_layers, s.q_dim, s.kv_dim, s.vocab_size)
    L = s.num_layers
    n_full, n_branch = n_text + n_visual + answer, n_text + answer
    dense = L * layer_flops(s, n_full, n_full * (n_full + 1) // 2)
    dense += sum((L - k) * layer_flops(s, n_branch, n_branch * (n_branch + 1) // 2) for k in range(L))
    dense += (L + 1) * lm_head_flops(s, answer)
    generation = {k: prefill_flops(s, n_text, n_visual, k) + sum(
        decode_step_flops(s, n_text, n_visual, k, g) for g in range(answer - 1)) for k in range(L + 1)}
    naive = sum(generation.values())
    return {"num_layers": L, "dense": dense, "dense_plus_reference": dense + generation[L], "naive": naive,
            "naive_over_dense": naive / dense, "naive_over_dense_plus_reference": naive / (dense + generation[L])}


def labelling(engine: VisualExit, shape: Shape, repeats: int, warmup: int, batch: int = 1, answer: int = 8,
              n_text: int = 60) -> dict:
    """Cost per labelled (sample, exit layer) of `dense_labels` vs one `engine.generate` per exit layer."""
    config = engine.model.config
    L = engine.num_layers
    inputs = build_inputs(engine.model, shape, batch, n_text=n_text, seed=1)
    gen = dict(max_new_tokens=answer, min_new_tokens=answer, do_sample=False)
    n_labels = batch * (L + 1)
    candidates = candidate_exits(LabelConfig(layers="all"), [str(i) for i in range(batch)], L)

    def reference():
        out = engine.generate(**inputs, exit_layer=L, **gen)
        return [row.tolist() for row in out[:, inputs["input_ids"].shape[1]:]]

    answers = reference()

    def dense():
        return dense_labels(engine, inputs, answers, candidates, "after_first_visual", pad_token_id=0)

    def naive():  # the paper's scheme: one generation with exit per layer, compared with the reference
        return [engine.generate(**inputs, exit_layer=k, **gen) for k in range(L + 1)]

    labels = dense()
    consistent = bool(labels.match[:, L].all())  # the full-model branch reproduces its own greedy answer
    times = _interleaved({"reference": reference, "dense": dense, "naive": naive}, repeats, warmup)
    med = {name: statistics.median(t) for name, t in times.items()}
    flops = _label_flops(config, n_text, shape.n_visual, answer)
    projected = _label_flops(config, n_text, shape.n_visual, answer, shape.full_depth)
    measured_ratio = med["naive"] / med["dense"]
    measured_ratio_ref = med["naive"] / (med["dense"] + med["reference"])
    project = projected["naive_over_dense"] / flops["naive_over_dense"]
    project_ref = projected["naive_over_dense_plus_reference"] / flops["naive_over_dense_plus_reference"]
    return {
        "batch": batch, "answer_tokens": answer, "n_text": n_text, "n_visual": shape.n_visual,
        "labels_per_pass": n_labels, "full_branch_reproduces_reference": consistent,
        "dense": {**summarize(times["dense"]), "s_per_label": med["dense"] / n_labels},
        "reference_generation": {**summarize(times["reference"]), "s_per_label": med["reference"] / n_labels},
        "naive": {**summarize(times["naive"]), "s_per_label": med["naive"] / n_labels},
        "naive_over_dense": measured_ratio,
        "naive_over_dense_plus_reference": measured_ratio_ref,
        "flops_at_this_depth": flops, "flops_at_full_depth": projected,
        "projected_full_depth_naive_over_dense": measured_ratio * project,
        "projected_full_depth_naive_over_dense_plus_reference": measured_ratio_ref * project_ref,
        "target_10x_holds": measured_ratio >= 10,
        "target_10x_holds_at_full_depth_projected": measured_ratio * project >= 10,
    }


# --- 5b: head training ------------------------------------------------------------------------------------------
def head_training(hidden_size: int, num_layers: int, samples: int, repeats: int, epochs: int = 1,
                  head_hidden: int = 2048, batch_size: int = 256, full_depth: int | None = None) -> dict:
    """Samples/s of `HeadsModule` fitting on a synthetic feature cache (an Arrow `datasets` table shaped like
    the label cache: fp16 features [N, L, 2d], int8 labels [N, L+1] in {-1, 0, 1})."""
    import datasets
    import lightning as L_
    import numpy as np

    from dyvte.training.heads_module import HeadsDataModule, HeadsModule

    rng = np.random.default_rng(0)
    features = rng.standard_normal((samples, num_layers, 2 * hidden_size), dtype=np.float32).astype(np.float16)
    labels = rng.integers(-1, 2, size=(samples, num_layers + 1)).astype(np.int8)
    start = time.perf_counter()
    table = datasets.Dataset.from_dict({"features": features, "labels": labels})
    build_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        torch.manual_seed(0)
        config = ExitHeadsConfig(hidden_size, num_layers, head_hidden)
        module = HeadsModule(ExitHeads(config), lr=1e-4)
        data = HeadsDataModule(table, config, batch_size=batch_size)
        trainer = L_.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    rate = samples * epochs / med
    out = {"samples": samples, "epochs": epochs, "num_heads": num_layers, "head_input": 2 * hidden_size,
           "head_hidden": head_hidden, "batch_size": batch_size, "cache_build_s": build_s, "fit": summarize(times),
           "samples_per_s": rate, "sample_heads_per_s": rate * num_layers}
    if full_depth:
        out["projected_samples_per_s_at_full_depth"] = rate * num_layers / full_depth
    return out


def load_testbed():
    """The shipped testbed model (`dyvte/testbed/data/model`), or None where it has not been built."""
    path = TESTBED_MODEL_DIR
    if not (path / "config.json").exists():
        return None
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return model, path
