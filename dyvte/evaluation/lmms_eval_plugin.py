"""lmms-eval model `dyvte`: any supported Hugging Face MLLM with an exit policy.

    pip install "dyvte[eval]"
    python -m lmms_eval --model dyvte --model_args pretrained=llava-hf/llava-1.5-7b-hf,heads=DIR,policy=dynamic

Registered through the `lmms_eval.models` entry point (see pyproject.toml); the work is done by
`dyvte.evaluation.harness.ExitRunner`, this module only translates lmms-eval's requests.
"""

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..engine import VisualExit
from ..heads import ExitHeads
from ..loading import load_mllm
from ..policies.pruners import FastVSettings
from ..policies.registry import PolicySettings, build_policy
from .harness import ExitRunner, generation_settings


def manifest() -> ModelManifest:
    return ModelManifest(model_id="dyvte", simple_class_path="dyvte.evaluation.lmms_eval_plugin.DyvteModel")


class DyvteModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "testbed", heads: str | None = None, policy: str = "dynamic",
                 threshold: float | None = None, vtw_layer: int | None = None, fastv_layer: int = FastVSettings.layer,
                 fastv_keep_ratio: float = FastVSettings.keep_ratio, batch_size: int = 8, dtype: str = "float16",
                 attn_implementation: str = "sdpa", device_map: str = "auto", revision: str = "main", **unused):
        super().__init__()
        model, processor = load_mllm(pretrained, dtype=dtype, attn_implementation=attn_implementation,
                                     device_map=device_map, revision=revision)
        engine = VisualExit(model)
        settings = PolicySettings(threshold=None if threshold is None else float(threshold),
                                  vtw_layer=None if vtw_layer is None else int(vtw_layer),
                                  options={"fastv": FastVSettings(int(fastv_layer), float(fastv_keep_ratio))})
        if heads:
            settings.heads = ExitHeads.from_pretrained(heads)
            settings.heads.check_fits(model, pretrained, revision)
        self.runner = ExitRunner(engine, processor, build_policy(policy, settings))
        self.batch_size_per_gpu = int(batch_size)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        """Takes the request's trailing arguments, in lmms-eval's order."""
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batches of `batch_size` requests from one task, so they share its generation kwargs."""
        answers = [None] * len(requests)
        by_task = {}
        for i, request in enumerate(requests):
            by_task.setdefault(request.args[4], []).append(i)
        for indices in by_task.values():
            for start in range(0, len(indices), self.batch_size_per_gpu):
                chunk = indices[start : start + self.batch_size_per_gpu]
                kwargs = dict(requests[chunk[0]].args[1])
                until = kwargs.pop("until", None)
                texts = self.runner.generate(
                    [requests[i].args[0] for i in chunk], [self._visuals(*requests[i].args[2:]) for i in chunk],
                    until=[until] if isinstance(until, str) else until,
                    max_new_tokens=int(kwargs.get("max_new_tokens", 32)), **generation_settings(kwargs),
                )
                for i, text in zip(chunk, texts):
                    answers[i] = text
        self.eval_logger_exit_stats()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """`(negative log-likelihood, is_greedy)` per request: lmms-eval's multiple-choice scoring takes the argmin,
        as its own models return a loss. Wrapped in `GenerationResult` because lmms-eval 0.7.3 turns any other
        non-text response into its `str()` before scoring."""
        results = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [r.args for r in requests[start : start + self.batch_size_per_gpu]]
            continuations = [target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                             for _, target, _, doc_id, task, split in chunk]
            scored = self.runner.loglikelihood([args[0] for args in chunk], continuations,
                                               [self._visuals(*args[2:]) for args in chunk])
            results += [GenerationResult(text=(-logprob, greedy)) for logprob, greedy in scored]
        self.eval_logger_exit_stats()
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("dyvte answers single-round requests.")

    def eval_logger_exit_stats(self) -> None:
        from loguru import logger

        logger.info(f"dyvte exit statistics: {self.runner.stats.summary(self.runner.engine.num_layers)}")
