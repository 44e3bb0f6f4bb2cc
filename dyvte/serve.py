"""Serve an MLLM with visual-token exit behind an OpenAI-compatible chat endpoint, on LitServe.

    python serve.py heads=DIR policy=dynamic port=8000
    dyvte-serve model=qwen2vl2b heads=DIR policies=[none,dynamic,fastv+dynamic]

`POST /v1/chat/completions` takes OpenAI chat requests with image parts (base64 data URLs; server paths when
`allow_local_paths=true`; URLs are never fetched) and an optional `"policy"` field naming one of `policies`.
LitServe batches requests from different clients into one `VisualExit.generate` call (`max_batch_size`,
`batch_timeout`): each sample leaves at its own exit layer. Answers stream token by token (`"stream": true`).
Every response carries a `"dyvte"` field: the policy, the exit layer and the share of LM prefill FLOPs it saved.
`GET /v1/dyvte/stats` gives the exit histogram and request counts; `GET /health` is 200 once the model is loaded.

Processes (LitServe's): this one checks the config, the port and the heads before any model time, then starts an
HTTP server (which checks every request, so a bad one never reaches a batch) and one model worker (which loads the
model and answers batches). SIGTERM or Ctrl-C stops taking requests, lets the ones in flight finish, then exits.
"""

import base64
import binascii
import io
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from dyvte.extras import check_installed

check_installed("litserve", "serve", "dyvte-serve (python serve.py)")  # before the imports below fail unnamed

import hydra
import litserve as ls
import torch
from fastapi import BackgroundTasks, HTTPException
from litserve.specs.openai import ChatCompletionRequest, ChatCompletionResponse, OpenAISpec
from litserve.utils import LitAPIStatus
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from transformers import AutoConfig, StoppingCriteria, StoppingCriteriaList

from dyvte import VisualExit, cli, flops
from dyvte.configs import check_serve_config, read_model_settings
from dyvte.engine.visual_exit import generation_eos_ids
from dyvte.evaluation import ExitStats
from dyvte.evaluation.policy_config import policy_settings
from dyvte.heads import ExitHeads
from dyvte.loading import ModelSettings, resolve_model_path
from dyvte.policies.registry import POLICY_NAMES, REGISTRY, SCHEDULE, build_policy, needs_heads
from dyvte.preflight import check_policy_names, check_policy_needs
from dyvte.prompts import assistant_message, chat_prompt

cli.register_resolvers()
log = logging.getLogger("serve")

STATS_PATH = "/v1/dyvte/stats"


# --- requests: checked in the HTTP server, so that a bad one gets its 4xx and never reaches a batch -------------


class ExitChatRequest(ChatCompletionRequest):
    """LitServe's OpenAI chat request with dyvte's extension: the exit policy (one of the server's `policies`;
    None: its default `policy`)."""

    policy: str | None = None


class ExitChatResponse(ChatCompletionResponse):
    """LitServe's OpenAI chat response with dyvte's extension: `{"policy", "exit_layer", "num_layers",
    "flops_saved", "lm_prefill_tflops", "full_model_tflops", "batch_size"}` of the request (`batch_size`: how many
    requests its generate call answered together)."""

    dyvte: dict | None = None


class BadRequest(HTTPException):
    """A request the server refuses: HTTP `status` (4xx), a short `kind` (counted in the stats) and a message that
    names the problem and the fix."""

    def __init__(self, kind: str, detail: str, status: int = 400):
        super().__init__(status_code=status, detail=detail)
        self.kind = kind


@dataclass
class RequestLimits:
    """What the server accepts (`conf/serve.yaml`)."""

    policies: tuple[str, ...]
    default_policy: str
    max_new_tokens: int  # a request's max_tokens when it gives none
    max_tokens: int
    max_images: int
    max_image_pixels: int
    require_image: bool
    allow_local_paths: bool


@dataclass
class ChatInput:
    """One checked request: the chat turns before the question, the question, its images (in order), the policy,
    how many tokens to generate and how (temperature 0: greedy), and where to cut the answer."""

    history: list[dict]
    question: str
    question_images: int
    images: list[Image.Image]
    policy: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False


