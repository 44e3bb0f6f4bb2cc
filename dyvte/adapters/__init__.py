"""Family adapters: the only place that knows how a given Hugging Face MLLM embeds its inputs.

The engine is family-agnostic; it asks the adapter for the merged input embeddings, the visual-token mask, the
rotary embeddings and the decoder modules. Adding a family is adding one small adapter and one registry line.
"""

import transformers
from packaging.version import Version

from .base import FamilyAdapter
from .llava import LlavaAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaAdapter,
}
SUPPORTED_TRANSFORMERS = (Version("5.0.0"), Version("6.0.0"))


def check_transformers_version(version: str = transformers.__version__) -> None:
    """The adapters use the v5 module layout (`model.model.language_model`, cache layers); refuse anything else."""
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(version) < high:
        raise RuntimeError(
            f"dyvte supports transformers >={low},<{high}; found {version}. Install the pinned version "
            f"(pip install -e .) or open an issue for an adapter."
        )


def get_adapter(model) -> FamilyAdapter:
    """Pick the adapter for `model.config.model_type`, or fail naming the supported families."""
    check_transformers_version()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"dyvte has no adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "FamilyAdapter", "LlavaAdapter", "check_transformers_version", "get_adapter"]
