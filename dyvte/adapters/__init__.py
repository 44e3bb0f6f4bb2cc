"""Family adapters: the only place that knows how a given Hugging Face MLLM embeds its inputs.

The engine is family-agnostic; it asks the adapter for the merged input embeddings, the visual-token mask, the
rotary embeddings and the decoder modules. Adding a family is adding one small adapter and one registry line.
"""

import transformers
from packaging.version import Version

from .base import FamilyAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import QwenVLAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "internvl": InternVLAdapter,
    "llava": LlavaAdapter,
    "llava_next": LlavaAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen2_vl": QwenVLAdapter,
}
# As pyproject.toml: 5.17 is the tested lower bound, 5.25 the newest tested (5.24 renamed the decoder layers'
# `past_key_values` to `cache`; the adapters read which one a layer takes).
SUPPORTED_TRANSFORMERS = (Version("5.17.0"), Version("5.26.0"))


def check_transformers_version(version: str = transformers.__version__) -> None:
    """The adapters use the v5 module layout (`model.model.language_model`, cache layers); refuse anything else."""
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(version) < high:
        raise RuntimeError(
            f"dyvte supports transformers >={low},<{high}; found {version}. Install a supported version "
            f"(pip install \"transformers>={low},<{high}\") or open an issue for an adapter."
        )


def get_adapter(model, withdraw: str = "both") -> FamilyAdapter:
    """Pick the adapter for `model.config.model_type`, or fail naming the supported families.

    `withdraw` ("both" | "images" | "videos") chooses which visual tokens exit; see `FamilyAdapter`.
    """
    check_transformers_version()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"dyvte has no adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}."
        )
    return ADAPTERS[model_type](model, withdraw=withdraw)


__all__ = [
    "ADAPTERS",
    "FamilyAdapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaOnevisionAdapter",
    "QwenVLAdapter",
    "check_transformers_version",
    "get_adapter",
]
