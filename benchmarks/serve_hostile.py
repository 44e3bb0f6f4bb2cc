"""Hostile and careless clients against the OpenAI-compatible server (`serve.py`) over loopback: every case's status
and error, its effect on good requests sent beside it, and the memory it costs the server's processes.

    flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_hostile     # -> benchmarks/results/serve_hostile.json

Starts the testbed server with its default limits (`conf/serve.yaml`; policies none and dynamic) on a free
127.0.0.1 port. Each case (`hostile_bodies`, `hostile_clients`) is sent together with `--neighbours` good requests,
which must get the answer `VisualExit.generate` gives offline; while it runs, the resident memory of the model
worker and of the HTTP process is sampled every few milliseconds, and its growth over the value before the case is
recorded (the peak, and what is left after); then `max_batch_size` of the largest image allowed at once. Only
loopback traffic; every client is bounded by a timeout.
"""

import argparse
import base64
import io
import json
import select
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from PIL import Image

from benchmarks.common import environment
from benchmarks.serve_load import start_server
from dyvte.images import MAX_ASPECT_RATIO, resized_pixels
from dyvte.loading import load_processor, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "dyvte" / "testbed" / "data" / "images" / "test_00000.png"
QUESTION = "what digit is on the purple diamond ?"


@dataclass
class Case:
    """A request body (a dict sent as JSON, or raw bytes) and what the server must answer: its status and words its
    error must contain (None: a 200 with an answer)."""

    name: str
    body: dict | bytes
    status: int
    words: str | None


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels; its data is one pixel (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00")) + chunk(b"IEND", b""))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def good_body(max_tokens: int = 8, **extra) -> dict:
    return {"model": "testbed", "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(IMAGE.read_bytes())}},
        {"type": "text", "text": QUESTION}]}], **extra}


