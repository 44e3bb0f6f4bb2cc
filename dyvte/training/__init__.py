"""Training exit heads: the dense label pass over a frozen MLLM, the Arrow label cache it fills, the heads'
Lightning module, exit simulated from the cache, and the `train.py` stages that tie them together."""

from .dense_labels import DenseLabels, LabelConfig, answer_tokens, candidate_exits, dense_labels
from .heads_module import HeadsDataModule, HeadsModule
from .label_run import LabelModule, ShardWriter, run_labels
from .label_store import LabelStore
from .simulate import choose_threshold, first_exit, first_safe_exit, score_exits, validate

__all__ = [
    "DenseLabels", "HeadsDataModule", "HeadsModule", "LabelConfig", "LabelModule", "LabelStore", "ShardWriter",
    "answer_tokens", "candidate_exits", "choose_threshold", "dense_labels", "first_exit", "first_safe_exit",
    "run_labels", "score_exits", "validate",
]
