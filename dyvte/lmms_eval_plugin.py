"""lmms-eval model `dyvte`: any supported Hugging Face MLLM with an exit policy.

    pip install "dyvte[eval]"
    python -m lmms_eval --model dyvte --model_args pretrained=llava-hf/llava-1.5-7b-hf,heads=DIR,policy=dynamic

Registered through the `lmms_eval.models` entry point (see pyproject.toml); the work is done by
`dyvte.harness.ExitRunner`, this module only translates lmms-eval's requests.
"""

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .evaluation import PolicySettings, build_policy
from .engine import VisualExit
from .harness import ExitRunner
from .heads import ExitHeads
from .loading import load_mllm


def manifest() -> ModelManifest:
    return ModelManifest(model_id="dyvte", simple_class_path="dyvte.lmms_eval_plugin.DyvteModel")


class DyvteModel(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "testbed", heads: str | None = None, policy: str = "dynamic",
                 threshold: float | None = None, vtw_layer: int | None = None, fastv_layer: int = 2,
                 fastv_keep_ratio: float = 0.5, batch_size: int = 8, dtype: str = "float16",
                 attn_implementation: str = "sdpa", device_map: str = "auto", revision: str = "main", **unused):
        super().__init__()
        model, processor = load_mllm(pretrained, dtype=dtype, attn_implementation=attn_implementation,
                                     device_map=device_map, revision=revision)
        engine = VisualExit(model)
        settings = PolicySettings(threshold=None if threshold is None else float(threshold),
                                  vtw_layer=None if vtw_layer is None else int(vtw_layer),
                                  fastv_layer=int(fastv_layer), fastv_keep_ratio=float(fastv_keep_ratio))
        if heads:
            settings.heads = ExitHeads.from_pretrained(heads)
            settings.heads.check_fits(model, pretrained, revision)
        self.runner = ExitRunner(engine, processor, build_policy(policy, settings))
        self.batch_size_per_gpu = int(batch_size)

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = [r.args for r in requests[start : start + self.batch_size_per_gpu]]
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in chunk:
                kwargs = dict(gen_kwargs)
                until = kwargs.pop("until", None)
                until = [until] if isinstance(until, str) else until
                answers += self.runner.generate(
                    [context], [self._visuals(doc_to_visual, task, split, doc_id)], until=until,
                    max_new_tokens=int(kwargs.pop("max_new_tokens", 32)),
                )
        self.eval_logger_exit_stats()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            results += self.runner.loglikelihood([context], [continuation],
                                                 [self._visuals(doc_to_visual, task, split, doc_id)])
        self.eval_logger_exit_stats()
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("dyvte answers single-round requests.")

    def eval_logger_exit_stats(self) -> None:
        from loguru import logger

        logger.info(f"dyvte exit statistics: {self.runner.stats.summary(self.runner.engine.num_layers)}")
