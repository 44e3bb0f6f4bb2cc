"""Load on the OpenAI-compatible server (`serve.py`) over loopback: the testbed, or a real model's width.

    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_load            # -> benchmarks/results/serve.json
    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_load --model qwen2vl2b
                                                          # -> benchmarks/results/serve_load_qwen2vl2b.json

Testbed (`--model testbed`): starts the testbed server (policies none and dynamic, LitServe batching) on a free
127.0.0.1 port, then for each concurrency (1, 4, 16) and policy sends a fixed number of chat requests (test-split
samples, cycled) from that many client threads, each cell stopping early at its time limit. Per cell: throughput
(answered requests per wall-clock second), p50/p95 latency, mean exit layer, mean share of LM prefill FLOPs saved,
mean batch size, the time a request spends outside the model (client latency minus the worker's generate call,
`model_s`), and how many answers differ from `VisualExit.generate` run offline, alone, on the same inputs and policy
(greedy decoding). `--baseline-root DIR` first runs the same cells on another checkout's server (before / after).

Real width (`--model qwen2vl2b`): a random-weight Qwen2-VL-2B-Instruct folder (`benchmarks.qwen2vl2b_folder`: bf16,
28 decoder layers of width 1536, its 32-block vision tower, the real Qwen2 tokenizer and processor) served with
`allow_exit_layer=true`. Prefill-heavy streamed requests (`max_tokens` 8, one `--image-size` square image each: a
testbed test image resized) in three arms per concurrency: the full model (`exit_layer` L), exits replayed per
request from the shipped heads' exit layers on the testbed test split (request i gets test sample i's exit layer k
of 12, scaled to round(k * L / 12): the same share of the decoder sees the visual tokens), and a static exit at L/2.
Per cell besides the testbed's: time to first token, the whole request's FLOPs (vision tower + LM prefill at its
exit + its decode steps, dyvte's convention: `dyvte.flops`), and for each exit arm its throughput gain over the full
model's at the same concurrency beside its FLOPs-ideal gain (full FLOPs per request / its FLOPs per request), and
the peak RSS of the model worker. The arms of a concurrency are interleaved in `--rounds` rounds, so that the
machine's drift falls on each alike; before the server starts, the engine alone times a batch-1 prefill and generate
of the full model and the L/2 exit in this process (`offline_batch_1`), what serving can at best deliver. Only
loopback traffic; every loop is bounded by a request count and a deadline.
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch
from PIL import Image
from transformers import AutoConfig

from benchmarks import qwen2vl2b_folder
from benchmarks.common import environment
from dyvte import DynamicExit, ExitHeads, NoExit, StaticExit, VisualExit, flops, load_mllm
from dyvte.loading import load_processor
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
HEADS = DATA_DIR / "heads"
POLICIES = ("none", "dynamic")
TESTBED_SERVER = (f"heads={HEADS}", "policy=dynamic", "policies=[none,dynamic]")
TESTBED_DEPTH = 12
REPLAY_STRIDE = 397  # a prime: every test sample once in 640 requests, spread over the split


def test_samples(count: int) -> list[tuple[str, Path]]:
    records = json.loads((DATA_DIR / "test.json").read_text())[:count]
    return [(r["conversations"][0]["value"].replace("<image>", "").strip(), DATA_DIR / "images" / r["image"])
            for r in records]


@torch.no_grad()
def offline_answers(samples, max_tokens: int) -> dict:
    """(policy, sample index) -> (answer, exit layer) of `VisualExit.generate` alone, greedy."""
    model, processor = load_mllm("testbed")
    engine = VisualExit(model)
    policies = {"none": NoExit(), "dynamic": DynamicExit(ExitHeads.from_pretrained(HEADS))}
    answers = {}
    for i, (question, path) in enumerate(samples):
        image = Image.open(path).convert("RGB")
        inputs = processor(images=[image], text=[chat_prompt(processor, question, 1)], return_tensors="pt")
        for name, policy in policies.items():
            out = engine.generate(**inputs, policy=policy, max_new_tokens=max_tokens, do_sample=False,
                                  return_dict_in_generate=True)
            text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            answers[name, i] = (text.strip(), int(out.exit_layer[0]))
    return answers


@torch.no_grad()
def testbed_exit_layers(batch_size: int = 32) -> list[int]:
    """The exit layer (of 12) the shipped heads choose for each sample of the testbed test split, in order."""
    model, processor = load_mllm("testbed")
    processor.tokenizer.padding_side = "left"
    engine, policy = VisualExit(model), DynamicExit(ExitHeads.from_pretrained(HEADS))
    samples = test_samples(len(json.loads((DATA_DIR / "test.json").read_text())))
    exits = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        inputs = processor(images=[Image.open(path).convert("RGB") for _, path in chunk], padding=True,
                           text=[chat_prompt(processor, question, 1) for question, _ in chunk], return_tensors="pt")
        exits += engine.prefill(**inputs, policy=policy).exit_layer.tolist()
    return exits


def start_server(port: int, args, overrides: tuple[str, ...] = (), root: Path = ROOT,
                 model: tuple[str, ...] = TESTBED_SERVER) -> subprocess.Popen:
    """The server of the checkout at `root` (another checkout: a baseline) for `model` (its model, heads and
    policies: the testbed's by default), with `overrides`."""
    command = [sys.executable, str(root / "serve.py"), f"port={port}", *model, f"max_batch_size={args.max_batch_size}",
               f"batch_timeout={args.batch_timeout}", f"max_tokens={args.max_tokens}",
               f"hydra.run.dir={args.workdir}/serve", *overrides]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(args.threads)}
    log = Path(args.workdir) / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    process.send_signal(signal.SIGTERM)
    raise SystemExit("the server did not become healthy within 300 s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_worker(server: subprocess.Popen) -> psutil.Process:
    """The server's model worker: the process LitServe spawned that holds the model (the largest spawned one)."""
    spawned = [p for p in psutil.Process(server.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]
    return max(spawned, key=lambda p: p.memory_info().rss)


def peak_rss_gib(process: psutil.Process) -> float:
    """The process's peak resident memory so far (Linux's VmHWM), GiB."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return round(kib / 2**20, 2)


def post_streamed(client: httpx.Client, url: str, body: dict, timeout: float) -> dict:
    """A streamed request's record: status, latency (to the last chunk), time to its first text, and its last
    chunk's `dyvte` extension and usage."""
    start = time.perf_counter()
    record, first_text = {"status": None}, None
    with client.stream("POST", url, json={**body, "stream": True}, timeout=timeout) as response:
        record["status"] = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                record["status"] = chunk["error"]["code"]
            elif first_text is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first_text = time.perf_counter() - start
            if "dyvte" in chunk:
                record.update(chunk["dyvte"], completion_tokens=chunk["usage"]["completion_tokens"])
    record["latency_s"] = time.perf_counter() - start
    record["ttft_s"] = first_text
    return record


def run_cell(url: str, body_of, concurrency: int, requests: int, limit_s: float, stream: bool = False) -> list:
    """`requests` requests (request i's body: `body_of(i)` -> (sample, body)) from `concurrency` threads, none
    started after `limit_s` seconds."""
    results, lock, issued = [], threading.Lock(), [0]
    deadline = time.monotonic() + limit_s

    def worker(client: httpx.Client):
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() > deadline:
                    return
                index = issued[0]
                issued[0] += 1
            sample, body = body_of(index)
            if stream:
                record = {"sample": sample, "index": index, **post_streamed(client, url, body, max(limit_s, 60))}
            else:
                start = time.perf_counter()
                response = client.post(url, json=body, timeout=max(limit_s, 60))
                record = {"sample": sample, "index": index, "latency_s": time.perf_counter() - start,
                          "status": response.status_code}
                if response.status_code == 200:
                    data = response.json()
                    record.update(data["dyvte"], answer=data["choices"][0]["message"]["content"],
                                  completion_tokens=data["usage"]["completion_tokens"])
            with lock:
                results.append(record)

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client:
        threads = [threading.Thread(target=worker, args=(client,)) for _ in range(concurrency)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    return results, wall


def _quantile(values: list[float], q: int) -> float:
    values = sorted(values)
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list, wall: float, requests: int) -> dict:
    """A cell's throughput, latency, exits, batches, and the time outside the model (`model_s` is the generate
    call that answered a request; a server without it, a baseline, reports none)."""
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["latency_s"] for r in ok]
    cell = {
        "requests_planned": requests,
        "answered": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3),
        "p50_latency_ms": round(1000 * _quantile(latencies, 50), 1),
        "p95_latency_ms": round(1000 * _quantile(latencies, 95), 1),
        "mean_exit_layer": round(statistics.fmean(r["exit_layer"] for r in ok), 3),
        "mean_flops_saved": round(statistics.fmean(r["flops_saved"] for r in ok), 4),
        "mean_batch_size": round(statistics.fmean(r["batch_size"] for r in ok), 2),
        "mean_completion_tokens": round(statistics.fmean(r["completion_tokens"] for r in ok), 2),
    }
    if all("model_s" in r for r in ok):
        outside = [r["latency_s"] - r["model_s"] for r in ok]
        cell.update({  # model_busy_share: the generate calls' time (each counted once) over the wall time
            "p50_outside_model_ms": round(1000 * _quantile(outside, 50), 1),
            "outside_model_share": round(sum(outside) / sum(latencies), 4),
            "model_busy_share": round(sum(r["model_s"] / r["batch_size"] for r in ok) / wall, 4),
        })
    first = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    if first:
        cell.update({"p50_ttft_ms": round(1000 * _quantile(first, 50), 1),
                     "p95_ttft_ms": round(1000 * _quantile(first, 95), 1), "ttft_of": len(first)})
    return cell


