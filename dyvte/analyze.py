"""The DyVTE paper's empirical findings on a model: attention stages, withdrawal sweep, attention entropy.

    python analyze.py                                             # the shipped testbed, its test split, on a CPU
    python analyze.py analysis.n=160 out_dir=reports/testbed/analysis
    python analyze.py analysis.policy=vtw analysis.vtw_layer=8    # entropy with and without exit at layer 8
    python analyze.py model=llava7b data=hf data.path=... analysis.withdrawal_layers=[0,8,16,24,32]

Writes `analysis.json`, `analysis.md`, `attention_stages.png` (and per family), `withdrawal.png` and `entropy.png`
(docs/design.md, "The paper's findings: analyze.py").
"""

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dyvte import VisualExit, cli
from dyvte.configs import check_analyze_config, read_data_settings, read_model_settings
from dyvte.data import load_splits
from dyvte.evaluation import PolicySettings, build_policy
from dyvte.evaluation.findings import AnalysisSettings, analyze, write_analysis
from dyvte.heads import ExitHeads

cli.register_resolvers()
log = logging.getLogger("analyze")


def exit_policy(cfg, engine: VisualExit):
    """`analysis.policy` as a policy (None for `none`); dynamic exit's heads are checked against the model."""
    name = cfg.analysis.policy
    if name == "none":
        return None
    settings = PolicySettings(threshold=cfg.threshold, vtw_layer=cfg.analysis.vtw_layer)
    if name == "dynamic":
        settings.heads = ExitHeads.from_pretrained(cfg.heads)
        settings.heads.check_fits(engine.model, cfg.model.name_or_path, cfg.model.revision)
    if name == "vtw" and cfg.analysis.vtw_layer > engine.num_layers:
        raise ValueError(f"analysis.vtw_layer={cfg.analysis.vtw_layer} is past the model's {engine.num_layers} "
                         f"layers (0 = text only, {engine.num_layers} = the full model).")
    return build_policy(name, settings)


@hydra.main(config_path="conf", config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_analyze_config(cfg)
    cli.quiet_libraries(cfg.verbose)
    torch.manual_seed(cfg.seed)
    splits = load_splits(read_data_settings(cfg))
    if cfg.analysis.split not in splits:
        raise ValueError(f"analysis.split={cfg.analysis.split!r}: the data has no such split (it has "
                         f"{', '.join(splits)}).")
    samples = splits[cfg.analysis.split][: cfg.analysis.n]
    model_settings = read_model_settings(cfg)
    model, processor = model_settings.load()
    engine = VisualExit(model, withdraw=model_settings.withdraw)
    layers = cfg.analysis.withdrawal_layers
    settings = AnalysisSettings(
        policy=exit_policy(cfg, engine), policy_name=cfg.analysis.policy,
        withdrawal_layers=None if layers is None else OmegaConf.to_object(layers), batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens, query_chunk=cfg.analysis.query_chunk, on_bad_sample=cfg.data.on_bad_sample,
        min_dip=cfg.analysis.min_dip,
    )
    results = analyze(engine, processor, samples, settings)
    results["settings"] = {"model": cfg.model.name_or_path, "split": cfg.analysis.split, "n": cfg.analysis.n,
                           "policy": cfg.analysis.policy, "vtw_layer": cfg.analysis.vtw_layer,
                           "threshold": cfg.threshold, "max_new_tokens": cfg.max_new_tokens}
    output_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    print(write_analysis(results, output_dir))
    log.info("stage boundaries (all samples): %s", results["stages"]["all"].get("boundaries"))
    log.info("report and plots in %s", output_dir)


def cli_main() -> None:
    """`dyvte-analyze` / `python -m dyvte.analyze` / the repository's `analyze.py`: `-v` is `verbose=true`."""
    cli.verbose_flag()
    main()


if __name__ == "__main__":
    cli_main()
