"""Policies: who decides, before each decoder layer, which visual tokens a sample still keeps; the token-reduction
baselines (random pruning, pooling, ToMe, VisionZip, PyramidDrop, DART; VisPruner, CDPruner, DivPrune and
SparseVLM); and the searches that choose static settings from a few samples (VTW's layer, G-Search's and
P-Sigmoid's keep rates)."""

from ..engine import Compose, Decision, ExitPolicy, PrefillState
from .baselines import DART, Downsample, PyramidDrop, RandomPrune, ToMe, VisionZip
from .exit import DynamicExit, NoExit, StaticExit
from .pruning import FastV, KeepRateSchedule, PSigmoid, attention_by_position, keep_most_attended, kept_count
from .selection import CDPruner, DivPrune, SparseVLM, VisPruner

__all__ = [
    "CDPruner", "DART", "Compose", "Decision", "DivPrune", "Downsample", "DynamicExit", "ExitPolicy", "FastV",
    "KeepRateSchedule", "NoExit", "PSigmoid", "PrefillState", "PyramidDrop", "RandomPrune", "SparseVLM", "StaticExit",
    "ToMe", "VisPruner", "VisionZip",
    "attention_by_position", "keep_most_attended", "kept_count",
]