def hostile_bodies(max_tokens: int, max_image_pixels: int, image_processor) -> list[Case]:
    """Every bad body tried, with the status and words of its refusal; and the largest images the limits let
    through (answered), whose memory the table reports. `max_tokens`, `max_image_pixels`: the server's limits;
    `image_processor`: the served model's."""

    def with_content(*parts) -> dict:
        body = good_body()
        body["messages"][0]["content"] = list(parts)
        return body

    def with_image(data: bytes | str) -> dict:
        url = data if isinstance(data, str) else data_url(data)
        return with_content({"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION})

    good = good_body()
    image_part, text_part = good["messages"][0]["content"]
    side = int(max_image_pixels ** 0.5)
    thinnest = max(w for w in range(1, MAX_ASPECT_RATIO + 1) if resized_pixels(image_processor, w, 1) <= max_image_pixels)
    noise = Image.effect_noise((side, side), 100).convert("RGB")  # the largest image allowed, incompressible
    truncated = png(Image.new("RGB", (64, 64), "red"))[:60]
    return [
        Case("not JSON", b'{"messages": [{"role": "user", "content": "what', 400, "the body is not valid JSON"),
        Case("not UTF-8", b'{"model": "\xff\xfe"}', 400, "error parsing the body"),
        Case("100,000-deep JSON", b"[" * 100_000 + b"]" * 100_000, 400, "error parsing the body"),
        Case("a JSON list", b"[1, 2]", 400, "Input should be a valid dictionary"),
        Case("empty body", b"", 400, "Field required"),
        Case("unknown field", {**good, "foo": 1}, 400, "foo: this server does not support this field"),
        Case("tools", {**good, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
             "tools: this server does not support this field"),
        Case("response_format", {**good, "response_format": {"type": "json_object"}}, 400,
             "response_format: this server does not support this field"),
        Case("logprobs", {**good, "logprobs": True}, 400, "logprobs=true is not supported"),
        Case("top_logprobs", {**good, "top_logprobs": 3}, 400, "top_logprobs is not supported"),
        Case("frequency_penalty", {**good, "frequency_penalty": 0.5}, 400, "frequency_penalty=0.5 is not supported"),
        Case("presence_penalty", {**good, "presence_penalty": -1}, 400, "presence_penalty=-1.0 is not supported"),
        Case("n=2", {**good, "n": 2}, 400, "n=2: the server answers once per request"),
        Case("temperature NaN", json.dumps({**good, "temperature": float("nan")}).encode(), 400,
             "temperature: Input should be a finite number"),
        Case("temperature string", {**good, "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
        Case("temperature -1", {**good, "temperature": -1}, 400, "temperature=-1.0 is outside 0.01..2.0"),
        Case("temperature 1e-30", {**good, "temperature": 1e-30}, 400, "temperature=1e-30 is outside 0.01..2.0"),
        Case("temperature 3", {**good, "temperature": 3}, 400, "temperature=3.0 is outside 0.01..2.0"),
        Case("top_p 0", {**good, "temperature": 1, "top_p": 0}, 400, "top_p=0.0 is outside (0, 1]"),
        Case("top_p 1.5", {**good, "temperature": 1, "top_p": 1.5}, 400, "top_p=1.5 is outside (0, 1]"),
        Case("max_tokens 0", {**good, "max_tokens": 0}, 400, f"max_tokens=0 is outside 1..{max_tokens}"),
        Case("max_tokens over the limit", {**good, "max_tokens": max_tokens + 1}, 400,
             f"max_tokens={max_tokens + 1} is outside 1..{max_tokens}"),
        Case("max_tokens 2.5", {**good, "max_tokens": 2.5}, 400, "max_tokens: Input should be a valid integer"),
        Case("max_tokens true", {**good, "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
        Case("max_tokens and max_completion_tokens differ", {**good, "max_completion_tokens": 4}, 400,
             "max_completion_tokens=4 and max_tokens=8 differ"),
        Case('stop ""', {**good, "stop": ""}, 400, "stop holds an empty string"),
        Case('stop [""]', {**good, "stop": ["", "x"]}, 400, "stop holds an empty string"),
        Case("5 stop strings", {**good, "stop": list("abcde")}, 400, "stop has 5 strings; at most 4"),
        Case("stop [1]", {**good, "stop": [1]}, 400, "stop: must be a string or a list of strings"),
        Case("seed 2**64", {**good, "temperature": 1, "seed": 2**64}, 400, "is not a signed 64-bit integer"),
        Case("stream 'yes'", {**good, "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
        Case("no messages", {**good, "messages": []}, 400, "messages: List should have at least 1 item"),
        Case("role tool", {**good, "messages": [{"role": "tool", "content": "x"}]}, 400,
             "messages.0.role: Input should be 'system', 'user' or 'assistant'"),
        Case("message name", {**good, "messages": [{**good["messages"][0], "name": "eve"}]}, 400,
             "messages.0.name: this server does not support this field"),
        Case("content null", {**good, "messages": [{"role": "user", "content": None}]}, 400,
             "messages.0.content: Input should be a valid list"),
        Case("last message not the user's", {**good, "messages": [good["messages"][0],
                                                                  {"role": "assistant", "content": "1"}]},
             400, "the last message must be the user's question"),
        Case("image in an assistant message", {**good, "messages": [{"role": "assistant", "content": [image_part]},
                                                                    good["messages"][0]]},
             400, "only user messages take images"),
        Case("image_url part with text", with_content({"type": "image_url", "text": "x"}, text_part), 400,
             "messages.0.content.0.image_url: Field required"),
        Case("text part with image_url", with_content({"type": "text", "image_url": image_part["image_url"]},
                                                      text_part), 400, "messages.0.content.0.text: Field required"),
        Case("audio part", with_content({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                                        text_part), 400, "does not match any of the expected tags"),
        Case("image detail high", with_content({"type": "image_url", "image_url": {**image_part["image_url"],
                                                                                   "detail": "high"}}, text_part),
             400, "detail: Input should be 'auto'"),
        Case("bad base64", with_image("data:image/png;base64,@@not base64@@"), 400, "bad base64"),
        Case("not a data URL", with_image("data:image/png,abc"), 400, "a data URL must be data:image/...;base64"),
        Case("bytes that are not an image", with_image(b"hello, world"), 400, "is not an image PIL can read"),
        Case("truncated PNG", with_image(truncated), 400, "cannot be decoded"),
        Case("http URL", with_image("https://example.com/cat.png"), 400, "the server never fetches URLs"),
        Case("path traversal", with_image("../../../../etc/passwd"), 400, "or start the server with allow_local_paths"),
        Case("PNG header 5000 x 5000", with_image(png_claiming(5000, 5000)), 413,
             f"5000x5000 = 25000000 pixels, over this server's max_image_pixels={max_image_pixels}"),
        Case("PNG header 40000 x 40000", with_image(png_claiming(40000, 40000)), 413, "decompression bomb"),
        Case("16000 x 1 PNG (131 bytes)", with_image(png(Image.new("RGB", (16000, 1)))), 413,
             "16000x1, an aspect ratio over 200:1"),
        Case("1 x 32000 PNG (211 bytes)", with_image(png(Image.new("RGB", (1, 32000)))), 413,
             "1x32000, an aspect ratio over 200:1"),
        Case("two images", with_content(image_part, image_part, text_part), 400, "at most max_images=1"),
        Case("no image", with_content(text_part), 400, "the request has no image"),
        Case("unknown policy", {**good, "policy": "fastest"}, 400, "policy 'fastest' is not served"),
        Case("20,000-character question", with_content(image_part, {"type": "text", "text": "is it red ? " * 1667}),
             400, "over this server's max_prompt_tokens"),
        Case(f"noise PNG {side} x {side} (the largest allowed)", with_image(png(noise)), 200, None),
        Case(f"{thinnest} x 1 PNG (the thinnest allowed: resized to {resized_pixels(image_processor, thinnest, 1)} "
             "pixels)", with_image(png(Image.new("RGB", (thinnest, 1)))), 200, None),
    ]


def send(url: str, body: dict | bytes, timeout: float = 120) -> httpx.Response:
    """POST `body` to `url`: a dict as JSON, bytes as they are (with a JSON content type)."""
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(url, json=body, timeout=timeout)


# --- clients that misbehave on the connection ------------------------------------------------------------------------


def raw_request(port: int, head: bytes, body_chunks=(), pause: float = 0.0, limit_s: float = 120) -> tuple[bytes, float]:
    """(what the server sent back, seconds until it answered or closed) for a request written by hand: `head`, then
    each body chunk after `pause` seconds, until the server answers or closes the connection."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as connection:
        connection.sendall(head)
        for chunk in body_chunks:
            time.sleep(pause)
            if select.select([connection], [], [], 0)[0]:  # an answer, or the connection closed
                break
            try:
                connection.sendall(chunk)
            except OSError:
                break
        received = b""
        try:
            while data := connection.recv(65536):
                received += data
                if b"\r\n\r\n" in received:
                    break
        except OSError:
            pass
    return received, time.monotonic() - start


def head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def hostile_clients(port: int, read_timeout: float, idle_timeout: float, max_request_bytes: int) -> dict:
    """Clients that hold connections: {case: (first line of the answer or "closed", seconds)}."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = json.dumps(good_body()).encode()
    out = {}

    def first_line(received: bytes) -> str:
        return received.split(b"\r\n", 1)[0].decode() if received else "closed"

    received, seconds = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 1", [b"2"] * 1000, pause=0.5,
                                    limit_s=read_timeout + 30)
    out["headers sent one byte every 0.5 s"] = (first_line(received), seconds)
    received, seconds = raw_request(port, head(len(body)), [body[:100]], limit_s=idle_timeout + 30)
    out[f"body stops after 100 of {len(body)} bytes"] = (first_line(received), seconds)
    chunks = [body[i:i + 10] for i in range(0, len(body), 10)]
    received, seconds = raw_request(port, head(len(body)), chunks, pause=idle_timeout / 2, limit_s=read_timeout + 30)
    out[f"body sent 10 bytes every {idle_timeout / 2} s"] = (first_line(received), seconds)
    received, seconds = raw_request(port, head(max_request_bytes + 1), [b"{"])
    out["Content-Length over max_request_bytes"] = (first_line(received), seconds)
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b" " * 1_000_000
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    received, seconds = raw_request(port, chunked, [chunk] * (max_request_bytes // len(piece) + 2))
    out["chunked body growing past max_request_bytes"] = (first_line(received), seconds)
    with httpx.stream("POST", url, json=good_body(max_tokens=16, stream=True), timeout=60) as response:
        for _ in response.iter_lines():
            break  # the first chunk, then the client leaves
    out["stream left after its first chunk"] = ("left", 0.0)
    try:
        httpx.post(url, json=good_body(), timeout=0.01)
    except httpx.TimeoutException:
        pass
    out["client gave up before its answer"] = ("left", 0.0)
    return out


# --- memory of the server's processes ------------------------------------------------------------------------------


def server_processes(server: psutil.Process, port: int) -> dict[str, psutil.Process]:
    """The model worker (the largest process LitServe spawned) and the HTTP process (the child listening on `port`)."""
    children = server.children(recursive=True)
    spawned = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    listening = [p for p in children if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                            for c in p.net_connections("tcp"))]
    return {"worker": max(spawned, key=lambda p: p.memory_info().rss), "http": listening[0]}


class MemoryWatch:
    """Peak resident memory of each process while the block runs, sampled every `interval` seconds."""

    def __init__(self, processes: dict[str, psutil.Process], interval: float = 0.005):
        self.processes, self.interval = processes, interval

    def __enter__(self):
        self.before = {k: p.memory_info().rss for k, p in self.processes.items()}
        self.peak, self.running = dict(self.before), True
        self.thread = threading.Thread(target=self._sample)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            for key, process in self.processes.items():
                self.peak[key] = max(self.peak[key], process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        time.sleep(0.2)
        self.after = {k: p.memory_info().rss for k, p in self.processes.items()}

    def growth_mb(self) -> dict:
        return {key: {"peak": round((self.peak[key] - self.before[key]) / 2**20, 1),
                      "left": round((self.after[key] - self.before[key]) / 2**20, 1)} for key in self.processes}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neighbours", type=int, default=3, help="good requests sent with each case")
    parser.add_argument("--workdir", default="outputs/serve_hostile")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_hostile.json")
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf

    limits = OmegaConf.load(ROOT / "dyvte" / "conf" / "serve.yaml")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server_args = argparse.Namespace(max_batch_size=8, batch_timeout=0.05, max_tokens=limits.max_tokens, threads=1,
                                     workdir=args.workdir)
    server = start_server(port, server_args)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        processes = server_processes(psutil.Process(server.pid), port)
        expected = httpx.post(url, json=good_body(), timeout=60).json()["choices"][0]["message"]["content"]
        rows = []
        image_processor = load_processor(resolve_model_path("testbed")).image_processor
        cases = hostile_bodies(limits.max_tokens, limits.max_image_pixels, image_processor)
        for case in cases:
            with MemoryWatch(processes) as watch, ThreadPoolExecutor(args.neighbours + 1) as pool:
                neighbours = [pool.submit(httpx.post, url, json=good_body(), timeout=120)
                              for _ in range(args.neighbours)]
                response = send(url, case.body)
                good = [f.result() for f in neighbours]
            ok = sum(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected for r in good)
            detail = response.json().get("detail", "") if response.status_code != 200 else ""
            rows.append({"case": case.name, "status": response.status_code, "expected_status": case.status,
                         "error": detail, "words_found": case.words is None or case.words in response.text,
                         "good_neighbours_answered_as_offline": f"{ok}/{len(good)}", "memory_mb": watch.growth_mb()})
            print(json.dumps(rows[-1]), flush=True)
        largest = next(case for case in cases if case.name.startswith("noise PNG"))
        with MemoryWatch(processes) as watch, ThreadPoolExecutor(server_args.max_batch_size) as pool:
            statuses = list(pool.map(lambda _: send(url, largest.body).status_code, range(server_args.max_batch_size)))
        at_once = {"case": f"{largest.name}, {len(statuses)} at once", "statuses": statuses,
                   "memory_mb": watch.growth_mb()}
        print(json.dumps(at_once), flush=True)
        before = httpx.get(f"http://127.0.0.1:{port}/v1/dyvte/stats").json()
        clients = hostile_clients(port, limits.read_timeout, limits.idle_timeout, limits.max_request_bytes)
        time.sleep(limits.idle_timeout + 1)
        healthy = httpx.post(url, json=good_body(), timeout=60).json()["choices"][0]["message"]["content"] == expected
        stats = httpx.get(f"http://127.0.0.1:{port}/v1/dyvte/stats").json()
    finally:
        server.terminate()
        server.wait(120)
    record = {"env": environment(1), "command": "flock /tmp/dyvte-heavy.lock python -m benchmarks.serve_hostile",
              "limits": {k: limits[k] for k in ("max_tokens", "max_image_pixels", "max_images", "max_request_bytes",
                                                "read_timeout", "idle_timeout")},
              "bodies": rows, "largest_at_once": at_once, "clients": clients, "answered_as_offline_after_the_clients": healthy,
              "stats_before_clients": before, "stats": stats}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return args.out


if __name__ == "__main__":
    print(main())
