"""Evaluating exit policies: the comparison runner behind `infer.py task=eval`, its tables and plots, and the
benchmark-harness runner (with its lmms-eval plug-in in `dyvte.evaluation.lmms_eval_plugin`)."""

from .compare import PolicyRun, PolicySettings, build_policy, evaluate, run_policy, summarize, write_report
from .harness import ExitRunner, ExitStats, generation_settings
from .tables import markdown_table

__all__ = [
    "ExitRunner", "ExitStats", "PolicyRun", "PolicySettings", "build_policy", "evaluate", "generation_settings",
    "markdown_table", "run_policy", "summarize", "write_report",
]