def image_bytes(url: str, number: int, allow_local_paths: bool) -> bytes:
    """The bytes of image `number` (1-based) of a request: a base64 data URL, or a file on the server's disk when
    `allow_local_paths`. URLs are never fetched."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest("bad_data_url", f"image {number}: a data URL must be data:image/...;base64,<data>.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadRequest("bad_base64", f"image {number}: bad base64 data ({error}).") from None
    if url.startswith(("http://", "https://", "ftp://")):
        raise BadRequest("url_not_fetched", f"image {number}: the server never fetches URLs ({url[:60]!r}); send the "
                                            "image as a base64 data URL (data:image/png;base64,...).")
    if not allow_local_paths:
        raise BadRequest("local_path", f"image {number}: {url[:60]!r} is neither a data URL nor allowed as a server "
                                       "path; send a base64 data URL, or start the server with allow_local_paths=true.")
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise BadRequest("local_path", f"image {number}: no file {str(path)!r} on the server.")
    return path.read_bytes()


def decode_image(data: bytes, number: int, max_pixels: int) -> Image.Image:
    """The RGB image in `data`; its size is checked from the header before any pixel is decoded (a small file
    can claim billions of pixels: a decompression bomb)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadRequest("image_too_large", f"image {number} is {width} x {height} = {width * height} "
                                                    f"pixels, over this server's max_image_pixels={max_pixels}; "
                                                    "send a smaller image.", status=413)
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # PIL's own limit, far above ours: refused before the size is read
        raise BadRequest("image_too_large", f"image {number} is a decompression bomb ({error}); this server takes at "
                                            f"most max_image_pixels={max_pixels}.", status=413) from None
    except UnidentifiedImageError:
        raise BadRequest("not_an_image", f"image {number} is not an image PIL can read (PNG, JPEG, ...).") from None
    except OSError as error:
        raise BadRequest("not_an_image", f"image {number} cannot be decoded ({error}).") from None


def _image_url(part) -> str:
    return part.image_url if isinstance(part.image_url, str) else part.image_url.url


def parse_request(request: ExitChatRequest, limits: RequestLimits) -> ChatInput:
    """The request as model input, or a `BadRequest` naming what is wrong with it."""
    if request.n != 1:
        raise BadRequest("bad_request", f"n={request.n}: the server answers once per request (n=1).")
    if request.tools:
        raise BadRequest("bad_request", "tools are not supported by this server.")
    policy = request.policy or limits.default_policy
    if policy not in limits.policies:
        raise BadRequest("unknown_policy", f"policy {policy!r} is not served; this server serves "
                                           f"{', '.join(limits.policies)} (start it with policies=[...] for others).")
    max_new_tokens = request.max_completion_tokens or request.max_tokens or limits.max_new_tokens
    if not 1 <= max_new_tokens <= limits.max_tokens:
        raise BadRequest("max_tokens", f"max_tokens={max_new_tokens} is outside 1..{limits.max_tokens}, this "
                                       "server's limit (its max_tokens setting).")
    turns, images = [], []
    for index, message in enumerate(request.messages):
        if message.role not in ("system", "user", "assistant"):
            raise BadRequest("bad_message", f"message {index}: role {message.role!r}; use system, user or assistant.")
        parts = [message.content] if isinstance(message.content, str) else list(message.content or [])
        texts, count = [], 0
        for part in parts:
            if isinstance(part, str) or part.type == "text":
                texts.append(part if isinstance(part, str) else part.text)
            elif part.type == "image_url" and message.role == "user":
                count += 1
                if len(images) + 1 > limits.max_images:
                    raise BadRequest("too_many_images", f"more than {limits.max_images} image(s) in the request; "
                                                        f"this server takes at most max_images={limits.max_images}.")
                data = image_bytes(_image_url(part), len(images) + 1, limits.allow_local_paths)
                images.append(decode_image(data, len(images) + 1, limits.max_image_pixels))
            else:
                raise BadRequest("bad_message", f"message {index}: a {part.type!r} part in a {message.role} message; "
                                                "user messages take text and image_url parts, others text.")
        turns.append((message.role, " ".join(texts), count))
    if not turns or turns[-1][0] != "user":
        raise BadRequest("bad_message", "the last message must be the user's question.")
    if limits.require_image and not images:
        raise BadRequest("no_image", "the request has no image, and this model answers questions about images; add "
                                     "an image_url part (or start the server with require_image=false).")
    history = [{"role": role, "content": [{"type": "image"}] * count + [{"type": "text", "text": text}]}
               if role == "user" else assistant_message(text) if role == "assistant"
               else {"role": role, "content": [{"type": "text", "text": text}]} for role, text, count in turns[:-1]]
    sampled = "temperature" in request.model_fields_set and (request.temperature or 0.0) > 0
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return ChatInput(history=history, question=turns[-1][1], question_images=turns[-1][2], images=images,
                     policy=policy, max_new_tokens=max_new_tokens, temperature=request.temperature if sampled else 0.0,
                     top_p=request.top_p if sampled else 1.0, stop=stop, stream=bool(request.stream))


