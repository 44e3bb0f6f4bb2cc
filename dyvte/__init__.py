"""dyvte: dynamic visual-token exit for Hugging Face multimodal LLMs."""

from . import flops
from .cache import WithdrawalCache
from .engine import VisualExit, VisualExitOutput

__all__ = ["VisualExit", "VisualExitOutput", "WithdrawalCache", "flops"]
