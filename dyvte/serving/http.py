"""The HTTP process: LitServe's OpenAI spec with dyvte's request checks, responses and stats, and the ASGI and
protocol limits that keep a client from holding the server.

Every `POST /v1/chat/completions` ends in exactly one outcome, decided in one place (`Outcomes`): answered (the whole
response sent), refused (a 4xx), failed (a 5xx, or a stream that ended with an error) or abandoned (the client left
before its response was complete). `GET /v1/dyvte/stats` reports them with the exits of the answered requests.
"""

import asyncio
import json
import pickle
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChoiceDelta,
    OpenAISpec,
    UsageInfo,
)
from litserve.utils import LitAPIStatus, ResponseBufferItem
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from dyvte.evaluation import ExitStats

from .requests import (
    BadRequest,
    ChatInput,
    ExitChatRequest,
    PromptLength,
    RequestLimits,
    parse_request,
    validation_message,
)

STATS_PATH = "/v1/dyvte/stats"
CHAT_PATH = "/v1/chat/completions"
OUTCOME_KEY = "dyvte.outcome"  # the ASGI scope key of a chat request's `Outcome`
#: Requests parsed at once in the HTTP process (each may decode an image and tokenize its prompt).
PARSE_THREADS = 2


# --- outcomes and stats ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one chat request, filled in by whoever knows: the HTTP status sent, the refusal's kind, an
    error that ended a stream after its 200, whether the whole response went out or the client left first, and
    the `dyvte` extension of an answer."""

    status: int | None = None
    kind: str | None = None
    stream_error: int | None = None  # the status of an error sent inside a 200 stream
    complete: bool = False
    disconnected: bool = False
    extension: dict | None = None

    def result(self) -> str:
        if self.disconnected and not self.complete:
            return "abandoned"
        status = self.stream_error or self.status or 500  # no response at all: the app raised (a 500 is sent)
        return "answered" if status < 400 else "refused" if status < 500 else "failed"


class ServeStats:
    """Requests by outcome (refused and failed ones by kind), and per policy the exits and FLOPs saved of the
    answered ones."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.outcomes = Counter()
        self.kinds = {"refused": Counter(), "failed": Counter()}
        self.in_flight = 0
        self.exits: dict[str, ExitStats] = {}
        self.flops_saved: dict[str, list[float]] = {}

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, outcome: Outcome) -> None:
        self.in_flight -= 1
        result = outcome.result()
        self.outcomes[result] += 1
        if result in self.kinds:
            self.kinds[result][outcome.kind or f"http_{outcome.stream_error or outcome.status or 500}"] += 1
        if result == "answered" and outcome.extension:
            policy = outcome.extension["policy"]
            self.exits.setdefault(policy, ExitStats()).exit_layers.append(outcome.extension["exit_layer"])
            self.flops_saved.setdefault(policy, []).append(outcome.extension["flops_saved"])

    def summary(self) -> dict:
        policies = {}
        for name, stats in self.exits.items():
            saved = self.flops_saved[name]
            policies[name] = {**stats.summary(self.num_layers), "mean_flops_saved": sum(saved) / len(saved)}
        exits = [layer for stats in self.exits.values() for layer in stats.exit_layers]
        counts = {result: self.outcomes[result] for result in ("answered", "refused", "failed", "abandoned")}
        return {"requests": sum(counts.values()) + self.in_flight, **counts, "in_flight": self.in_flight,
                "refused_by_kind": dict(self.kinds["refused"]), "failed_by_kind": dict(self.kinds["failed"]),
                "num_layers": self.num_layers, "histogram": {k: exits.count(k) for k in sorted(set(exits))},
                "policies": policies}


class Outcomes:
    """ASGI middleware, outermost: gives each chat request its `Outcome` (in the scope) and counts it in `stats`
    when the request is over. A client that disconnects before its response is complete (seen by a watcher on the
    connection once the body is read) abandoned it."""

    def __init__(self, app, stats: ServeStats):
        self.app, self.stats = app, stats

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        outcome = scope[OUTCOME_KEY] = Outcome()
        watcher: list[asyncio.Task] = []

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            outcome.disconnected = not outcome.complete

        async def tracked_receive():
            message = await receive()
            if message["type"] == "http.disconnect":
                outcome.disconnected = not outcome.complete
            elif not message.get("more_body") and not watcher:
                watcher.append(asyncio.ensure_future(watch()))
            return message

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                outcome.complete = not outcome.disconnected
            await send(message)

        self.stats.started()
        try:
            await self.app(scope, tracked_receive, tracked_send)
        finally:
            for task in watcher:
                task.cancel()
            self.stats.finished(outcome)