# --- the HTTP side: LitServe's OpenAI spec with dyvte's request checks, extension field and stats ---------------


class ServeStats:
    """What the server answered (per policy: exits and FLOPs saved) and refused (per kind)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.exits: dict[str, ExitStats] = {}
        self.flops_saved: dict[str, list[float]] = {}
        self.refused = Counter()
        self.in_flight = 0  # accepted requests not answered yet

    def answered(self, extension: dict) -> None:
        policy = extension["policy"]
        self.exits.setdefault(policy, ExitStats()).exit_layers.append(extension["exit_layer"])
        self.flops_saved.setdefault(policy, []).append(extension["flops_saved"])

    def summary(self) -> dict:
        policies = {}
        for name, stats in self.exits.items():
            saved = self.flops_saved[name]
            policies[name] = {**stats.summary(self.num_layers), "mean_flops_saved": sum(saved) / len(saved)}
        exits = [layer for stats in self.exits.values() for layer in stats.exit_layers]
        return {"answered": len(exits), "in_flight": self.in_flight, "refused": sum(self.refused.values()),
                "refused_by_kind": dict(self.refused),
                "num_layers": self.num_layers, "histogram": {k: exits.count(k) for k in sorted(set(exits))},
                "policies": policies}


class ExitOpenAISpec(OpenAISpec):
    """`OpenAISpec` whose requests are checked before they are queued (a bad one gets its 4xx alone: LitServe's
    batch loop fails a whole batch on one request's error), whose responses carry the `dyvte` extension, and which
    serves `GET /v1/dyvte/stats`."""

    def __init__(self, limits: RequestLimits, num_layers: int):
        super().__init__()
        self.limits = limits
        self.stats = ServeStats(num_layers)

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint(STATS_PATH, self.stats_endpoint, ["GET"])

    async def stats_endpoint(self) -> dict:
        return self.stats.summary()

    async def chat_completion(self, request: ExitChatRequest, background_tasks: BackgroundTasks):
        try:
            parse_request(request, self.limits)
        except BadRequest as error:
            self.stats.refused[error.kind] += 1
            raise
        self.stats.in_flight += 1
        if request.stream:  # answered when the stream ends (`streaming_completion`)
            return await super().chat_completion(request, background_tasks)
        try:
            return await super().chat_completion(request, background_tasks)
        finally:
            self.stats.in_flight -= 1

    async def _with_extension(self, responses, extension: dict):
        """`responses` as they come from the model worker, with the `dyvte` field of the last one copied into
        `extension` (and a worker-side refusal raised as its HTTP error)."""
        async for response, status in responses:
            if status == LitAPIStatus.OK:
                found = json.loads(response).get("dyvte")
                if found and "error" in found:
                    self.stats.refused[found["kind"]] += 1
                    raise HTTPException(status_code=found["status"], detail=found["error"])
                if found:
                    extension.update(found)
                    self.stats.answered(found)
            yield response, status

    async def non_streaming_completion(self, request: ExitChatRequest, generator_list: list):
        extension = {}
        response = await super().non_streaming_completion(request, [self._with_extension(generator_list[0],
                                                                                         extension)])
        return ExitChatResponse(**response.model_dump(), dyvte=extension)

    async def streaming_completion(self, request: ExitChatRequest, pipe_responses: list):
        extension = {}
        try:
            async for line in super().streaming_completion(request, [self._with_extension(pipe_responses[0],
                                                                                          extension)]):
                if line.startswith("data: {") and '"finish_reason":"stop"' in line:  # the last chunk: the extension
                    chunk = json.loads(line.removeprefix("data: "))
                    line = "data: " + json.dumps({**chunk, "dyvte": extension}) + "\n\n"
                yield line
        finally:
            self.stats.in_flight -= 1


# --- the model worker: batches of checked requests, generated together, streamed token by token -----------------


class _TokenFeed(StoppingCriteria):
    """Hands each decoding step's new tokens (one per sample) to the streaming side; never stops generation."""

    def __init__(self, steps: queue.Queue):
        self.steps = steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.steps.put(input_ids[:, -1].tolist())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Answer:
    """One sample's answer as it grows: its tokens up to the first end-of-sequence token, its text (stripped, cut at
    the first stop string, as the offline answer is) and how much of that text has been sent."""

    def __init__(self, request: ChatInput, processor, eos_ids: set[int]):
        self.request, self.processor, self.eos_ids = request, processor, eos_ids
        self.tokens: list[int] = []
        self.done = False
        self.sent = ""

    def add(self, token: int) -> None:
        if self.done:
            return
        self.tokens.append(token)
        self.done = token in self.eos_ids or len(self.tokens) >= self.request.max_new_tokens

    def text(self) -> str:
        text = self.processor.decode(self.tokens, skip_special_tokens=True).strip()
        for stop in self.request.stop:
            text = text.split(stop)[0]
        return text

    def delta(self, final: bool = False) -> str:
        """The text not sent yet; while generating, held back where it could still change (a partial character)."""
        text = self.text()
        if not final and (text.endswith("\ufffd") or not text.startswith(self.sent)):
            return ""
        new = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += new
        return new


class ExitChatAPI(ls.LitAPI):
    """Loads the model and the served policies (`setup`), answers a batch of `ChatInput`s with one
    `VisualExit.generate` per policy and sampling setting, and streams each answer's text as it is generated."""

    def __init__(self, cfg: dict, model_settings: ModelSettings, limits: RequestLimits, spec: ExitOpenAISpec,
                 max_batch_size: int, batch_timeout: float):
        super().__init__(spec=spec, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.cfg, self.model_settings, self.limits = cfg, model_settings, limits

    def setup(self, device):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process lets requests in flight finish first
        cfg = OmegaConf.create(self.cfg)
        cli.quiet_libraries(cfg.verbose)
        torch.manual_seed(cfg.seed)
        model, self.processor = self.model_settings.load()
        self.processor.tokenizer.padding_side = "left"
        self.engine = VisualExit(model, withdraw=self.model_settings.withdraw)
        self.eos_ids = set(generation_eos_ids(model, self.processor.tokenizer))
        self.shape = flops.DecoderShape.from_config(model.config)
        settings = policy_settings(cfg, self.engine, self.processor, list(self.limits.policies))
        self.policies = {name: build_policy(name, settings) for name in self.limits.policies}

    def decode_request(self, request: ExitChatRequest) -> ChatInput:
        return parse_request(request, self.limits)  # checked in the HTTP server already: cannot fail here

    def batch(self, inputs: list[ChatInput]) -> list[ChatInput]:
        return list(inputs)

    def unbatch(self, output):
        return output

    def predict(self, x):
        """One message per request (a list for a batch) per decoding step while a request of the batch streams (its
        new text; "" for the others), then one last message each: the rest of the text, the usage and the `dyvte`
        extension."""
        batched = isinstance(x, list)
        requests = x if batched else [x]
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.policy, request.temperature, request.top_p), []).append(i)
        for rows in groups.values():
            for step in self._generate([requests[i] for i in rows]):
                out = [{"role": "assistant", "content": ""} for _ in requests]
                for row, message in zip(rows, step):
                    out[row] = message
                yield out if batched else out[0]

    def encode_response(self, output_stream):
        yield from output_stream

    def _inputs(self, requests: list[ChatInput]) -> dict:
        prompts = [chat_prompt(self.processor, r.question, r.question_images, r.history) for r in requests]
        images = [image for r in requests for image in r.images]
        kwargs = {"images": images} if images else {}
        device = next(self.engine.model.parameters()).device
        batch = self.processor(text=prompts, padding=True, return_tensors="pt", **kwargs)
        return {k: v.to(device) for k, v in batch.items()}

    def _generate(self, requests: list[ChatInput]):
        """Steps of one generate call for requests with one policy and sampling setting (see `predict`)."""
        try:
            inputs = self._inputs(requests)
        except Exception as error:  # the processor refuses the batch: find whose request it is, answer the others
            yield from self._generate_one_by_one(requests, error)
            return
        sampling = ({"do_sample": True, "temperature": requests[0].temperature, "top_p": requests[0].top_p}
                    if requests[0].temperature > 0 else {"do_sample": False})
        steps: queue.Queue = queue.Queue()
        result = {}

        def run():
            try:
                result["out"] = self.engine.generate(
                    **inputs, policy=self.policies[requests[0].policy], return_dict_in_generate=True,
                    max_new_tokens=max(r.max_new_tokens for r in requests),
                    stopping_criteria=StoppingCriteriaList([_TokenFeed(steps)]), **sampling)
            except Exception as error:  # raised in the serving thread below, failing this batch with LitServe's 500
                result["error"] = error
            steps.put(None)

        thread = threading.Thread(target=run, name="dyvte-generate")
        thread.start()
        answers = [_Answer(r, self.processor, self.eos_ids) for r in requests]
        stream = any(r.stream for r in requests)  # else one message per request: each is a trip between processes
        while (tokens := steps.get()) is not None:
            for answer, token in zip(answers, tokens):
                answer.add(token)
            if stream:
                yield [{"role": "assistant", "content": answer.delta() if answer.request.stream else ""}
                       for answer in answers]
        thread.join()
        if "error" in result:
            raise result["error"]
        yield self._final(requests, answers, inputs, result["out"])

    def _generate_one_by_one(self, requests: list[ChatInput], batch_error: Exception):
        if len(requests) == 1:
            message = f"the model's processor refused the request: {batch_error}"
            yield [{"role": "assistant", "content": "",
                    "dyvte": {"error": message, "kind": "processor", "status": 422}}]
            return
        for i, request in enumerate(requests):
            for step in self._generate([request]):
                out = [{"role": "assistant", "content": ""} for _ in requests]
                out[i] = step[0]
                yield out

    def _final(self, requests, answers, inputs, out) -> list[dict]:
        """The last message of each request: the rest of its text, its usage and its exit and FLOPs."""
        spent_per_sample, full_per_sample = flops.generated_prefill_flops(self.shape, out, inputs["attention_mask"])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        messages = []
        for i, (request, answer) in enumerate(zip(requests, answers)):
            spent, full = spent_per_sample[i], full_per_sample[i]
            messages.append({
                "role": "assistant", "content": answer.delta(final=True),
                "prompt_tokens": prompt_tokens[i], "completion_tokens": len(answer.tokens),
                "total_tokens": prompt_tokens[i] + len(answer.tokens),
                "dyvte": {"policy": request.policy, "exit_layer": int(out.exit_layer[i]),
                          "num_layers": self.shape.num_layers, "flops_saved": 1 - spent / full,
                          "batch_size": len(requests),
                          "lm_prefill_tflops": spent / 1e12, "full_model_tflops": full / 1e12},
            })
        return messages


