"""dyvte: dynamic visual-token exit for Hugging Face multimodal LLMs.

Data flows through the sub-packages in this order, each importing only from those before it:
`adapters` (one per model family) -> `engine` (prefill and decode with withdrawal) -> `policies` (who decides
exits and pruning; searches) -> `training` (labels, label cache, heads, simulation) -> `evaluation` (comparison,
harness). `heads`, `flops`, `data`, `prompts`, `loading` and `extras` are small modules every stage may use.
"""

import sys

if sys.version_info < (3, 10):  # checked before anything else is imported, so the error names the fix
    raise ImportError(
        f"dyvte needs Python 3.10 or newer (3.10 to 3.13 are tested); this is Python "
        f"{'.'.join(map(str, sys.version_info[:3]))}. Make a virtualenv with a newer one: python3.12 -m venv .venv"
    )

from . import flops
from .engine import VisualExit, VisualExitGenerateOutput, VisualExitOutput, WithdrawalCache
from .heads import ExitHeads, ExitHeadsConfig
from .loading import load_mllm
from .policies import DynamicExit, ExitPolicy, FastV, KeepRateSchedule, NoExit, PSigmoid, StaticExit

__all__ = [
    "DynamicExit", "ExitHeads", "ExitHeadsConfig", "ExitPolicy", "FastV", "KeepRateSchedule", "NoExit", "PSigmoid",
    "StaticExit", "VisualExit", "VisualExitGenerateOutput", "VisualExitOutput", "WithdrawalCache", "flops",
    "load_mllm",
]