# --- the testbed ----------------------------------------------------------------------------------------------------


def testbed_cells(args, bodies: list[dict], expected: dict, root: Path) -> dict:
    """The testbed's cells (concurrency x policy) on the server of the checkout at `root`."""
    port = free_port()
    server = start_server(port, args, root=root)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    cells = {}
    try:
        run_cell(url, lambda i: (i % len(bodies), {**bodies[i % len(bodies)], "policy": "dynamic"}), 2, 8,
                 args.time_limit)  # warm-up, not recorded
        for concurrency in args.concurrency:
            for policy in POLICIES:
                results, wall = run_cell(url, lambda i, policy=policy: (
                    i % len(bodies), {**bodies[i % len(bodies)], "policy": policy}),
                                         concurrency, args.requests, args.time_limit)
                cell = {"concurrency": concurrency, "policy": policy, **summarize(results, wall, args.requests)}
                cell["answers_differing_from_offline"] = sum(
                    (r["answer"], r["exit_layer"]) != expected[policy, r["sample"]] for r in results
                    if r["status"] == 200)
                cells[f"c{concurrency}/{policy}"] = cell
                print(json.dumps(cell), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    for concurrency in args.concurrency:
        full, dynamic = cells[f"c{concurrency}/none"], cells[f"c{concurrency}/dynamic"]
        dynamic["throughput_vs_full"] = round(dynamic["req_per_s"] / full["req_per_s"], 3)
    return cells


def testbed(args) -> dict:
    samples = test_samples(args.samples)
    expected = offline_answers(samples, args.max_tokens)
    bodies = [{"model": "testbed", "temperature": 0, "max_tokens": args.max_tokens, "messages": [{
        "role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(path.read_bytes()).decode()}},
            {"type": "text", "text": question}]}]} for question, path in samples]
    record = {"heads": "dyvte/testbed/data/heads (calibrated threshold)",
              "timing": "wall clock per request at the client (time.perf_counter), loopback HTTP, greedy decoding; "
                        "policies none and dynamic run one after the other at each concurrency, one server"}
    if args.baseline_root:
        record["baseline"] = {"root": str(args.baseline_root),
                              "cells": testbed_cells(args, bodies, expected, args.baseline_root)}
    record["cells"] = testbed_cells(args, bodies, expected, ROOT)
    return record