# --- start-up: checks before any model time, then LitServe --------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Fail now, naming the fix, if `host:port` cannot be bound (LitServe would fail after loading the model)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise SystemExit(f"port={port} on {host} is not free ({error.strerror}): stop the process that holds it, "
                             f"or start the server on another port (port=...).") from None


def check_heads(cfg, policies: tuple[str, ...], config) -> None:
    """A served policy that needs heads (dynamic exit) needs heads that exist and were trained on this model."""
    needing = [name for name in policies if needs_heads(name)]
    if not needing:
        return
    try:
        heads = ExitHeads.from_pretrained(cfg.heads)
    except (OSError, ValueError) as error:  # no such folder, no heads in it, or not a Hub id either
        raise SystemExit(f"policies {needing} need exit heads, but heads={cfg.heads} has none ({error}): train them "
                         "(dyvte-train) and pass heads=DIR, or serve without them (policy=none policies=[none]).")
    try:
        heads.check_fits(SimpleNamespace(config=config), cfg.model.name_or_path, cfg.model.revision)  # reads .config
    except ValueError as error:
        raise SystemExit(f"heads={cfg.heads}: {error} Pass heads trained on model={cfg.model.name_or_path} "
                         "(heads=DIR), or the model they were trained on (model=...).") from None


def check_searched_schedules(cfg, policies: tuple[str, ...]) -> None:
    """Searched schedules are loaded, not searched, by a server: the search belongs to `infer.py task=eval`."""
    parts = {part for name in policies for part in name.split("+")}
    for method in sorted(parts, key=POLICY_NAMES.index):
        if REGISTRY[method].kind == SCHEDULE and not cfg[method].path:
            raise SystemExit(f"policy {method} needs its saved keep rates when served: {method}.path=FILE (search "
                             f"them with `dyvte-infer task=eval policies=[{method}]`, which saves {method}.json).")


