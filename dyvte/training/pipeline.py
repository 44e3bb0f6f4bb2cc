"""The stages of `train.py` as functions: labels -> heads -> validate. Entry points stay thin; tests call these.

Every stage takes the typed `TrainSettings` (`dyvte.training.settings`) or the part of it it reads, never a Hydra
config: `train.py` checks the composed config and reads it into settings once, before any model time."""

import hashlib
import json
import logging
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, concatenate_datasets
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from ..data import Sample, load_splits
from ..heads import ExitHeads, ExitHeadsConfig
from ..loading import model_identity
from .certify import RISK_DEFINITIONS, candidate_thresholds, certify, exit_losses, pareto_path
from .dense_labels import LabelConfig
from .heads_module import HeadsDataModule, HeadsModule, torch_columns
from .label_run import run_labels
from .label_store import LabelStore
from .settings import HeadTrainingSettings, TrainSettings
from .simulate import (
    choose_threshold,
    exit_probabilities,
    first_exit,
    head_metrics,
    point_estimate_thresholds,
    prefill_costs,
    score_exits,
    validate,
)

log = logging.getLogger(__name__)


def label_config(settings: TrainSettings) -> LabelConfig:
    """What the label pass computes (`labels`, `features`, `seed`)."""
    labels, features = settings.labels, settings.features
    return LabelConfig(
        alpha=labels.alpha, reference=labels.reference,
        layers=labels.layers if isinstance(labels.layers, str) else list(labels.layers),
        max_new_tokens=labels.max_new_tokens, feature_span=features.span, seed=settings.seed,
        feature_groups=tuple(features.groups),
    )


def label_stores(settings: TrainSettings, model, processor, splits: dict[str, list[Sample]],
                 compute: bool = True) -> dict[str, LabelStore]:
    """One label cache per split (the certification split only when the run `certifies`), keyed by model, split
    contents and label/feature settings; filled (after a repair of whatever is damaged) unless complete.
    `compute=False`: the stores only, nothing read or written."""
    config = label_config(settings)
    model_settings, data = settings.model, settings.data
    identity = model_identity(model_settings.name_or_path, model_settings.revision)
    stores = {}
    for name, samples in splits.items():
        if not samples or (name == "certification" and not settings.certifies()):
            continue
        ids = hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()
        key = {**identity, "dtype": model_settings.dtype, "quantization": model_settings.quantization,
               "withdraw": model_settings.withdraw, "split": name, "sample_ids_sha256": ids, "labels": asdict(config)}
        if model_settings.quantization == "8bit":  # LLM.int8's outlier threshold changes the labels
            key["llm_int8_threshold"] = float(model_settings.llm_int8_threshold)
        store = LabelStore(settings.cache_dir, key)
        if compute:
            run_labels(
                model, processor, samples, config, store, batch_size=settings.labels.batch_size,
                shard_size=settings.labels.shard_size, on_bad_sample=data.on_bad_sample, max_length=data.max_length,
                trainer_kwargs=_label_trainer_kwargs(settings.trainer), withdraw=model_settings.withdraw,
                name=f"labels for {name}", max_image_pixels=data.max_image_pixels,
            )
            skipped = store.skipped()
            if skipped:
                log.warning("%s: skipped %d bad samples, ids in %s", name, len(skipped), store.dir / "skipped.jsonl")
        stores[name] = store
    return stores


def _label_trainer_kwargs(trainer: dict) -> dict:
    """The configured devices/strategy; `fast_dev_run` would stop the label pass after one batch, so not that."""
    return {k: v for k, v in trainer.items() if k not in ("fast_dev_run", "precision")}


def heads_config(settings: TrainSettings, model) -> ExitHeadsConfig:
    """The configuration of new heads for `model` from `head_training` and the label settings."""
    text = model.config.get_text_config(decoder=True)
    training = settings.head_training
    return ExitHeadsConfig(
        text.hidden_size, text.num_hidden_layers, training.hidden, feature_span=settings.features.span,
        withdraw=settings.model.withdraw, labels=asdict(label_config(settings)), inputs=tuple(training.inputs),
        num_attention_heads=text.num_attention_heads, architecture=training.architecture,
        label_shape=training.label_shape, label_target=training.label_target,
        **model_identity(settings.model.name_or_path, settings.model.revision),
    )


