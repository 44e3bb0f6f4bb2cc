"""Benchmark-harness requests answered with visual-token exit: batched generation and log-likelihoods.

Kept free of any harness import so it is tested here; `dyvte.lmms_eval_plugin` adapts it to lmms-eval.
"""

from dataclasses import dataclass, field

import torch

from .engine import VisualExit
from .labels import LabelConfig, candidate_exits, dense_labels
from .policies import ExitPolicy


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


class ExitRunner:
    def __init__(self, engine: VisualExit, processor, policy: ExitPolicy):
        self.engine, self.processor, self.policy = engine, processor, policy
        self.processor.tokenizer.padding_side = "left"
        self.stats = ExitStats()

    def _inputs(self, contexts: list[str], images: list[list], continuations: list[str] | None = None) -> dict:
        prompts = []
        for context, visuals in zip(contexts, images):
            content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": context}]
            prompts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                              add_generation_prompt=True))
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
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        positions = self.engine.adapter.generation_position_ids(ids, mask, **vision)
        exits = self.engine.prefill(ids, mask, positions, None, use_cache=False, last_only=True, policy=self.policy,
                                    **vision).exit_layer.cpu()
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
