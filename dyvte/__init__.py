"""dyvte: dynamic visual-token exit for Hugging Face multimodal LLMs."""

from . import flops
from .cache import WithdrawalCache
from .engine import VisualExit, VisualExitGenerateOutput, VisualExitOutput
from .heads import ExitHeads
from .loading import load_mllm
from .policies import DynamicExit, ExitPolicy, FastV, KeepRateSchedule, NoExit, PSigmoid, StaticExit

__all__ = [
    "DynamicExit", "ExitHeads", "ExitPolicy", "FastV", "KeepRateSchedule", "NoExit", "PSigmoid", "StaticExit",
    "VisualExit", "VisualExitGenerateOutput", "VisualExitOutput", "WithdrawalCache", "flops", "load_mllm",
]