def train_heads(settings: TrainSettings, model, stores: dict[str, LabelStore], output_dir: Path) -> ExitHeads:
    # Seeded here, not only at start-up: a run that labels first draws random numbers a rerun on the cache does
    # not, and the heads must be the same either way.
    L.seed_everything(settings.seed, workers=True, verbose=False)
    val = stores["val"].load() if "val" in stores else None
    return fit_heads(settings.head_training, heads_config(settings, model), stores["train"].load(), val, output_dir,
                     seed=settings.seed, trainer=settings.trainer, logger=settings.logger, verbose=settings.verbose)


class ReportInterrupt(Callback):
    """Says in one line what Ctrl-C left behind (Lightning then exits with status 1)."""

    def __init__(self, message: str):
        self.message = message

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            log.error(self.message)


def fit_heads(training: HeadTrainingSettings, config: ExitHeadsConfig, train: Dataset, val: Dataset | None,
              output_dir: Path, seed: int, trainer: dict, logger: dict | None = None, verbose: bool = False,
              fold: bool = False) -> ExitHeads:
    """New heads of `config` trained with `training`'s schedule on the cached rows of `train`, by a Lightning
    `Trainer(**trainer)` logging to `instantiate(logger)`. `fold`: heads for cross-fitted calibration, trained
    quietly in this process on one device (calibration runs on rank 0 only, after the other ranks have finished),
    without a logger."""
    heads = ExitHeads(config)
    module = HeadsModule(heads, lr=training.lr, weight_decay=training.weight_decay,
                         class_weights=list(training.class_weights) if training.class_weights else None)
    datamodule = HeadsDataModule(train, config, val, batch_size=training.batch_size, seed=seed)
    trainer_kwargs = dict(trainer)
    if fold:
        distributed = ("strategy", "devices", "num_nodes")
        trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if k not in distributed} | {"devices": 1}
    interrupted = ReportInterrupt("interrupted (Ctrl-C) while training heads: no heads were written; the label "
                                  "caches are complete and a rerun of the same command reuses them")
    lightning_trainer = L.Trainer(
        **trainer_kwargs, max_epochs=training.epochs,
        logger=False if fold or logger is None else instantiate(logger),
        callbacks=[interrupted] if fold else [RichProgressBar(), interrupted],
        enable_progress_bar=not fold, enable_checkpointing=False, enable_model_summary=verbose and not fold,
        default_root_dir=str(output_dir),
    )
    lightning_trainer.fit(module, datamodule=datamodule)
    return heads.eval()


def out_of_fold_probabilities(training: HeadTrainingSettings, config: ExitHeadsConfig, train: Dataset,
                              output_dir: Path, folds: int, seed: int, trainer: dict) -> torch.Tensor:
    """p(exit) [N, L] for every row of `train`, each from heads trained on the other `folds` folds (rows dealt to
    folds by a permutation seeded with `seed`; fold `f`'s heads are seeded with `seed + f`). Unlike the final
    heads' own scores on `train`, these are scores on unseen rows, so thresholds can be calibrated on them as on
    val."""
    if len(train) < folds:  # every fold holds out at least one row
        raise ValueError(f"validate.folds={folds} needs at least {folds} train rows to cross-fit, and the train "
                         f"split has {len(train)}: lower validate.folds or use validate.calibration=val")
    fold_of = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)) % folds
    p_exit = torch.zeros(len(train), config.num_layers)
    for fold in range(folds):
        held = (fold_of == fold).nonzero().squeeze(1).tolist()
        kept = (fold_of != fold).nonzero().squeeze(1).tolist()
        log.info("calibration: heads of fold %d/%d (%d training rows, %d held out)", fold + 1, folds, len(kept),
                 len(held))
        L.seed_everything(seed + fold, workers=True, verbose=False)
        heads = fit_heads(training, config, train.select(kept), None, output_dir / "folds", seed=seed + fold,
                          trainer=trainer, fold=True)
        p_exit[held] = exit_probabilities(heads, train.select(held))
    return p_exit


