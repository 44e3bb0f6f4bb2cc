"""Training exit heads: the dense label pass over a frozen MLLM, the Arrow label cache it fills, the heads'
Lightning module, exit simulated from the cache, and the `train.py` stages that tie them together.

The label pass is imported here; the names of the modules that need the training stack (`datasets`,
torchmetrics) are imported on first use, so the label pass loads without it (the harness and
`python -m benchmarks.gpu` use it on machines that lack `datasets`).
"""

from importlib import import_module

from .dense_labels import DenseLabels, LabelConfig, answer_tokens, candidate_exits, dense_labels

_MODULE_OF = {
    "HeadsDataModule": "heads_module", "HeadsModule": "heads_module",
    "LabelModule": "label_run", "ShardWriter": "label_run", "run_labels": "label_run",
    "LabelStore": "label_store",
    "choose_threshold": "simulate", "first_exit": "simulate", "first_safe_exit": "simulate",
    "score_exits": "simulate", "validate": "simulate",
}

__all__ = [
    "DenseLabels", "HeadsDataModule", "HeadsModule", "LabelConfig", "LabelModule", "LabelStore", "ShardWriter",
    "answer_tokens", "candidate_exits", "choose_threshold", "dense_labels", "first_exit", "first_safe_exit",
    "run_labels", "score_exits", "validate",
]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