# --- limits on the connection: body size, read and idle timeouts ---------------------------------------------------


def refuse(outcome: Outcome | None, kind: str, status: int, detail: str) -> JSONResponse:
    """The response of a refused request (`{"detail": ...}`, as FastAPI's), its kind noted for the stats."""
    if outcome is not None:
        outcome.kind = kind
    return JSONResponse({"detail": detail}, status_code=status)


class BodyLimits:
    """ASGI middleware: a request body larger than `max_bytes` is a 413 (at once when its Content-Length says so);
    one whose next chunk does not come within `idle_timeout` seconds, or that is not complete within `read_timeout`
    seconds, a 408. A slow client cannot hold a connection, or the memory of a body, longer than that."""

    def __init__(self, app, max_bytes: int, read_timeout: float, idle_timeout: float):
        self.app, self.max_bytes = app, max_bytes
        self.read_timeout, self.idle_timeout = read_timeout, idle_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = refuse(scope.get(OUTCOME_KEY), "body_too_large", 413, self._too_large(int(declared)))
            return await response(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        state = {"received": 0, "done": False}

        async def limited_receive():
            if state["done"]:
                return await receive()
            wait = min(self.idle_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0))
            except asyncio.TimeoutError:
                limit = (f"idle_timeout={self.idle_timeout} s" if wait == self.idle_timeout
                         else f"read_timeout={self.read_timeout} s")
                raise BadRequest("body_timeout", f"the request body did not arrive in time (this server's {limit}); "
                                                 "send the body at once.", status=408) from None
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    raise BadRequest("body_too_large", self._too_large(state["received"]), status=413)
                state["done"] = not message.get("more_body")
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: int) -> str:
        return (f"the request body is {size} bytes or more, over this server's max_request_bytes={self.max_bytes}; "
                "send smaller images.")


def head_timeout_protocol(timeout: float) -> type:
    """uvicorn's HTTP protocol (its `auto` choice), closing a connection whose request line and headers are not
    complete within `timeout` seconds of its opening or of its previous response. (uvicorn times out idle
    keep-alive connections, `timeout_keep_alive`, but not a client that sends its headers slowly.)"""

    class HeadTimeoutProtocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timeout()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_head_timeout()

        def _arm_head_timeout(self):
            self.loop.call_later(timeout, self._head_overdue, self.cycle)

        def _head_overdue(self, cycle):
            if self.cycle is cycle and not self.transport.is_closing():  # no new request head since it was armed
                self.transport.close()

    return HeadTimeoutProtocol


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """A body the schema refuses (not JSON, an unknown field, a wrong type): a 400 naming each field."""
    kind, message = validation_message(error.errors())
    return refuse(request.scope.get(OUTCOME_KEY), kind, 400, message)


async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
    return refuse(request.scope.get(OUTCOME_KEY), error.kind, error.status_code, error.detail)


# --- the spec: checks, queueing, responses -------------------------------------------------------------------------


