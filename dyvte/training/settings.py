"""The settings of `train.py` as typed objects: one dataclass per section of `conf/train.yaml`, stored as that
section's Hydra schema (`dyvte.configs`), so a composed config is typed while it is composed and `train.py` hands
the stages a `TrainSettings`, never a `DictConfig`.

The defaults of `labels`, `features` and `validate` live here (the YAML lists only the schema); `head_training`'s
values come from its group (`conf/head_training/*.yaml`), `model`'s from `conf/model/*.yaml` (`ModelSettings`) and
`data`'s from `conf/data/*.yaml` (`DataSettings`). The rules every value obeys are checked at start-up by
`dyvte.configs.check_train_config`, before any model time.
"""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from ..data import DataSettings
from ..loading import ModelSettings


@dataclass
class LabelSettings:
    """`labels`: the dense label pass (DyVTE Eq. 6)."""

    reference: str = "model"  # model: the frozen model's own greedy answer | ground_truth: the dataset answer
    alpha: float = 1.03  # exit is safe if its cross-entropy < alpha * the full model's
    layers: Any = "all"  # all (dense) | random (one per sample, as in the paper) | [k1, k2, ...]
    max_new_tokens: int = 16
    batch_size: int = 16
    shard_size: int = 256


@dataclass
class FeatureSettings:
    """`features`: the head features the label cache stores (`dyvte.engine.features`)."""

    span: str = "after_first_visual"  # after_first_visual | all_text: the text tokens averaged
    groups: list[str] = field(default_factory=lambda: ["text"])  # text, visual, attention, lens


@dataclass
class HeadTrainingSettings:
    """`head_training` (a group: `dyvte`, dyvte's default heads, or `paper`, DyVTE's): the heads and their schedule;
    `decision` and `calibration` are `validate`'s defaults for these heads."""

    hidden: int = MISSING  # width h of each head's hidden layer
    lr: float = MISSING
    weight_decay: float = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    class_weights: list[float] | None = None  # [w_stay, w_exit], e.g. [2.0, 1.0] to penalise wrong exits more
    inputs: list[str] = MISSING  # mean_text, last_text, mean_visual, last_visual, attention, lens
    architecture: str = MISSING  # per_layer (one MLP per layer) | shared (one MLP, a layer embedding)
    label_shape: str = MISSING  # per_layer: exit k is safe | monotone: exit k and every later exit are safe
    label_target: str = MISSING  # safe: answer kept and CE within alpha | match: answer kept
    decision: str = MISSING  # global (one threshold) | per_layer (one per head)
    calibration: str = MISSING  # val | crossfit (out-of-fold train scores plus val)


@dataclass
class ValidateSettings:
    """`validate`: how thresholds are chosen (and certified) and where the report is made."""

    split: str = "test"  # held-out split for the report
    threshold: Any = "auto"  # auto: the point estimate below | a number: that one threshold
    min_agreement: float = 0.98  # agreement the point-estimate thresholds keep on the rows they are chosen on
    decision: str = "${head_training.decision}"  # global: one threshold | per_layer: one per head
    calibration: str = "${head_training.calibration}"  # the tuning rows: val | crossfit (out-of-fold train + val)
    folds: int = 5  # crossfit: heads trained on folds-1 of `folds` parts of train score the part left out
    thresholds: list[float] = field(default_factory=lambda: [
        0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999])
    # Certified thresholds (docs/design.md, "Certified thresholds"): agreement >= target_agreement on new samples
    # with probability >= confidence over the draw of the data's certification split, rows the heads never saw.
    target_agreement: float | None = None  # null: the point estimate (min_agreement) | e.g. 0.98
    confidence: float = 0.9  # 1 - delta
    groups: str | None = None  # null: marginal | family: the bound holds within every group large enough


@dataclass
class TrainSettings:
    """A composed `conf/train.yaml`, typed: what `dyvte.training.pipeline.run` takes. `trainer` and `logger` stay
    the plain keyword mappings Lightning's `Trainer` and Hydra's `instantiate` take."""

    model: ModelSettings
    data: DataSettings
    labels: LabelSettings
    features: FeatureSettings
    head_training: HeadTrainingSettings
    validate: ValidateSettings
    trainer: dict
    logger: dict | None
    stages: list[str]
    heads: str | None  # without the heads stage: the trained heads to validate (a folder or a Hub id)
    seed: int
    cache_dir: str
    verbose: bool

    def certifies(self) -> bool:
        """The run certifies its thresholds (`validate.target_agreement`), so it labels the certification split."""
        return "validate" in self.stages and self.validate.target_agreement is not None