# --- a real model's width ---------------------------------------------------------------------------------------


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_flops(config, inputs: dict, exit_layer: int, completion_tokens: int) -> int:
    """A whole request's FLOPs (`dyvte.flops`): the vision tower, the LM prefill exiting at `exit_layer`, and the
    decode steps of its `completion_tokens` (the first comes from the prefill)."""
    n_tokens = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == config.image_token_id).sum())
    n_text = n_tokens - n_visual
    return (flops.vision_flops(config, **inputs)[0] + flops.prefill_flops(config, n_text, n_visual, exit_layer)
            + sum(flops.decode_step_flops(config, n_text, n_visual, exit_layer, g)
                  for g in range(completion_tokens - 1)))


@torch.no_grad()
def offline_engine(folder: Path, inputs: dict, exits: dict[str, int], max_tokens: int, repeats: int = 3) -> dict:
    """The engine alone, in this process, batch 1, before any server: per arm (a static exit layer), the mean wall
    time of a prefill and of a `generate` of `max_tokens` tokens, the arms interleaved, after one untimed round."""
    model, _ = load_mllm(str(folder), dtype="bfloat16")
    engine = VisualExit(model)
    times = {arm: {"prefill_s": [], "generate_s": []} for arm in exits}
    for repeat in range(repeats + 1):
        for arm, exit_layer in exits.items():
            start = time.perf_counter()
            engine.prefill(**inputs, policy=StaticExit(exit_layer))
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            engine.generate(**inputs, policy=StaticExit(exit_layer), max_new_tokens=max_tokens,
                            min_new_tokens=max_tokens, do_sample=False)
            if repeat:
                times[arm]["prefill_s"].append(prefill_s)
                times[arm]["generate_s"].append(time.perf_counter() - start)
    del engine, model
    return {arm: {key: round(statistics.fmean(values), 3) for key, values in timed.items()}
            for arm, timed in times.items()}


