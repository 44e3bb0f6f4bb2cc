"""Policies: who decides, before each decoder layer, which visual tokens a sample still keeps. One module per kind:
exit policies (`exit.py`: NoExit, StaticExit, DynamicExit), input selectors (`input_selectors.py`: Downsample,
VisionZip, VisPruner, CDPruner, DivPrune), in-LLM pruners (`pruners.py`: FastV, RandomPrune, PyramidDrop, DART,
SparseVLM, AutoPrune), mergers (`mergers.py`: ToMe) and keep-rate schedules (`schedules.py`: KeepRateSchedule, PSigmoid); the
searches that choose static settings from a few samples (`search.py`: VTW's layer, G-Search's and P-Sigmoid's keep
rates); what they share (`tokens.py`, `settings.py`); and the registry of the names users type, with what each
policy is, needs and is built from (`registry.py`: `build_policy`, `budget_policy`, `PolicySettings`)."""

from ..engine import Compose, Decision, ExitPolicy, PrefillState
from .exit import DynamicExit, NoExit, StaticExit
from .input_selectors import CDPruner, DivPrune, Downsample, VisionZip, VisPruner
from .mergers import ToMe
from .pruners import DART, AutoPrune, FastV, PyramidDrop, RandomPrune, SparseVLM
from .schedules import KeepRateSchedule, PSigmoid
from .tokens import attention_by_position, keep_most_attended, kept_count

__all__ = [
    "AutoPrune", "CDPruner", "DART", "Compose", "Decision", "DivPrune", "Downsample", "DynamicExit", "ExitPolicy", "FastV",
    "KeepRateSchedule", "NoExit", "PSigmoid", "PrefillState", "PyramidDrop", "RandomPrune", "SparseVLM", "StaticExit",
    "ToMe", "VisPruner", "VisionZip",
    "attention_by_position", "keep_most_attended", "kept_count",
]