class WorkerError(Exception):
    """The model worker refused or failed this request (`status`, `kind`, `detail`)."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class ExitOpenAISpec(OpenAISpec):
    """LitServe's `OpenAISpec` (its endpoint, its streaming loop) with dyvte's own `chat_completion`: the request is
    checked and turned into a `ChatInput` here, in the HTTP process (`parse_request`, in a thread), so that a bad one
    gets its 4xx alone and never reaches a batch; the answer carries the `dyvte` extension and an honest
    `finish_reason`; `GET /v1/dyvte/stats` reports `ServeStats`."""

    def __init__(self, limits: RequestLimits, stats: ServeStats, prompt_length: PromptLength):
        super().__init__()
        self.limits, self.stats, self.prompt_length = limits, stats, prompt_length
        self._parser: ThreadPoolExecutor | None = None

    def __getstate__(self):  # the model worker gets the spec pickled; it needs none of the HTTP side's state
        return {**super().__getstate__(), "prompt_length": None, "_parser": None}

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint(STATS_PATH, self.stats_endpoint, ["GET"])

    def populate_context(self, context, request):
        """Nothing: the worker gets a `ChatInput`, not the request."""

    async def stats_endpoint(self) -> dict:
        return self.stats.summary()

    async def chat_completion(self, request: ExitChatRequest, http_request: Request):
        outcome: Outcome = http_request.scope[OUTCOME_KEY]
        if self._parser is None:
            self._parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="dyvte-parse")
        chat = await asyncio.get_running_loop().run_in_executor(self._parser, parse_request, request, self.limits,
                                                                self.prompt_length)
        messages = self._worker_messages(chat)
        first = await anext(messages)  # the worker's refusal, if any, comes first: still a proper status
        if chat.stream:
            return StreamingResponse(self._stream(request, first, messages, outcome), media_type="text/event-stream")
        return await self._whole(request, first, messages, outcome)

    async def _worker_messages(self, chat: ChatInput):
        """The model worker's messages for `chat` (see `dyvte.serving.worker`), queued here, up to its last one (not
        the end of its batch); a refusal or failure is raised as `WorkerError`. Its response buffer is removed when
        the request is over, however it ends."""
        uid, queue, event = uuid.uuid4(), deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), chat))
        try:
            async for data, status in self.data_streamer(queue, event, send_status=True):
                if status == LitAPIStatus.ERROR:
                    raise _worker_error(data)
                if data is None:  # a decoding step with nothing for this request
                    continue
                message = json.loads(data)
                if "error" in message:
                    raise WorkerError(message["status"], message["kind"], message["error"])
                yield message
                if "finish_reason" in message:  # its last message: the rest of its batch may take longer
                    return
        finally:
            self.response_buffer.pop(uid, None)

    async def _whole(self, request: ExitChatRequest, first: dict, messages, outcome: Outcome):
        text, last = [first.get("text", "")], first
        async for message in messages:
            text.append(message.get("text", ""))
            last = message
        outcome.extension = last["dyvte"]
        choice = ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content="".join(text)),
                                              finish_reason=last["finish_reason"])
        response = ChatCompletionResponse(model=request.model, choices=[choice], usage=UsageInfo(**last["usage"]))
        return {**response.model_dump(), "dyvte": last["dyvte"]}

    async def _stream(self, request: ExitChatRequest, first: dict, messages, outcome: Outcome):
        """Server-sent events: the text as it settles, then a last chunk with the finish reason, the usage and the
        `dyvte` extension; an error after the first chunk is an `error` event (and the request failed)."""
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"

        def event(delta: ChoiceDelta, finish_reason=None, usage=None, **extra) -> str:
            choice = ChatCompletionStreamingChoice(index=0, delta=delta, finish_reason=finish_reason)
            chunk = ChatCompletionChunk(id=chunk_id, model=request.model, choices=[choice], usage=usage)
            return "data: " + json.dumps({**chunk.model_dump(), **extra}) + "\n\n"

        try:
            yield event(ChoiceDelta(role="assistant", content=first.get("text", "")))
            last = first
            async for message in messages:
                if message.get("text"):
                    yield event(ChoiceDelta(content=message["text"]))
                last = message
            outcome.extension = last["dyvte"]
            yield event(ChoiceDelta(), last["finish_reason"], UsageInfo(**last["usage"]), dyvte=last["dyvte"])
            yield "data: [DONE]\n\n"
        except WorkerError as error:
            outcome.kind, outcome.stream_error = error.kind, error.status
            yield "data: " + json.dumps({"error": {"message": error.detail, "type": error.kind,
                                                   "code": error.status}}) + "\n\n"


def _worker_error(data) -> WorkerError:
    """An error LitServe's loop sent for a request (its own 504 for a request that waited too long in the queue, or
    an exception the worker raised outside dyvte's handling, pickled)."""
    if isinstance(data, HTTPException):
        return WorkerError(data.status_code, "queue_timeout" if data.status_code == 504 else "worker",
                           str(data.detail))
    try:
        error = pickle.loads(data) if isinstance(data, bytes) else data
    except Exception:  # noqa: BLE001 (an error we cannot read is still an error)
        error = data
    return WorkerError(500, "worker", f"the model worker failed: {type(error).__name__}: {error}")


async def worker_error(request: Request, error: WorkerError) -> JSONResponse:
    return refuse(request.scope.get(OUTCOME_KEY), error.kind, error.status, error.detail)


def install_error_handlers(app) -> None:
    """Refusals and failures as responses with their status and a `detail` naming the problem, counted by kind (the
    middlewares go to `LitServer`)."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(WorkerError, worker_error)
