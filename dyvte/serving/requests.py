"""What a chat request may hold, checked in the HTTP process before it is queued: a bad request gets its own 4xx
naming the field (and the limit or the fix) and never reaches a batch.

The body is parsed by `ExitChatRequest`, a strict schema: unknown fields, wrong types, non-finite numbers and content
parts whose `type` does not match their fields are 400s naming the field (`validation_message`). `parse_request` then
checks what the schema cannot: sampling settings that `generate` would refuse or cannot sample in float32, stop
strings, `max_tokens`, the policy or `exit_layer`, the messages, each image (its size before and after the
processor's resize, from its header, before decoding: `dyvte.images`) and the prompt's length in tokens as the
processor counts it (`PromptLength`, without running the image processor).
"""

import base64
import binascii
import functools
import io
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dyvte.images import image_size_problem
from dyvte.prompts import assistant_message, chat_prompt

#: The coldest sampling temperature served: below it, logits / temperature overflow float32 for ordinary logits (and
#: sampling is greedy decoding in all but name); temperature 0 is greedy decoding. OpenAI's range ends at 2.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0
#: At most this many stop strings (OpenAI's limit).
MAX_STOPS = 4
#: `seed` is a signed 64-bit integer, as in OpenAI's API.
SEED_RANGE = (-(2**63), 2**63 - 1)
#: The policy name of a request with an `exit_layer` (a static exit at its layer; not a registered policy name).
STATIC_EXIT = "exit_layer"


class BadRequest(HTTPException):
    """A request the server refuses: HTTP `status` (4xx), a short `kind` (counted in the stats) and a message that
    names the problem and the fix."""

    def __init__(self, kind: str, detail: str, status: int = 400):
        super().__init__(status_code=status, detail=detail)
        self.kind = kind


# --- the schema: strict, every field named -----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto"] = "auto"  # low / high resolution modes are not served


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, value):  # LitServe's clients send {"image_url": "data:..."}; OpenAI's an object
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ExitChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value):  # "content": "text" is one text part
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class ExitChatRequest(_Strict):
    """An OpenAI chat completion request, as far as this server answers it, and dyvte's `policy` (one of the
    server's `policies`; None: its default `policy`) or `exit_layer` (a static exit at that layer, where the server
    allows it). A field not listed here is refused, not ignored."""

    model: str = ""
    messages: list[ExitChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, allow_inf_nan=False)
    top_p: float | None = Field(None, allow_inf_nan=False)
    n: int = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    policy: str | None = None
    exit_layer: object = None  # any JSON value: `check_exit_layer` refuses a non-integer naming the range

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value):
        if value is None or isinstance(value, str) or (isinstance(value, list)
                                                        and all(isinstance(s, str) for s in value)):
            return value
        raise ValueError("must be a string or a list of strings")


def validation_message(errors: list[dict]) -> tuple[str, str]:
    """(kind, message) of a request the schema refused (pydantic's or FastAPI's errors), naming each field."""
    parts, kinds = [], set()
    for error in errors[:4]:
        loc = [part for part in error["loc"] if part != "body"]
        loc = [part for i, part in enumerate(loc) if not (i >= 2 and loc[i - 2] == "content"  # a part's type tag
                                                          and isinstance(loc[i - 1], int))]
        path = ".".join(map(str, loc)) or "the body"
        if error["type"] == "json_invalid":
            kinds.add("invalid_json")
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})")
        elif error["type"] == "extra_forbidden":
            kinds.add("unsupported_field")
            parts.append(f"{path}: this server does not support this field; leave it out")
        else:
            kinds.add("bad_request")
            parts.append(f"{path}: {error['msg'].removeprefix('Value error, ')}")
    more = f" (and {len(errors) - 4} more)" if len(errors) > 4 else ""
    return (kinds.pop() if len(kinds) == 1 else "bad_request"), "; ".join(parts) + more + "."


# --- what the server accepts, and a checked request ---------------------------------------------------------------


@dataclass
class RequestLimits:
    """What the server accepts (`conf/serve.yaml`)."""

    policies: tuple[str, ...]
    default_policy: str
    max_new_tokens: int  # a request's max_tokens when it gives none
    max_tokens: int
    max_prompt_tokens: int
    max_images: int
    max_image_pixels: int
    require_image: bool
    allow_local_paths: bool
    allow_exit_layer: bool
    num_layers: int  # the served model's decoder depth L: an exit layer is one of 0..L


@dataclass
class ChatInput:
    """One checked request, as the model worker gets it: the chat turns before the question, the question, its
    images (decoded, in order), the policy (`STATIC_EXIT` with its `exit_layer`, or a served policy's name), the
    prompt's length in tokens, how many tokens to generate and how (temperature 0: greedy; else sampled with
    `seed`'s own generator), and where to cut the answer."""

    history: list[dict]
    question: str
    question_images: int
    images: list[Image.Image]
    policy: str
    prompt_tokens: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    exit_layer: int | None = None  # the static exit of a `STATIC_EXIT` request


# --- field by field ---------------------------------------------------------------------------------------------


