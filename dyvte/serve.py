"""Serve an MLLM with visual-token exit behind an OpenAI-compatible chat endpoint, on LitServe.

    python serve.py heads=DIR policy=dynamic port=8000
    dyvte-serve model=qwen2vl2b heads=DIR policies=[none,dynamic,fastv+dynamic]

`POST /v1/chat/completions` takes OpenAI chat requests with image parts (base64 data URLs; server paths when
`allow_local_paths=true`; URLs are never fetched) and an optional `"policy"` field naming one of `policies`.
LitServe batches requests from different clients (`max_batch_size`, `batch_timeout`); the model worker answers a
batch with one `VisualExit.generate` call per policy and prompt-length group, and each sample leaves at its own exit
layer. Answers stream as their text settles (`"stream": true`), the same text a non-streaming request gets. Every
response carries a `"dyvte"` field: the policy, the exit layer and the share of LM prefill FLOPs it saved.
`GET /v1/dyvte/stats` counts every request in one outcome (answered, refused, failed, abandoned) and gives the exit
histogram; `GET /health` is 200 once the model is loaded.

Processes (LitServe's): this one checks the config, the port, the heads and the processor before any model time,
then starts an HTTP server (which checks every request field by field, so a bad one gets its own 4xx and never
reaches a batch: `dyvte.serving.requests`) and one model worker (which loads the model and answers batches:
`dyvte.serving.worker`). SIGTERM or Ctrl-C stops taking requests, lets the ones in flight finish, then exits.
"""

import logging
import multiprocessing
import os
import signal
import socket
from types import SimpleNamespace

from dyvte.extras import check_installed

check_installed("litserve", "serve", "dyvte-serve (python serve.py)")  # before the imports below fail unnamed

import hydra
import litserve as ls
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from dyvte import cli
from dyvte.configs import check_serve_config, read_model_settings
from dyvte.heads import ExitHeads
from dyvte.images import check_image_processor
from dyvte.loading import resolve_model_path
from dyvte.policies.registry import POLICY_NAMES, REGISTRY, SCHEDULE, needs_heads
from dyvte.preflight import check_policy_names, check_policy_needs
from dyvte.serving.http import (
    BodyLimits,
    ExitOpenAISpec,
    Outcomes,
    ServeStats,
    head_timeout_protocol,
    install_error_handlers,
)
from dyvte.serving.requests import PromptLength, RequestLimits
from dyvte.serving.worker import ExitChatAPI

cli.register_resolvers()
log = logging.getLogger("serve")


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


def max_prompt_tokens(cfg, config) -> int:
    """`max_prompt_tokens`, or (null) what the model's context leaves after the longest answer (`max_tokens`)."""
    context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    if cfg.max_prompt_tokens is None:
        if context is None:
            raise SystemExit("the model's config gives no max_position_embeddings, so max_prompt_tokens has no "
                             "default: set max_prompt_tokens=N.")
        if context <= cfg.max_tokens:
            raise SystemExit(f"max_tokens={cfg.max_tokens} leaves no room for a prompt in the model's "
                             f"max_position_embeddings={context}: lower max_tokens.")
        return context - cfg.max_tokens
    if context is not None and cfg.max_prompt_tokens + cfg.max_tokens > context:
        log.warning("max_prompt_tokens=%d + max_tokens=%d exceed the model's max_position_embeddings=%d: longer "
                    "sequences than the model was trained on will be answered", cfg.max_prompt_tokens,
                    cfg.max_tokens, context)
    return cfg.max_prompt_tokens


def request_prompt_length(cfg) -> PromptLength:
    """The HTTP process's prompt counter (`PromptLength`) on the model's processor, whose image processor is checked
    to have an image-size rule (`dyvte.images`), before any model time."""
    processor = read_model_settings(cfg).load_processor()
    try:
        check_image_processor(processor.image_processor)
        return PromptLength(processor)
    except (ValueError, AttributeError, NotImplementedError) as error:
        raise SystemExit(f"model={cfg.model.name_or_path}: {error}") from None


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
    num_layers = config.get_text_config(decoder=True).num_hidden_layers
    limits = RequestLimits(policies=policies, default_policy=cfg.policy, max_new_tokens=cfg.max_new_tokens,
                           max_tokens=cfg.max_tokens, max_prompt_tokens=max_prompt_tokens(cfg, config),
                           max_images=cfg.max_images, max_image_pixels=cfg.max_image_pixels,
                           require_image=cfg.require_image, allow_local_paths=cfg.allow_local_paths,
                           allow_exit_layer=cfg.allow_exit_layer, num_layers=num_layers)
    stats = ServeStats(num_layers)
    spec = ExitOpenAISpec(limits, stats, request_prompt_length(cfg))
    api = ExitChatAPI(OmegaConf.to_container(cfg, resolve=True), read_model_settings(cfg), limits, spec,
                      cfg.max_batch_size, cfg.batch_timeout)
    body_limits = {"max_bytes": cfg.max_request_bytes, "read_timeout": cfg.read_timeout,
                   "idle_timeout": cfg.idle_timeout}
    server = ls.LitServer(api, accelerator="auto", timeout=cfg.request_timeout,
                          middlewares=[(BodyLimits, body_limits), (Outcomes, {"stats": stats})])  # Outcomes outermost
    install_error_handlers(server.app)
    signal.signal(signal.SIGTERM, _GracefulStop(server.uvicorn_graceful_timeout))
    signal.signal(signal.SIGINT, _GracefulStop(server.uvicorn_graceful_timeout))
    log.info("serving %s with policies %s on http://%s:%d/v1/chat/completions", cfg.model.name_or_path,
             list(policies), cfg.host, cfg.port)
    try:
        server.run(host=cfg.host, port=cfg.port, num_api_servers=1, generate_client_file=False,
                   log_level="info" if cfg.verbose else "warning", http=head_timeout_protocol(cfg.read_timeout),
                   timeout_keep_alive=cfg.idle_timeout)
    except RuntimeError as error:  # LitServe: the model worker's setup failed; its traceback is above
        raise SystemExit(f"the model worker failed to start (its error is above): {error}") from None


def cli_main() -> None:
    """`dyvte-serve` / `python -m dyvte.serve` / the repository's `serve.py`: `-v` is `verbose=true`."""
    cli.verbose_flag()
    main()


if __name__ == "__main__":
    cli_main()
