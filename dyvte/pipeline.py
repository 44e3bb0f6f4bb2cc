"""The stages of `train.py` as functions: labels -> heads -> validate. Entry points stay thin; tests call these."""

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from .data import Sample, load_splits
from .heads import ExitHeads
from .label_cache import LabelCache
from .labeling import run_labels
from .labels import LabelConfig
from .loading import model_identity
from .simulate import calibrate_threshold, head_metrics, validate
from .training import HeadsDataModule, HeadsModule

log = logging.getLogger(__name__)


def label_config(cfg) -> LabelConfig:
    layers = cfg.labels.layers if isinstance(cfg.labels.layers, str) else list(cfg.labels.layers)
    return LabelConfig(
        alpha=cfg.labels.alpha, reference=cfg.labels.reference, layers=layers,
        max_new_tokens=cfg.labels.max_new_tokens, feature_span=cfg.features.span, seed=cfg.seed,
    )


def label_caches(cfg, model, processor, splits: dict[str, list[Sample]], compute: bool = True) -> dict[str, LabelCache]:
    """One cache per split, keyed by model, split contents and label/feature settings; filled unless complete."""
    config = label_config(cfg)
    identity = model_identity(cfg.model.name_or_path, cfg.model.revision)
    caches = {}
    for name, samples in splits.items():
        if not samples:
            continue
        ids = hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()
        key = {**identity, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
               "withdraw": cfg.model.withdraw, "split": name, "sample_ids_sha256": ids,
               "labels": {k: v for k, v in vars(config).items() if k != "extra"}}
        cache = LabelCache(cfg.cache_dir, key)
        if compute and cache.complete:
            log.info("labels for %s: reusing the complete cache %s", name, cache.dir)
        elif compute:
            log.info("labels for %s: labelling %d samples into %s", name, len(samples), cache.dir)
            run_labels(
                model, processor, samples, config, cache, batch_size=cfg.labels.batch_size,
                shard_size=cfg.labels.shard_size, on_bad_sample=cfg.data.on_bad_sample,
                max_length=cfg.data.max_length, trainer_kwargs=_label_trainer_kwargs(cfg), withdraw=cfg.model.withdraw,
            )
            skipped = cache.skipped()
            if skipped:
                log.warning("%s: skipped %d bad samples, ids in %s", name, len(skipped), cache.dir / "skipped.jsonl")
        caches[name] = cache
    return caches


def _label_trainer_kwargs(cfg) -> dict:
    """The configured devices/strategy; `fast_dev_run` would stop the label pass after one batch, so not that."""
    return {k: v for k, v in cfg.trainer.items() if k not in ("fast_dev_run", "precision")}


def train_heads(cfg, model, caches: dict[str, LabelCache], output_dir: Path) -> ExitHeads:
    # Seeded here, not only at start-up: a run that labels first draws random numbers a rerun on the cache does
    # not, and the heads must be the same either way.
    L.seed_everything(cfg.seed, workers=True)
    text = model.config.get_text_config(decoder=True)
    heads = ExitHeads(
        text.hidden_size, text.num_hidden_layers, cfg.heads.hidden,
        meta={**model_identity(cfg.model.name_or_path, cfg.model.revision), "feature_span": cfg.features.span,
              "withdraw": cfg.model.withdraw,
              "labels": {k: v for k, v in vars(label_config(cfg)).items() if k != "extra"}},
    )
    module = HeadsModule(heads, lr=cfg.heads.lr, weight_decay=cfg.heads.weight_decay,
                         class_weights=list(cfg.heads.class_weights) if cfg.heads.class_weights else None)
    datamodule = HeadsDataModule(
        caches["train"].load(), caches["val"].load() if "val" in caches else None,
        batch_size=cfg.heads.batch_size, seed=cfg.seed,
    )
    trainer = L.Trainer(
        **cfg.trainer, max_epochs=cfg.heads.epochs, logger=instantiate(cfg.logger),
        callbacks=[RichProgressBar()], enable_checkpointing=False, default_root_dir=str(output_dir),
    )
    trainer.fit(module, datamodule=datamodule)
    return heads


def validate_heads(cfg, model, heads: ExitHeads, caches: dict[str, LabelCache], output_dir: Path) -> dict:
    """Choose the threshold on val, then report simulated dynamic exit on the held-out split."""
    threshold, sweep = cfg.validate.threshold, []
    val = caches["val"].load() if "val" in caches else None
    if threshold == "auto":
        if val is None:
            raise ValueError("validate.threshold=auto calibrates on a val split, and there is none: set "
                             "data.val_json_path or data.val_fraction > 0, or give validate.threshold a number")
        threshold, sweep = calibrate_threshold(heads, val, model.config, cfg.validate.min_agreement)
    split = cfg.validate.split if cfg.validate.split in caches else "val"
    held_out = caches[split].load()
    report = {"split": split, **validate(heads, held_out, model.config, float(threshold), calibration=val,
                                         min_agreement=cfg.validate.min_agreement)}
    report["threshold_sweep_val"] = sweep
    report["heads"] = head_metrics(heads, held_out)
    heads.meta["threshold"] = float(threshold)
    heads.save_pretrained(output_dir / "heads")
    (output_dir / "validate.json").write_text(json.dumps(report, indent=2))
    return report


def run(cfg, output_dir: Path, model, processor) -> dict:
    stages = list(cfg.stages)
    unknown = set(stages) - {"labels", "heads", "validate"}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; the stages are labels, heads, validate.")
    splits = load_splits(cfg.data)
    caches = label_caches(cfg, model, processor, splits, compute="labels" in stages)
    for name, cache in caches.items():
        if not cache.complete:
            raise FileNotFoundError(f"the {name} label cache {cache.dir} is incomplete: run the labels stage.")
    result: dict = {}
    if "heads" in stages:
        heads = train_heads(cfg, model, caches, output_dir)
        if rank_zero_only.rank != 0:  # under DDP every rank ends with the same heads; rank 0 writes them
            return result
        heads.save_pretrained(output_dir / "heads")
        if "validate" in stages and not cfg.trainer.fast_dev_run:
            result = validate_heads(cfg, model, heads, caches, output_dir)
    return result