def check_unsupported(request: ExitChatRequest) -> None:
    """Fields the schema takes so that their refusal can name the fix."""
    if request.n != 1:
        raise BadRequest("bad_request", f"n={request.n}: the server answers once per request (n=1).")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0):
            raise BadRequest("unsupported_field", f"{name}={getattr(request, name)} is not supported by this server; "
                                                  f"leave {name} out (or 0).")
    if request.logprobs:
        raise BadRequest("unsupported_field", "logprobs=true is not supported by this server; leave logprobs out "
                                              "(or false).")
    if request.top_logprobs is not None:
        raise BadRequest("unsupported_field", "top_logprobs is not supported by this server (it returns no "
                                              "logprobs); leave it out.")


def check_sampling(request: ExitChatRequest) -> tuple[float, float, int | None]:
    """(temperature, top_p, seed): temperature 0 (or none given) is greedy decoding, where top_p and seed do not
    matter; sampling gets the request's seed, or a fresh one that the response reports."""
    temperature = request.temperature or 0.0
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise BadRequest("bad_request", f"temperature={request.temperature} is outside {MIN_TEMPERATURE}.."
                                        f"{MAX_TEMPERATURE} (below {MIN_TEMPERATURE}, logits / temperature overflow "
                                        "float32); use 0 for greedy decoding.")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise BadRequest("bad_request", f"top_p={request.top_p} is outside (0, 1]: it is the probability mass "
                                        "sampled from (1: all of it).")
    if request.seed is not None and not SEED_RANGE[0] <= request.seed <= SEED_RANGE[1]:
        raise BadRequest("bad_request", f"seed={request.seed} is not a signed 64-bit integer.")
    if temperature == 0:
        return 0.0, 1.0, None
    return temperature, top_p, request.seed if request.seed is not None else secrets.randbits(63)


def check_stop(request: ExitChatRequest) -> list[str]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOPS:
        raise BadRequest("bad_request", f"stop has {len(stop)} strings; at most {MAX_STOPS} are allowed.")
    if "" in stop:
        raise BadRequest("bad_request", "stop holds an empty string, which would cut every answer before it "
                                        "starts; give non-empty stop strings.")
    return stop


def check_max_tokens(request: ExitChatRequest, limits: RequestLimits) -> int:
    given = {name: getattr(request, name) for name in ("max_completion_tokens", "max_tokens")
             if getattr(request, name) is not None}
    if len(set(given.values())) > 1:
        raise BadRequest("max_tokens", f"max_completion_tokens={given['max_completion_tokens']} and max_tokens="
                                       f"{given['max_tokens']} differ; give one of them.")
    name, value = next(iter(given.items()), ("max_tokens", limits.max_new_tokens))
    if not 1 <= value <= limits.max_tokens:
        raise BadRequest("max_tokens", f"{name}={value} is outside 1..{limits.max_tokens}, this server's limit (its "
                                       "max_tokens setting).")
    return value


def check_exit_layer(request: ExitChatRequest, limits: RequestLimits) -> int | None:
    """A request's `exit_layer` (None: it gives none): an integer in 0..L, where the server allows it."""
    if request.exit_layer is None:
        return None
    if not limits.allow_exit_layer:
        raise BadRequest("exit_layer", "exit_layer is not allowed by this server; leave it out, or start the server "
                                       "with allow_exit_layer=true.")
    layer = request.exit_layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= limits.num_layers:
        raise BadRequest("exit_layer", f"exit_layer={json.dumps(layer)} is not an integer in 0..{limits.num_layers} "
                                       f"(0: text only, {limits.num_layers}: the full model, which has "
                                       f"{limits.num_layers} decoder layers).")
    if request.policy is not None:
        raise BadRequest("exit_layer", f"exit_layer and policy={request.policy!r} are both given; a request with an "
                                       "exit_layer is answered by a static exit at that layer: give one of them.")
    return layer


def check_policy(request: ExitChatRequest, limits: RequestLimits) -> str:
    policy = request.policy or limits.default_policy
    if policy not in limits.policies:
        raise BadRequest("unknown_policy", f"policy {policy!r} is not served; this server serves "
                                           f"{', '.join(limits.policies)} (start it with policies=[...] for others).")
    return policy


# --- images -----------------------------------------------------------------------------------------------------


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