def tuning_rows(settings: TrainSettings, heads: ExitHeads, stores: dict[str, LabelStore],
                output_dir: Path) -> tuple[Dataset, torch.Tensor, dict]:
    """The rows the point-estimate thresholds and the certificate's path are chosen on, with their p(exit) [N, L]:
    val scored by `heads` (`validate.calibration=val`), or the out-of-fold scores of the train split plus val's
    (`crossfit`); and a description for the report."""
    if "val" not in stores:
        raise ValueError("validate.threshold=auto calibrates on a val split, and there is none: set "
                         "data.val_json_path or data.val_fraction > 0, or give validate.threshold a number")
    val = stores["val"].load()
    if settings.validate.calibration != "crossfit":
        return val, exit_probabilities(heads, val), {"split": "val", "samples": len(val)}
    if "train" not in stores:
        raise ValueError("validate.calibration=crossfit trains heads on folds of the train split, and there is "
                         "none: give data a train split or use validate.calibration=val")
    train = stores["train"].load()
    out_of_fold = out_of_fold_probabilities(settings.head_training, heads.config, train, output_dir,
                                            folds=settings.validate.folds, seed=settings.seed,
                                            trainer=settings.trainer)
    rows = concatenate_datasets([train, val])
    return rows, torch.cat([out_of_fold, exit_probabilities(heads, val)]), {
        "split": "out-of-fold train + val", "samples": len(rows), "folds": settings.validate.folds}


def certify_heads(settings: TrainSettings, model, heads: ExitHeads, stores: dict[str, LabelStore],
                  tuning: tuple[Dataset, torch.Tensor], point: tuple[float, ...]) -> dict:
    """Learn-then-Test (`certify.py`): the Pareto path learned on the tuning rows (`tuning_rows`), tested on the
    certification split scored by the deployed `heads`, which never trained on it. Returns the certificate, with
    the certified point and the point estimate `point` [L] scored on the same certification rows."""
    validation, reference = settings.validate, settings.labels.reference
    rows, p_exit = tuning
    loss = exit_losses(torch_columns(rows, ["match"])["match"].bool(), reference)
    costs = prefill_costs(rows, model.config)
    candidates = candidate_thresholds(p_exit, ~loss, costs, validation.thresholds, validation.decision)
    path = pareto_path(candidates, p_exit, loss, costs)
    certification = stores["certification"].load()
    key = validation.groups
    if key is not None and key not in certification.column_names:
        raise ValueError(f"validate.groups={key}: the label cache has no {key} column (it has "
                         f"{', '.join(certification.column_names)}); use validate.groups=null")
    p_certification = exit_probabilities(heads, certification)
    certificate = certify(path, p_certification, exit_losses(torch_columns(certification, ["match"])["match"].bool(),
                                                              reference),
                          validation.target_agreement, validation.confidence,
                          groups=list(certification[key]) if key is not None else None)
    certificate["risk"] = RISK_DEFINITIONS[reference]
    certificate["path_rows"] = {"samples": len(rows)}
    certificate["path"] = path.tolist()
    certificate["on_certification_rows"] = {
        name: {k: v for k, v in score_exits(certification, first_exit(p_certification, torch.tensor(thresholds)),
                                            model.config).items() if k in ("agreement", "flops_saved",
                                                                           "mean_exit_layer")}
        for name, thresholds in (("certified", certificate["thresholds"]), ("point_estimate", point))}
    return certificate


