"""One entry point for the models dyvte runs on: the shipped testbed, a local checkpoint or a Hub id."""

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

TESTBED_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "testbed" / "model"


def resolve_model_path(name_or_path: str) -> str:
    """`"testbed"` is the committed checkpoint, found relative to the package so any working directory works."""
    if name_or_path == "testbed":
        if not (TESTBED_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"no testbed checkpoint at {TESTBED_MODEL_DIR}; run `python -m dyvte.testbed.pretrain` to build it"
            )
        return str(TESTBED_MODEL_DIR)
    return str(name_or_path)


def load_mllm(name_or_path: str = "testbed", dtype=torch.float32, attn_implementation: str = "sdpa", **kwargs):
    """`(model, processor)` through the stock Auto classes; extra kwargs (e.g. `device_map`) go to the model."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