def decode_image(data: bytes, number: int, max_pixels: int, image_processor) -> Image.Image:
    """The RGB image in `data`. Its size is checked from the header before any pixel is decoded, as sent and after the
    model's image processor resizes it (a small file can claim billions of pixels, and a thin image can be resized
    into billions): `dyvte.images.image_size_problem`, a 413 naming the limit."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            problem = image_size_problem(image_processor, width, height, max_pixels, "this server's max_image_pixels",
                                         "send a smaller image")
            if problem:
                raise BadRequest("image_too_large", f"image {number} {problem}.", status=413)
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # PIL's own limit, far above ours: refused before the size is read
        raise BadRequest("image_too_large", f"image {number} is a decompression bomb ({error}); this server takes at "
                                            f"most max_image_pixels={max_pixels}.", status=413) from None
    except UnidentifiedImageError:
        raise BadRequest("not_an_image", f"image {number} is not an image PIL can read (PNG, JPEG, ...).") from None
    except OSError as error:
        raise BadRequest("not_an_image", f"image {number} cannot be decoded ({error}).") from None


# --- messages ---------------------------------------------------------------------------------------------------


def parse_messages(request: ExitChatRequest, limits: RequestLimits, image_processor) -> tuple[list, str, int, list]:
    """(history as chat-template messages, the question, its image count, every image in order)."""
    turns, images = [], []
    for index, message in enumerate(request.messages):
        texts, count = [], 0
        for part in message.content:
            if isinstance(part, TextPart):
                texts.append(part.text)
                continue
            if message.role != "user":
                raise BadRequest("bad_message", f"message {index} ({message.role}) has an image_url part; only user "
                                                "messages take images.")
            count += 1
            if len(images) + 1 > limits.max_images:
                raise BadRequest("too_many_images", f"more than {limits.max_images} image(s) in the request; this "
                                                    f"server takes at most max_images={limits.max_images}.")
            data = image_bytes(part.image_url.url, len(images) + 1, limits.allow_local_paths)
            images.append(decode_image(data, len(images) + 1, limits.max_image_pixels, image_processor))
        turns.append((message.role, " ".join(texts), count))
    if turns[-1][0] != "user":
        raise BadRequest("bad_message", "the last message must be the user's question.")
    if limits.require_image and not images:
        raise BadRequest("no_image", "the request has no image, and this model answers questions about images; add "
                                     "an image_url part (or start the server with require_image=false).")
    history = [{"role": role, "content": [{"type": "image"}] * count + [{"type": "text", "text": text}]}
               if role == "user" else assistant_message(text) if role == "assistant"
               else {"role": role, "content": [{"type": "text", "text": text}]} for role, text, count in turns[:-1]]
    return history, turns[-1][1], turns[-1][2], images


class PromptLength:
    """A prompt's length in tokens, image tokens included, as the model's processor builds it, counted without
    running the image processor (which the model worker runs on the batch anyway): the chat prompt's tokens by the
    tokenizer alone, plus per image the tokens the processor expands its placeholder to, from the image's size (the
    processor's own `_get_num_multimodal_tokens`), plus two constants measured once, here, against the processor
    itself: on a text-only prompt (what the processor adds to any prompt) and on a prompt with one probe image (what
    it adds per image besides those tokens: the placeholder replaced, start and end tokens). A processor without
    `_get_num_multimodal_tokens` fails here, at start-up."""

    #: Image sizes whose token counts are kept (the processor's count validates its keyword arguments each call).
    CACHED_SIZES = 4096

    def __init__(self, processor):
        self.processor, self.tokenizer = processor, processor.tokenizer
        self._tokens_of_size = functools.lru_cache(maxsize=self.CACHED_SIZES)(self._count_image_tokens)
        text_only = chat_prompt(processor, "what is it ?", 0)
        self.per_prompt = self._processor_length(text_only, []) - self._text_tokens(text_only)
        with_image, probe = chat_prompt(processor, "what is it ?", 1), Image.new("RGB", (64, 48))
        self.per_image = (self._processor_length(with_image, [probe]) - self._text_tokens(with_image)
                          - self.per_prompt - self._image_tokens([probe])[0])

    def _processor_length(self, prompt: str, images: list) -> int:
        return len(self.processor(text=[prompt], images=images or None, return_tensors="np")["input_ids"][0])

    def _text_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt)["input_ids"])

    def _count_image_tokens(self, height: int, width: int) -> int:
        return self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0]

    def _image_tokens(self, images: list[Image.Image]) -> list[int]:
        return [self._tokens_of_size(image.height, image.width) for image in images]

    def __call__(self, history: list, question: str, question_images: int, images: list[Image.Image]) -> int:
        prompt = chat_prompt(self.processor, question, question_images, history)
        image_tokens = sum(self._image_tokens(images)) if images else 0
        return self._text_tokens(prompt) + self.per_prompt + image_tokens + self.per_image * len(images)


def parse_request(request: ExitChatRequest, limits: RequestLimits, prompt_length: PromptLength) -> ChatInput:
    """The request as model input (`ChatInput`), or a `BadRequest` naming what is wrong with it (a request the
    processor refuses gets its 400 from the model worker, alone)."""
    check_unsupported(request)
    temperature, top_p, seed = check_sampling(request)
    stop = check_stop(request)
    max_new_tokens = check_max_tokens(request, limits)
    exit_layer = check_exit_layer(request, limits)
    policy = STATIC_EXIT if exit_layer is not None else check_policy(request, limits)
    history, question, question_images, images = parse_messages(request, limits,
                                                                prompt_length.processor.image_processor)
    length = prompt_length(history, question, question_images, images)
    if length > limits.max_prompt_tokens:
        raise BadRequest("prompt_too_long", f"the prompt is {length} tokens (images included), over this server's "
                                            f"max_prompt_tokens={limits.max_prompt_tokens}; send a shorter one.")
    return ChatInput(history=history, question=question, question_images=question_images, images=images,
                     policy=policy, prompt_tokens=length, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed, stop=stop, stream=request.stream, exit_layer=exit_layer)