def validate_heads(settings: TrainSettings, model, heads: ExitHeads, stores: dict[str, LabelStore],
                   output_dir: Path) -> dict:
    """Choose the thresholds on the tuning rows (`tuning_rows`), certify them with `validate.target_agreement`
    (`certify_heads`), then report simulated dynamic exit on the held-out split and save the heads with them."""
    validation = settings.validate
    num_layers = heads.num_layers
    val = stores["val"].load() if "val" in stores else None
    sweep, tuning = [], None
    if validation.threshold == "auto":
        rows, p_exit, calibration = tuning_rows(settings, heads, stores, output_dir)
        tuning = (rows, p_exit)
        kept = ~exit_losses(torch_columns(rows, ["match"])["match"].bool(), settings.labels.reference)
        point = point_estimate_thresholds(p_exit, kept, prefill_costs(rows, model.config), validation.min_agreement,
                                          validation.thresholds, validation.decision)
        sweep = choose_threshold(p_exit, rows, model.config, validation.min_agreement, validation.thresholds)[1]
    else:
        point, calibration = (float(validation.threshold),) * num_layers, {"split": None, "samples": 0}
    split = validation.split if validation.split in stores else "val"
    held_out = stores[split].load()
    thresholds, certificate = point, None
    if validation.target_agreement is not None:
        certificate = certify_heads(settings, model, heads, stores, tuning, point)
        on_test = validate(heads, held_out, model.config, _decision(validation.decision, point), calibration=None,
                           min_agreement=validation.min_agreement)
        certificate["point_estimate"] = {k: on_test[k] for k in ("threshold", "agreement", "accuracy", "flops_saved",
                                                                 "mean_exit_layer")}
        thresholds = tuple(certificate["thresholds"])
    decision = _decision(validation.decision, thresholds)
    report = {"split": split, **validate(heads, held_out, model.config, decision, calibration=val,
                                         min_agreement=validation.min_agreement)}
    report["calibration"] = calibration
    if certificate is not None:
        report["certified"] = certificate
    report["threshold_sweep_calibration"] = sweep
    if val is not None:  # the split settings are compared on (ablation.py)
        on_val = validate(heads, val, model.config, decision, calibration=None,
                          min_agreement=validation.min_agreement)
        report["val"] = {k: on_val[k] for k in ("agreement", "accuracy", "flops_saved", "mean_exit_layer")}
    report["head_parameters"] = sum(p.numel() for p in heads.parameters())
    report["heads"] = head_metrics(heads, held_out)
    # The last head's threshold is the global one every path point starts from (its exit is the full model). Per-head
    # thresholds only from a per_layer decision: heads reloaded with per-head thresholds and validated with one
    # global threshold must not keep their old ones, which inference would use instead.
    heads.calibrate(thresholds[-1], thresholds if validation.decision == "per_layer" else None)
    heads.save_pretrained(output_dir / "heads")
    (output_dir / "validate.json").write_text(json.dumps(report, indent=2))
    return report


def _decision(decision: str, thresholds: tuple[float, ...]) -> float | tuple[float, ...]:
    """What `simulate.validate` takes: one threshold per head for `per_layer`, the shared one for `global`."""
    return tuple(thresholds) if decision == "per_layer" else float(thresholds[0])


def load_trained_heads(settings: TrainSettings, model) -> ExitHeads:
    """`heads=DIR` (or a Hub id) for a run without the heads stage; refused if trained on another model."""
    heads = ExitHeads.from_pretrained(settings.heads)
    heads.check_fits(model, settings.model.name_or_path, settings.model.revision)
    return heads


@contextmanager
def _stage(name: str):
    """Logs the stage's wall time and the process's peak resident memory so far."""
    start = time.perf_counter()
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    log.info("stage %s: %.1f s, peak resident memory so far %.2f GiB", name, time.perf_counter() - start,
             peak / 2**30)


def run(settings: TrainSettings, output_dir: Path, model, processor,
        splits: dict[str, list[Sample]] | None = None) -> dict:
    """The configured stages in order; returns the validation report (empty without the validate stage). `splits`:
    the data, if already read (`dyvte.preflight.check_train_inputs`)."""
    stages = settings.stages
    if "validate" in stages and "heads" not in stages:  # heads of another model stop the run before any labelling
        heads = load_trained_heads(settings, model)
    splits = load_splits(settings.data) if splits is None else splits
    with _stage("labels" if "labels" in stages else "label cache check"):
        stores = label_stores(settings, model, processor, splits, compute="labels" in stages)
    for store in stores.values():
        store.verify()  # complete and undamaged, or a CacheError naming the file and the repair
    if "heads" in stages:
        with _stage("heads"):
            heads = train_heads(settings, model, stores, output_dir)
        if rank_zero_only.rank != 0:  # under DDP every rank ends with the same heads; rank 0 writes them
            return {}
        heads.save_pretrained(output_dir / "heads")
        if settings.trainer.get("fast_dev_run"):
            return {}
    if "validate" in stages:
        with _stage("validate"):
            return validate_heads(settings, model, heads, stores, output_dir)
    return {}