def real_width(args) -> dict:
    folder = qwen2vl2b_folder.build(qwen2vl2b_folder.default_folder())
    config = AutoConfig.from_pretrained(folder)
    depth = config.get_text_config(decoder=True).num_hidden_layers
    processor = load_processor(str(folder))
    testbed_exits = testbed_exit_layers()
    # request i: test sample (i * REPLAY_STRIDE) mod 640, so that the first requests of a cell already follow the
    # whole split's histogram (a prefix of the split would follow its first samples')
    replayed = [round(testbed_exits[i * REPLAY_STRIDE % len(testbed_exits)] * depth / TESTBED_DEPTH)
                for i in range(len(testbed_exits))]
    arms = {"full": lambda i: depth, "replayed": lambda i: replayed[i % len(replayed)], "half": lambda i: depth // 2}
    samples = test_samples(args.samples)
    images = [Image.open(path).convert("RGB").resize((args.image_size, args.image_size), Image.Resampling.BICUBIC)
              for _, path in samples]
    bodies = [{"model": "qwen2vl2b", "temperature": 0, "max_tokens": args.max_tokens, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                                    {"type": "text", "text": question}]}]}
              for (question, _), image in zip(samples, images)]
    inputs = [dict(processor(images=[image], text=[chat_prompt(processor, question, 1)], return_tensors="pt"))
              for (question, _), image in zip(samples, images)]
    offline = offline_engine(folder, inputs[0], {"full": depth, "half": depth // 2}, args.max_tokens)
    for arm, timed in offline.items():
        timed["request_tflops"] = round(request_flops(config, inputs[0], arms[arm](0), args.max_tokens) / 1e12, 4)
    print(json.dumps({"offline_batch_1": offline}), flush=True)
    port = free_port()
    server = start_server(port, args, model=(f"model={args.model}", f"model.name_or_path={folder}",
                                             "model.revision=null", "policy=none", "policies=[none]",
                                             "allow_exit_layer=true", f"max_new_tokens={args.max_tokens}",
                                             f"request_timeout={args.time_limit}"))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    cells = {}
    try:
        worker = model_worker(server)
        for concurrency in (1, max(args.concurrency)):  # warm-up at both ends of the batch sizes, not recorded
            run_cell(url, lambda i: (i % len(bodies), {**bodies[i % len(bodies)], "exit_layer": depth}), concurrency,
                     concurrency, args.time_limit, stream=True)
        for concurrency in args.concurrency:
            requests = args.real_requests.get(concurrency, args.requests)
            share = -(-requests // args.rounds)  # requests of one arm in one round
            collected = {arm: ([], 0.0) for arm in arms}
            for round_ in range(args.rounds):  # the arms interleaved, each round in a rotated order
                names = list(arms)[round_ % len(arms):] + list(arms)[:round_ % len(arms)]
                for arm in names:
                    offset = round_ * share
                    results, wall = run_cell(url, lambda i, exit_of=arms[arm], offset=offset: (
                        (offset + i) % len(bodies), {**bodies[(offset + i) % len(bodies)],
                                                     "exit_layer": exit_of(offset + i)}),
                                             concurrency, share, args.time_limit, stream=True)
                    collected[arm] = (collected[arm][0] + results, collected[arm][1] + wall)
            for arm, (results, wall) in collected.items():
                ok = [r for r in results if r["status"] == 200]
                cell = {"concurrency": concurrency, "arm": arm, **summarize(results, wall, share * args.rounds),
                        "mean_request_tflops": round(statistics.fmean(
                            request_flops(config, inputs[r["sample"]], r["exit_layer"], r["completion_tokens"])
                            for r in ok) / 1e12, 4),
                        "worker_peak_rss_gib": peak_rss_gib(worker)}
                cells[f"c{concurrency}/{arm}"] = cell
                print(json.dumps(cell), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    for concurrency in args.concurrency:
        full = cells[f"c{concurrency}/full"]
        for arm in ("replayed", "half"):
            cell = cells[f"c{concurrency}/{arm}"]
            served = cell["req_per_s"] / full["req_per_s"]
            ideal = full["mean_request_tflops"] / cell["mean_request_tflops"]
            cell.update(served_gain=round(served, 3), flops_ideal_gain=round(ideal, 3),
                        served_over_ideal=round((served - 1) / (ideal - 1), 3) if ideal > 1 else None,
                        served_over_ideal_ratio=round(served / ideal, 3),
                        p95_vs_full=round(cell["p95_latency_ms"] / full["p95_latency_ms"], 3))
    n_visual = int((inputs[0]["input_ids"] == config.image_token_id).sum())
    return {"folder": str(folder), "image_size": args.image_size, "visual_tokens_per_request": n_visual,
            "prompt_tokens": int(inputs[0]["input_ids"].shape[1]), "num_layers": depth,
            "offline_batch_1": offline,
            "testbed_exit_histogram": {k: testbed_exits.count(k) for k in sorted(set(testbed_exits))},
            "replayed_exit_histogram": {k: replayed.count(k) for k in sorted(set(replayed))},
            "replay": f"request i exits at round(k * {depth} / {TESTBED_DEPTH}), k the shipped heads' exit layer on "
                      f"testbed test sample (i * {REPLAY_STRIDE}) mod {len(testbed_exits)}",
            "timing": "streamed requests; wall clock per request at the client (time.perf_counter) to the last "
                      "chunk, time to first token to the first chunk with text; loopback HTTP, greedy decoding; at "
                      "each concurrency the arms are interleaved in `rounds` rounds (each round in a rotated order, "
                      "an arm's wall time the sum of its rounds'), one server; served_gain is req/s over the "
                      "full arm's, flops_ideal_gain the full arm's mean request FLOPs over the arm's, "
                      "served_over_ideal = (served_gain - 1) / (flops_ideal_gain - 1) (the share of the ideal "
                      "saving delivered) and served_over_ideal_ratio = served_gain / flops_ideal_gain",
            "cells": cells}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed", choices=["testbed", "qwen2vl2b"])
    parser.add_argument("--requests", type=int, default=48, help="requests per cell (concurrency x policy or arm)")
    parser.add_argument("--real-requests", default="1:16,4:32,16:64",
                        help="real width: requests per cell by concurrency (c:n,...; others take --requests)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="real width: rounds that interleave the arms at each concurrency (the machine's drift "
                             "falls on every arm alike)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per cell before it stops sending (60 on the testbed, 600 at a real width, where "
                             "it is also how long a request may wait in the server's queue)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--samples", type=int, default=32, help="distinct test-split samples, cycled")
    parser.add_argument("--image-size", type=int, default=224,
                        help="real width: the images' side in pixels (224: 256 patches, 64 visual tokens)")
    parser.add_argument("--max-tokens", type=int, default=None, help="16 on the testbed, 8 at a real width")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server's model worker")
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help="testbed: run the same cells first on this checkout's server (before / after)")
    parser.add_argument("--workdir", default="outputs/serve_load")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.max_tokens = args.max_tokens or (16 if args.model == "testbed" else 8)
    args.time_limit = args.time_limit or (60.0 if args.model == "testbed" else 600.0)
    args.real_requests = {int(c): int(n) for c, n in (item.split(":") for item in args.real_requests.split(","))}
    out = args.out or ROOT / "benchmarks" / "results" / ("serve.json" if args.model == "testbed"
                                                         else f"serve_load_{args.model}.json")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    record = testbed(args) if args.model == "testbed" else real_width(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    settings["baseline_root"] = settings["baseline_root"] and str(settings["baseline_root"])
    command = "flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_load " + " ".join(argv or sys.argv[1:])
    record = {"env": env, "settings": settings, "command": command.strip(), "model": args.model, **record,
              "load_at_end": list(os.getloadavg())}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


if __name__ == "__main__":
    print(main())