class _GracefulStop:
    """SIGTERM / SIGINT in the main process: the HTTP server stops taking requests and finishes those in flight
    (uvicorn's own graceful shutdown, while the model worker still answers); then LitServe stops the rest."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.main_pid = os.getpid()

    def __call__(self, signum, frame):
        if os.getpid() != self.main_pid:  # a process LitServe forked from this one: the signal's default action
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("stopping: finishing the requests in flight")
        http_servers = [p for p in multiprocessing.active_children() if p.name.startswith("LitServer-")]
        for process in http_servers:
            process.terminate()
        for process in http_servers:
            process.join(self.timeout)
        raise KeyboardInterrupt


@hydra.main(config_path="conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_serve_config(cfg)
    cli.quiet_libraries(cfg.verbose)
    policies = tuple(dict.fromkeys([cfg.policy, *cfg.policies]))
    parts = check_policy_names(list(policies), "policies")
    check_port(cfg.host, cfg.port)
    check_searched_schedules(cfg, policies)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name_or_path), revision=cfg.model.revision)
    check_heads(cfg, policies, config)
    check_policy_needs(cfg, parts, config)
    limits = RequestLimits(policies=policies, default_policy=cfg.policy, max_new_tokens=cfg.max_new_tokens,
                           max_tokens=cfg.max_tokens, max_images=cfg.max_images,
                           max_image_pixels=cfg.max_image_pixels, require_image=cfg.require_image,
                           allow_local_paths=cfg.allow_local_paths)
    spec = ExitOpenAISpec(limits, config.get_text_config(decoder=True).num_hidden_layers)
    api = ExitChatAPI(OmegaConf.to_container(cfg, resolve=True), read_model_settings(cfg), limits, spec,
                      cfg.max_batch_size, cfg.batch_timeout)
    server = ls.LitServer(api, accelerator="auto", timeout=cfg.request_timeout)
    signal.signal(signal.SIGTERM, _GracefulStop(server.uvicorn_graceful_timeout))
    signal.signal(signal.SIGINT, _GracefulStop(server.uvicorn_graceful_timeout))
    log.info("serving %s with policies %s on http://%s:%d/v1/chat/completions", cfg.model.name_or_path,
             list(policies), cfg.host, cfg.port)
    try:
        server.run(host=cfg.host, port=cfg.port, num_api_servers=1, generate_client_file=False,
                   log_level="info" if cfg.verbose else "warning")
    except RuntimeError as error:  # LitServe: the model worker's setup failed; its traceback is above
        raise SystemExit(f"the model worker failed to start (its error is above): {error}") from None


def cli_main() -> None:
    """`dyvte-serve` / `python -m dyvte.serve` / the repository's `serve.py`: `-v` is `verbose=true`."""
    cli.verbose_flag()
    main()


if __name__ == "__main__":
    cli_main()
