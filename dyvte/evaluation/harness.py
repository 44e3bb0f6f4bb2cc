"""Benchmark-harness requests answered with visual-token exit: batched generation and log-likelihoods.

Kept free of any harness import so it is tested here; `dyvte.evaluation.lmms_eval_plugin` adapts it to lmms-eval.
"""

from dataclasses import dataclass, field

import torch

from ..engine import ExitPolicy, VisualExit
from ..prompts import chat_prompt
from ..training.dense_labels import LabelConfig, candidate_exits, dense_labels


@dataclass
class ExitStats:
    """Where the visual tokens left, over every request answered so far."""

    exit_layers: list[int] = field(default_factory=list)

    def summary(self, num_layers: int) -> dict:
        n = len(self.exit_layers)
        if not n:
            return {"requests": 0}
        return {
            "requests": n,
            "mean_exit_layer": sum(self.exit_layers) / n,
            "num_layers": num_layers,
            "histogram": {k: self.exit_layers.count(k) for k in sorted(set(self.exit_layers))},
        }


def generation_settings(task_kwargs: dict) -> dict:
    """A harness task's generation kwargs as `generate` arguments (`until` and `max_new_tokens` are taken apart).

    As lmms-eval's own models read them: `temperature` 0 (or absent) is greedy decoding, a positive temperature
    samples at that temperature; `top_p`, `top_k`, `num_beams`, `repetition_penalty` and any other `generate`
    argument pass through unchanged (beam search is refused by the engine, naming it)."""
    settings = {k: v for k, v in task_kwargs.items() if k not in ("until", "max_new_tokens")}
    temperature = float(settings.pop("temperature", 0.0) or 0.0)
    settings.setdefault("do_sample", temperature > 0)
    if settings["do_sample"]:
        settings["temperature"] = temperature or 1.0
    else:
        settings.pop("top_p", None), settings.pop("top_k", None)  # sampling-only settings: unused by greedy search
    return settings


class ExitRunner:
    def __init__(self, engine: VisualExit, processor, policy: ExitPolicy):
        self.engine, self.processor, self.policy = engine, processor, policy
        self.processor.tokenizer.padding_side = "left"
        self.stats = ExitStats()

    def _inputs(self, contexts: list[str], images: list[list]) -> dict:
        prompts = [chat_prompt(self.processor, context, len(visuals)) for context, visuals in zip(contexts, images)]
        flat = [image for visuals in images for image in visuals]
        kwargs = {"images": flat} if flat else {}
        device = next(self.engine.model.parameters()).device
        return {k: v.to(device) for k, v in self.processor(text=prompts, padding=True, return_tensors="pt",
                                                            **kwargs).items()}

    @torch.no_grad()
    def generate(self, contexts: list[str], images: list[list], until: list[str] | None = None,
                 max_new_tokens: int = 32, **generation_kwargs) -> list[str]:
        inputs = self._inputs(contexts, images)
        out = self.engine.generate(**inputs, policy=self.policy, max_new_tokens=max_new_tokens,
                                   return_dict_in_generate=True, **generation_kwargs)
        self.stats.exit_layers += out.exit_layer.tolist()
        texts = self.processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until or []:  # cut after generation: HF's stop strings fail on word-level vocabularies
            texts = [text.split(stop)[0] for text in texts]
        return [text.strip() for text in texts]

    @torch.no_grad()
    def loglikelihood(self, contexts: list[str], continuations: list[str], images: list[list]
                      ) -> list[tuple[float, bool]]:
        """Sum of the continuation's log-probabilities and whether greedy decoding yields it, with the exit the
        policy chooses for the prompt (the continuation never influences that choice)."""
        inputs = self._inputs(contexts, images)
        exits = self.engine.prefill(**inputs, policy=self.policy, use_cache=False).exit_layer.cpu()
        self.stats.exit_layers += exits.tolist()
        tokens = [self.processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        candidates = candidate_exits(LabelConfig(layers=[]), [str(i) for i in range(len(tokens))],
                                     self.engine.num_layers)
        candidates[torch.arange(len(tokens)), exits] = True
        scored = dense_labels(self.engine, inputs, tokens, candidates, "after_first_visual",
                              self.processor.tokenizer.pad_token_id)
        rows = torch.arange(len(tokens))
        return [(-float(ce) * len(t), bool(greedy)) for ce, greedy, t in
                zip(scored.ce[rows, exits], scored.match[rows, exits], tokens)]
