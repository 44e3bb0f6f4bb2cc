"""The policies' settings from an `infer.py` or `serve.py` config (`conf/infer.yaml`, which `conf/serve.yaml`
extends): exit heads loaded and checked against the model, VTW's exit layer searched on the val split unless given,
and G-Search's and P-Sigmoid's keep rates loaded from `{method}.path` or searched on the val split."""

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from ..configs import policy_options, read_data_settings
from ..data import PromptCollator, load_splits
from ..engine import VisualExit
from ..heads import ExitHeads
from ..policies import KeepRateSchedule
from ..policies.registry import POLICY_NAMES, REGISTRY, SCHEDULE, PolicySettings, needs_heads
from ..policies.search import GSearch, PSigmoidSearch, g_search, p_sigmoid_search, vtw_search

log = logging.getLogger(__name__)


def calibration_batches(cfg, processor, n: int) -> list[dict]:
    """The first `n` samples of the val split as processor batches (what the calibration searches run on)."""
    calibration = load_splits(read_data_settings(cfg))["val"][:n]
    collator = PromptCollator(processor, require_answer=False)
    batches = [collator(calibration[i : i + cfg.batch_size]) for i in range(0, len(calibration), cfg.batch_size)]
    return [{k: v for k, v in b.items() if k not in ("samples", "skipped")} for b in batches if b["samples"]]


def searched_schedule(cfg, method: str, options, engine: VisualExit, processor) -> KeepRateSchedule:
    """`method` ("gsearch" or "psigmoid", with its settings `options`) loaded from `{method}.path`, or searched on
    the val split and saved as `{method}.json` in the run's output dir (reload it with `{method}.path=...`)."""
    if options.path:
        result = (GSearch if method == "gsearch" else PSigmoidSearch).load(options.path)
        log.info("%s: keep rates %s from %s", method, [round(r, 4) for r in result.rates], options.path)
        return result.policy()
    batches = calibration_batches(cfg, processor, options.n)
    if method == "gsearch":
        result = g_search(engine, batches, options.lam, options.every, options.trials, options.first_layer,
                          options.queries, cfg.max_new_tokens, seed=cfg.seed)
    else:
        result = p_sigmoid_search(engine, batches, options.budget, options.trials, options.k_max, options.alpha,
                                  options.first_layer, options.queries, cfg.max_new_tokens, seed=cfg.seed)
    path = Path(HydraConfig.get().runtime.output_dir) / f"{method}.json"
    result.save(path)
    log.info("%s: keep rates %s (E = %.4f on %d val samples), saved to %s", method,
             [round(r, 4) for r in result.rates], result.score, options.n, path)
    return result.policy()


def policy_settings(cfg, engine: VisualExit, processor, names: list[str]) -> PolicySettings:
    """What `build_policy` needs for the policies `names` (and their `+` parts): every policy's settings from the
    config, the model, and what they need resolved: the heads (checked against the model), VTW's layer searched
    where `vtw.layer` is null, the keep-rate schedules loaded or searched."""
    options = policy_options(cfg)
    parts = {part for name in names for part in name.split("+")}
    settings = PolicySettings(threshold=cfg.threshold, force=cfg.force, vtw_layer=options["vtw"].layer,
                              model=engine.model, options=options)
    if any(needs_heads(name) for name in names):
        settings.heads = ExitHeads.from_pretrained(cfg.heads)
        settings.heads.check_fits(engine.model, cfg.model.name_or_path, cfg.model.revision)
    if "vtw" in parts and settings.vtw_layer is None:
        vtw = options["vtw"]
        search = vtw_search(engine, calibration_batches(cfg, processor, vtw.n), vtw.eta, vtw.start_layer, vtw.n)
        log.info("vtw_search: k=%d, KL per layer %s", search.k, [round(v, 5) for v in search.kl])
        settings.vtw_layer = search.k
    for method in sorted(parts, key=POLICY_NAMES.index):
        if REGISTRY[method].kind == SCHEDULE:
            setattr(settings, method, searched_schedule(cfg, method, options[method], engine, processor))
    return settings
