"""Load on the OpenAI-compatible server (`serve.py`) over loopback: the full model against dynamic exit.

    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_load            # -> benchmarks/results/serve.json

Starts the testbed server (policies none and dynamic, LitServe batching) on a free 127.0.0.1 port, then for each
concurrency (1, 4, 16) and policy sends a fixed number of chat requests (test-split samples, cycled) from that many
client threads, each cell stopping early at its time limit. Per cell: throughput (answered requests per wall-clock
second), p50/p95 latency, mean exit layer, mean share of LM prefill FLOPs saved, mean batch size, and how many
answers differ from `VisualExit.generate` run offline, alone, on the same inputs and policy (greedy decoding).
Only loopback traffic; every loop is bounded by a request count and a deadline.
"""

import argparse
import base64
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
import torch
from PIL import Image

from benchmarks.common import environment
from dyvte import DynamicExit, ExitHeads, NoExit, VisualExit, load_mllm
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
HEADS = DATA_DIR / "heads"
POLICIES = ("none", "dynamic")


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


def start_server(port: int, args, overrides: tuple[str, ...] = (), root: Path = ROOT) -> subprocess.Popen:
    """The testbed server of the checkout at `root` (another checkout: a baseline), with `overrides`."""
    command = [sys.executable, str(root / "serve.py"), f"port={port}", f"heads={HEADS}", "policy=dynamic",
               "policies=[none,dynamic]", f"max_batch_size={args.max_batch_size}",
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


def run_cell(url: str, bodies: list[dict], policy: str, concurrency: int, requests: int, limit_s: float) -> list:
    """`requests` requests (cycling `bodies`) from `concurrency` threads, none started after `limit_s` seconds."""
    results, lock, issued = [], threading.Lock(), [0]
    deadline = time.monotonic() + limit_s

    def worker(client: httpx.Client):
        while True:
            with lock:
                if issued[0] >= requests or time.monotonic() > deadline:
                    return
                index = issued[0]
                issued[0] += 1
            sample = index % len(bodies)
            start = time.perf_counter()
            response = client.post(url, json={**bodies[sample], "policy": policy}, timeout=max(limit_s, 60))
            latency = time.perf_counter() - start
            record = {"sample": sample, "latency_s": latency, "status": response.status_code}
            if response.status_code == 200:
                data = response.json()
                record.update(answer=data["choices"][0]["message"]["content"], **{
                    k: data["dyvte"][k] for k in ("exit_layer", "flops_saved", "batch_size")})
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


def summarize(results: list, wall: float, expected: dict, policy: str, requests: int) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency_s"] for r in ok)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "requests_planned": requests,
        "answered": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3),
        "p50_latency_ms": round(1000 * quantiles[49], 1),
        "p95_latency_ms": round(1000 * quantiles[94], 1),
        "mean_exit_layer": round(statistics.fmean(r["exit_layer"] for r in ok), 3),
        "mean_flops_saved": round(statistics.fmean(r["flops_saved"] for r in ok), 4),
        "mean_batch_size": round(statistics.fmean(r["batch_size"] for r in ok), 2),
        "answers_differing_from_offline": sum((r["answer"], r["exit_layer"]) != expected[policy, r["sample"]]
                                              for r in ok),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="requests per cell (concurrency x policy)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per cell before it stops sending")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--samples", type=int, default=32, help="distinct test-split samples, cycled")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server's model worker")
    parser.add_argument("--workdir", default="outputs/serve_load")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    samples = test_samples(args.samples)
    expected = offline_answers(samples, args.max_tokens)
    bodies = [{"model": "testbed", "temperature": 0, "max_tokens": args.max_tokens, "messages": [{
        "role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(path.read_bytes()).decode()}},
            {"type": "text", "text": question}]}]} for question, path in samples]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(port, args)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    cells = {}
    try:
        run_cell(url, bodies, "dynamic", 2, 8, args.time_limit)  # warm-up, not recorded
        for concurrency in args.concurrency:
            for policy in POLICIES:
                results, wall = run_cell(url, bodies, policy, concurrency, args.requests, args.time_limit)
                cells[f"c{concurrency}/{policy}"] = {"concurrency": concurrency, "policy": policy,
                                                     **summarize(results, wall, expected, policy, args.requests)}
                print(json.dumps(cells[f"c{concurrency}/{policy}"]), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    for concurrency in args.concurrency:
        full, dynamic = cells[f"c{concurrency}/none"], cells[f"c{concurrency}/dynamic"]
        cells[f"c{concurrency}/dynamic"]["throughput_vs_full"] = round(dynamic["req_per_s"] / full["req_per_s"], 3)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    record = {"env": env, "settings": settings,
              "command": "flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_load", "model": "testbed", "heads": "dyvte/testbed/data/heads (calibrated threshold)",
              "timing": "wall clock per request at the client (time.perf_counter), loopback HTTP, greedy decoding; "
                        "policies none and dynamic run one after the other at each concurrency, one server",
              "cells": cells}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return args.out


if __name__ == "__main__":
    print(main())
