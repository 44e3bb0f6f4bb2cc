"""Latency of short requests with and without a long-prompt neighbour on the OpenAI-compatible server, over loopback.

    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_long_prompt --label after
    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_long_prompt --label after-5000 --server-arg max_prompt_tokens=5000
    git archive main | tar -x -C /tmp/dyvte-main && \
        flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_long_prompt --label before --root /tmp/dyvte-main

Starts the testbed server of the checkout at `--root` (policies none and dynamic, `--max-batch-size`,
`--batch-timeout`) on a free 127.0.0.1 port. Then, `--waves` times each: `--shorts` short requests (test-split
questions, one image each) sent at once (alone), and the same with one long request beside them (a question of
`--long-chars` characters; the issue's 20,000 characters are 4,280 tokens), sent at once so that LitServe batches
them together. Per cell: p50 and p95 of the short requests' latency at the client, and the long one's status and
latency. Writes benchmarks/results/serve_long_prompt_<label>.json.
"""

import argparse
import base64
import json
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import environment
from benchmarks.serve_load import start_server, test_samples

ROOT = Path(__file__).resolve().parents[1]


def body(question: str, image: Path, max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {"model": "testbed", "temperature": 0, "max_tokens": max_tokens, "policy": "dynamic", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": question}]}]}


def timed(url: str, payload: dict) -> tuple[float, int]:
    start = time.perf_counter()
    response = httpx.post(url, json=payload, timeout=600)
    return time.perf_counter() - start, response.status_code


def wave(url: str, shorts: list[dict], long: dict | None) -> tuple[list[float], tuple[float, int] | None]:
    """The short requests' latencies, and the long one's (latency, status), all sent at once."""
    jobs = ([long] if long else []) + shorts
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda payload: timed(url, payload), jobs))
    shorts_done = results[1:] if long else results
    assert all(status == 200 for _, status in shorts_done), shorts_done
    return [seconds for seconds, _ in shorts_done], (results[0] if long else None)


def quantiles_ms(latencies: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50_ms": round(1000 * q[49], 1), "p95_ms": round(1000 * q[94], 1), "max_ms": round(1000 * max(latencies), 1),
            "requests": len(latencies)}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="names the result file (before, after, ...)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose serve.py is served")
    parser.add_argument("--server-arg", action="append", default=[], help="a serve.py override (repeatable)")
    parser.add_argument("--waves", type=int, default=8)
    parser.add_argument("--shorts", type=int, default=7)
    parser.add_argument("--long-chars", type=int, default=20_000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server's model worker")
    parser.add_argument("--workdir", default="outputs/serve_long_prompt")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    samples = test_samples(args.shorts)
    shorts = [body(question, image, args.max_tokens) for question, image in samples]
    sentence = "what colour is the object next to the one below it ? "
    long = body((sentence * (args.long_chars // len(sentence) + 1))[:args.long_chars], samples[0][1], args.max_tokens)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = environment(args.threads)
    server = start_server(port, args, tuple(args.server_arg), args.root)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        wave(url, shorts, None)  # warm-up, not recorded
        alone, beside, longs = [], [], []
        for _ in range(args.waves):
            alone += wave(url, shorts, None)[0]
            latencies, long_result = wave(url, shorts, long)
            beside += latencies
            longs.append(long_result)
    finally:
        server.terminate()
        server.wait(120)
    record = {
        "env": env, "label": args.label, "root": str(args.root), "server_args": args.server_arg,
        "settings": {k: v for k, v in vars(args).items() if k not in ("label", "root", "server_arg", "workdir")},
        "command": "flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_long_prompt "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "short_alone": quantiles_ms(alone), "short_beside_a_long_prompt": quantiles_ms(beside),
        "long": {"statuses": sorted({status for _, status in longs}),
                 "p50_ms": round(1000 * statistics.median(seconds for seconds, _ in longs), 1)},
    }
    out = ROOT / "benchmarks" / "results" / f"serve_long_prompt_{args.label}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("label", "short_alone", "short_beside_a_long_prompt", "long")}))
    return out


if __name__ == "__main__":
    main()
