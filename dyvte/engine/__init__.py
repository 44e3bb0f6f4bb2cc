"""The withdrawal engine: prefill and decode of a stock MLLM in which each sample's visual tokens leave at its own
exit layer, the sub-batches that make that real, the withdrawal KV cache, the policy hook and head features."""

from .cache import WithdrawalCache
from .features import feature_tokens, head_features
from .policy import Compose, Decision, ExitPolicy, PrefillState
from .subbatch import SubBatch
from .visual_exit import (
    VisualExit,
    VisualExitGenerateOutput,
    VisualExitOutput,
    generation_eos_ids,
    greedy_answers,
    resolve_exit_layer,
)

__all__ = [
    "Compose", "Decision", "ExitPolicy", "PrefillState", "SubBatch", "VisualExit", "VisualExitGenerateOutput",
    "VisualExitOutput", "WithdrawalCache", "feature_tokens", "generation_eos_ids", "greedy_answers", "head_features",
    "resolve_exit_layer",
]
