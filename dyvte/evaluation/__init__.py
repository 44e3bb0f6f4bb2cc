"""Evaluating exit policies: the comparison runner behind `infer.py task=eval`, its equal-budget comparison,
tables and plots, the paper's findings behind `analyze.py` (`dyvte.evaluation.findings`), and the
benchmark-harness runner (with its lmms-eval plug-in in `dyvte.evaluation.lmms_eval_plugin`). Policies are built by
name from the policy registry (`dyvte.policies.registry`: `build_policy`, `budget_policy`, `PolicySettings`)."""

from ..policies.registry import BUDGET_METHODS, PolicySettings, budget_policy, build_policy
from .budget import visual_share
from .compare import PolicyRun, TokenClock, evaluate, run_policy, summarize, write_report
from .harness import ExitRunner, ExitStats, generation_settings
from .tables import markdown_table

__all__ = [
    "BUDGET_METHODS", "ExitRunner", "ExitStats", "PolicyRun", "PolicySettings", "TokenClock", "budget_policy",
    "build_policy", "evaluate", "generation_settings", "markdown_table", "run_policy", "summarize", "visual_share",
    "write_report",
]
