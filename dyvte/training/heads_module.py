"""Training exit heads on the label store with Lightning: no MLLM in the loop, only stored features."""

import lightning as L
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader
from torchmetrics.classification import MultilabelStatScores

from ..heads import ExitHeads, ExitHeadsConfig
from .label_store import GROUP_COLUMNS

#: rows per batch where heads only score cached rows (validation, p(exit)): 512 rows of a 7B model's inputs are
#: 512 x 32 x 8192 fp32 values, 0.5 GiB
EVAL_BATCH = 512


def _check_groups(dataset: Dataset, config: ExitHeadsConfig) -> list[str]:
    """The cache columns of the feature groups the heads read (refused if the cache lacks one)."""
    missing = [g for g in config.feature_groups if GROUP_COLUMNS[g] not in dataset.column_names]
    if missing:
        raise ValueError(
            f"the heads read the feature groups {missing}, which this label cache does not hold: label with "
            f"features.groups including {missing} (a new cache), or choose inputs from the stored groups."
        )
    return [GROUP_COLUMNS[g] for g in config.feature_groups]


def head_inputs(dataset: Dataset, config: ExitHeadsConfig, rows: list[int] | slice = slice(None)) -> torch.Tensor:
    """The heads' inputs [n, L, n_in] (fp32) of `rows` (all by default), assembled from the cached feature groups
    the heads read. Only these rows are read from the memory-mapped cache."""
    table = dataset.with_format("torch", columns=_check_groups(dataset, config))[rows]
    groups = {g: table[GROUP_COLUMNS[g]].float() for g in config.feature_groups}
    return ExitHeads.assemble_inputs(config, groups)


class HeadInputs(torch.utils.data.Dataset):
    """(inputs [L, n_in], labels [L]) per cached row, the inputs read from the memory-mapped Arrow cache one batch
    at a time (`__getitems__`): memory holds one batch of fp32 inputs, not the whole cache (6,650 LLaVA-1.5-7B rows
    hold 32 x 8192 fp16 text features each, 3.5 GB; as one fp32 tensor, 7 GB beside the model)."""

    def __init__(self, dataset: Dataset, config: ExitHeadsConfig):
        _check_groups(dataset, config)
        self.dataset, self.config = dataset, config
        self.labels = head_labels(dataset, config.label_shape, config.label_target)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        inputs = head_inputs(self.dataset, self.config, indices)
        return list(zip(inputs, self.labels[indices]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


def head_labels(dataset: Dataset, shape: str = "per_layer", target: str = "safe") -> torch.Tensor:
    """Head labels [N, L] (1 exit, 0 stay, -1 not labelled): head `i` is labelled by exit layer `i + 1`.

    `target`: `safe` (DyVTE) is the cached label, the answer kept and its cross-entropy within `alpha` of the full
    model's; `match` is the answer kept, which is what agreement with the full model measures (unlabelled exits
    stay -1). `shape`: `per_layer` (DyVTE) labels exit `i + 1` alone; `monotone` labels exit `i + 1` positive when
    it and every later exit are, which is what the first-exit rule needs: a head that fires where a later exit
    would change the answer again is wrong even if its own exit happens to be right."""
    labels = torch_columns(dataset, ["labels"])["labels"][:, 1:].long()
    if target == "match":
        match = torch_columns(dataset, ["match"])["match"][:, 1:].long()
        labels = torch.where(labels >= 0, match, labels)
    if shape == "per_layer":
        return labels
    if (labels < 0).any():
        raise ValueError("monotone labels need every exit layer labelled (labels.layers=all).")
    return labels.flip(1).cummin(dim=1).values.flip(1)


def torch_columns(dataset: Dataset, columns: list[str]) -> dict[str, torch.Tensor]:
    """Whole columns of an Arrow dataset as tensors."""
    return dataset.with_format("torch", columns=columns)[:]


def head_stat_scores(num_layers: int, sync_on_compute: bool = True) -> MultilabelStatScores:
    """Per head, counts of the exit class (predicted `p_exit > 0.5`) against its labels; unlabelled (-1) entries
    are ignored. A torchmetrics metric, so under DDP the counts are summed over ranks (`sync_on_compute`)."""
    return MultilabelStatScores(num_labels=num_layers, average=None, ignore_index=-1, sync_on_compute=sync_on_compute)


def layer_metrics(stats: torch.Tensor) -> list[dict[str, float]]:
    """Per head, from `head_stat_scores` ([L, 5]: tp, fp, tn, fn, positives): accuracy, precision and recall of
    the exit class, and how often exit is safe."""
    metrics = []
    for tp, fp, tn, fn, _ in stats.tolist():
        total = tp + fp + tn + fn
        metrics.append({
            "accuracy": (tp + tn) / total if total else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "positive_rate": (tp + fn) / total if total else float("nan"),
        })
    return metrics


class HeadsDataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, config: ExitHeadsConfig, val: Dataset | None = None, batch_size: int = 256,
                 seed: int = 0):
        super().__init__()
        self.train, self.val, self.config, self.batch_size, self.seed = train, val, config, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set = HeadInputs(self.train, self.config)
        self.val_set = HeadInputs(self.val, self.config) if self.val is not None else None

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val_set, batch_size=EVAL_BATCH) if self.val_set is not None else []


class HeadsModule(L.LightningModule):
    """Cross-entropy on every labelled (sample, layer); AdamW with a cosine schedule; per-layer exit metrics."""

    def __init__(self, heads: ExitHeads, lr: float = 4e-5, weight_decay: float = 0.0,
                 class_weights: list[float] | None = None):
        super().__init__()
        self.heads = heads
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float) if class_weights else None)
        self.val_stats = head_stat_scores(heads.num_layers)
        self.save_hyperparameters(ignore=["heads"])

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.heads(features)
        labelled = labels >= 0
        loss = F.cross_entropy(logits[labelled], labels[labelled], weight=self.class_weights)
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self.loss(*batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        loss, logits = self.loss(features, labels)
        self.val_stats.update((logits.argmax(-1) == 1).int(), labels)
        self.log("val/loss", loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        for layer, metrics in enumerate(layer_metrics(self.val_stats.compute())):
            for name, value in metrics.items():
                self.log(f"val/layer{layer}/{name}", value)
        self.val_stats.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.heads.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
