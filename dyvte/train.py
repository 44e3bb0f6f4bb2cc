"""Train DyVTE exit heads: weak labels from the frozen MLLM -> per-layer heads -> simulated dynamic exit.

    python train.py                                   # the shipped testbed, on a CPU, in minutes
    python train.py experiment=llava7b_paper data.json_path=... data.image_dir=...
    python train.py -m head_training.hidden=256,2048 head_training.lr=1e-4,4e-5   # sweeps reuse the label cache
    python train.py stages=[validate] heads=outputs/.../heads                     # validate trained heads
    python train.py -v                                # more log output (Lightning's model summary, tips)
"""

import json
import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dyvte import cli
from dyvte.configs import check_certification, check_train_config, read_train_settings
from dyvte.preflight import check_train_inputs
from dyvte.training.pipeline import run

cli.register_resolvers()
log = logging.getLogger("train")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_train_config(cfg)
    cli.check_logger_installed(cfg.logger)
    cli.quiet_libraries(cfg.verbose)
    settings = read_train_settings(cfg)  # typed from here on: the stages never see the Hydra config
    splits = check_train_inputs(settings)  # paths, data, layers, label caches: before any model time
    check_certification(settings, splits)  # the certification split: disjoint, large enough, groups
    L.seed_everything(settings.seed, workers=True, verbose=settings.verbose)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        model, processor = settings.model.load()
        report = run(settings, output_dir, model, processor, splits)
    except KeyboardInterrupt:  # outside a Lightning loop (those say what they saved themselves)
        log.error("interrupted (Ctrl-C): every finished label shard is saved in %s; rerun the same command to resume",
                  settings.cache_dir)
        sys.exit(130)
    if report:
        summary = {k: report[k] for k in ("agreement", "accuracy", "full_accuracy", "flops_saved", "mean_exit_layer",
                                          "threshold")}
        log.info("validate (%s split): %s", report["split"], json.dumps(summary))
    log.info("outputs in %s", output_dir)


def cli_main() -> None:
    """`dyvte-train` / `python -m dyvte.train` / the repository's `train.py`: `-v` is `verbose=true`."""
    cli.verbose_flag()
    main()


if __name__ == "__main__":
    cli_main()
