"""Policies: who decides, before each decoder layer, which visual tokens a sample still keeps; and the searches
that choose their static settings from a few samples (VTW's layer, G-Search's and P-Sigmoid's keep rates)."""

from ..engine import Compose, Decision, ExitPolicy, PrefillState
from .exit import DynamicExit, NoExit, StaticExit
from .pruning import FastV, KeepRateSchedule, PSigmoid, attention_by_position, keep_most_attended, kept_count

__all__ = [
    "Compose", "Decision", "DynamicExit", "ExitPolicy", "FastV", "KeepRateSchedule", "NoExit", "PSigmoid",
    "PrefillState", "StaticExit", "attention_by_position", "keep_most_attended", "kept_count",
]
