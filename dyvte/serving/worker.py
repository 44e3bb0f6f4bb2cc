"""The model worker: LitServe's `LitAPI` that answers a batch of checked requests (`ChatInput`s).

A batch is split into generate calls by policy and prompt length (`prompt_groups`, shortest first; requests with an
`exit_layer` form one policy, a static exit at each one's layer), each answered by one `VisualExit.generate` in which
every sample leaves at its own exit layer, greedy and sampled rows together
(`RequestSampler`). An exception fails only the request it belongs to: a group that raises is retried one request
at a time, and a request that still fails alone gets its own error; the others are answered.

`predict` yields one message per request (a list, in batch order) per step:
- first, for every request: `{"text": ""}` (accepted), or `{"error", "status", "kind"}` if the processor refuses it;
- while a group with a streaming request decodes: `{"text": delta}` for its streaming requests, None for the others;
- last, per request: `{"text": rest, "finish_reason", "usage", "dyvte"}`, or its error.
"""

import logging
import queue
import signal
import threading
import time

import litserve as ls
import torch
from omegaconf import OmegaConf
from transformers import LogitsProcessorList, StoppingCriteriaList

from dyvte import VisualExit, cli, flops
from dyvte.engine import ExitPolicy
from dyvte.engine.visual_exit import generation_eos_ids
from dyvte.evaluation.policy_config import policy_settings
from dyvte.loading import ModelSettings
from dyvte.policies.exit import StaticExit
from dyvte.policies.registry import build_policy
from dyvte.prompts import chat_prompt

from .answers import AnswerFeed, AnswerText, RequestSampler, prompt_groups
from .requests import STATIC_EXIT, ChatInput, RequestLimits

log = logging.getLogger("serve")


def error_message(status: int, kind: str, error: Exception | str) -> dict:
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"error": detail, "status": status, "kind": kind}


class ExitChatAPI(ls.LitAPI):
    """Loads the model and the served policies (`setup`) and answers batches of `ChatInput`s (`predict`)."""

    def __init__(self, cfg: dict, model_settings: ModelSettings, limits: RequestLimits, spec,
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

    def decode_request(self, request: ChatInput) -> ChatInput:
        return request  # parsed and checked in the HTTP process (`dyvte.serving.requests.parse_request`)

    def batch(self, inputs: list[ChatInput]) -> list[ChatInput]:
        return list(inputs)

    def unbatch(self, output):
        return output

    def encode_response(self, output_stream):
        yield from output_stream

    def predict(self, x):
        """The messages of a batch (see the module docstring); a single request gets its messages unwrapped."""
        batched = isinstance(x, list)
        requests = x if batched else [x]
        groups = prompt_groups([r.policy for r in requests], [r.prompt_tokens for r in requests])
        first = [{"text": ""} for _ in requests]
        prepared = [part for rows in groups for part in self._prepared([requests[i] for i in rows], rows, first)]
        yield first if batched else first[0]
        for rows, inputs in prepared:
            for step in self._answer([requests[i] for i in rows], inputs):
                out = [None] * len(requests)
                for row, message in zip(rows, step):
                    out[row] = message
                yield out if batched else out[0]

    # --- one group ------------------------------------------------------------------------------------------------

    def _inputs(self, requests: list[ChatInput]) -> dict:
        prompts = [chat_prompt(self.processor, r.question, r.question_images, r.history) for r in requests]
        images = [image for r in requests for image in r.images]
        batch = self.processor(text=prompts, padding=True, return_tensors="pt", **({"images": images} if images else {}))
        device = next(self.engine.model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    def _prepared(self, requests: list[ChatInput], rows: list[int], first: list) -> list[tuple[list[int], dict]]:
        """[(rows, processor inputs)] of a group, or of each of its requests alone if the processor refuses the
        group; a request the processor refuses alone gets its error in `first` instead."""
        try:
            return [(rows, self._inputs(requests))]
        except Exception as error:  # noqa: BLE001 (found below: whose request it is)
            if len(requests) == 1:
                first[rows[0]] = error_message(400, "processor", f"the model's processor refused the request: "
                                                                 f"{type(error).__name__}: {error}")
                return []
        return [part for row, request in zip(rows, requests) for part in self._prepared([request], [row], first)]

    def _answer(self, requests: list[ChatInput], inputs: dict, sent: list[str] | None = None):
        """The steps of one group's answers: one generate call, retried one request at a time if it raises."""
        answers = [AnswerText(self._decode, self.eos_ids, r.max_new_tokens, r.stop, s)
                   for r, s in zip(requests, sent or [""] * len(requests))]
        steps = self._generate(requests, inputs, answers)
        try:
            yield from steps
            return
        except Exception as error:  # (a failed generate call: whose request is found by retrying)
            if len(requests) == 1:
                log.exception("generate failed for a request alone")
                yield [error_message(500, "generate", f"generation failed for this request: {type(error).__name__}: "
                                                      f"{error}")]
                return
            log.warning("a generate call of %d requests failed (%s); retrying them one at a time", len(requests),
                        error)
        for i, request in enumerate(requests):
            refusal = [None]
            prepared = self._prepared([request], [0], refusal)
            steps = self._answer([request], prepared[0][1], [answers[i].sent]) if prepared else [refusal]
            for step in steps:
                out = [None] * len(requests)
                out[i] = step[0]
                yield out

    def _generate(self, requests: list[ChatInput], inputs: dict, answers: list[AnswerText]):
        """One generate call in a thread; while a streaming request is in it, a message per decoding step."""
        streaming = any(r.stream for r in requests)
        steps: queue.Queue = queue.Queue()
        feed = AnswerFeed(answers, on_step=(lambda: steps.put(True)) if streaming else (lambda: None))
        sampled = [(r.temperature, r.top_p, r.seed) if r.temperature > 0 else None for r in requests]
        processors = LogitsProcessorList([RequestSampler(sampled)] if any(sampled) else [])
        result = {}

        def run():
            start = time.perf_counter()
            try:
                result["out"] = self.engine.generate(
                    **inputs, policy=self._policy(requests), return_dict_in_generate=True, do_sample=False,
                    max_new_tokens=max(r.max_new_tokens for r in requests),
                    logits_processor=processors, stopping_criteria=StoppingCriteriaList([feed]))
            except Exception as error:  # noqa: BLE001 (raised below, in the serving thread)
                result["error"] = error
            result["model_s"] = time.perf_counter() - start
            steps.put(None)

        thread = threading.Thread(target=run, name="dyvte-generate")
        thread.start()
        while steps.get() is not None:
            yield [{"text": answer.delta()} if request.stream else None for request, answer in zip(requests, answers)]
        thread.join()
        if "error" in result:
            raise result["error"]
        yield self._final(requests, answers, inputs, result["out"], result["model_s"])

    def _policy(self, requests: list[ChatInput]) -> ExitPolicy:
        """The policy of a group: the served one its requests name, or for `STATIC_EXIT` requests a static exit at
        each one's own `exit_layer` (one prefill, every sample leaving at its own layer)."""
        if requests[0].policy == STATIC_EXIT:
            return StaticExit([r.exit_layer for r in requests])
        return self.policies[requests[0].policy]

    def _decode(self, tokens: list[int]) -> str:
        return self.processor.decode(tokens, skip_special_tokens=True)

    def _final(self, requests, answers, inputs, out, model_s: float) -> list[dict]:
        """The last message of each request: the rest of its text, why it finished, its usage, exit, FLOPs and the
        wall time of the generate call that answered it (`model_s`, shared by its group: what the rest of the
        request's latency is not)."""
        spent_per_sample, full_per_sample = flops.generated_prefill_flops(self.shape, out, inputs["attention_mask"])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        messages = []
        for i, (request, answer) in enumerate(zip(requests, answers)):
            spent, full = spent_per_sample[i], full_per_sample[i]
            messages.append({
                "text": answer.rest(), "finish_reason": answer.finish_reason or "length",
                "usage": {"prompt_tokens": prompt_tokens[i], "completion_tokens": len(answer.tokens),
                          "total_tokens": prompt_tokens[i] + len(answer.tokens)},
                "dyvte": {"policy": request.policy, "exit_layer": int(out.exit_layer[i]),
                          "num_layers": self.shape.num_layers, "flops_saved": 1 - spent / full,
                          "batch_size": len(requests), "seed": request.seed,
                          "lm_prefill_tflops": spent / 1e12, "full_model_tflops": full / 1e12, "model_s": model_s},
            })
        return messages
