"""Training exit heads on the label cache with Lightning: no MLLM in the loop, only cached features."""

import lightning as L
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader, TensorDataset

from .heads import ExitHeads


def cache_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, L, 2d] (fp32) and head labels [N, L]: head `i` is labelled by exit layer `i + 1`."""
    table = torch_columns(dataset, ["features", "labels"])
    return table["features"].float(), table["labels"][:, 1:].long()


def torch_columns(dataset: Dataset, columns: list[str]) -> dict[str, torch.Tensor]:
    """Whole columns of an Arrow dataset as tensors."""
    return dataset.with_format("torch", columns=columns)[:]


class HeadsDataModule(L.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset | None = None, batch_size: int = 256, seed: int = 0):
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*cache_tensors(self.train))
        self.val_set = TensorDataset(*cache_tensors(self.val)) if self.val is not None else None

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(self.val_set, batch_size=4096) if self.val_set is not None else []


class HeadsModule(L.LightningModule):
    """Cross-entropy on every labelled (sample, layer); AdamW with a cosine schedule; per-layer exit metrics."""

    def __init__(self, heads: ExitHeads, lr: float = 4e-5, weight_decay: float = 0.0,
                 class_weights: list[float] | None = None):
        super().__init__()
        self.heads = heads
        self.lr, self.weight_decay = lr, weight_decay
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float) if class_weights else None)
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

    def on_validation_epoch_start(self) -> None:
        layers = self.heads.num_layers
        self.counts = torch.zeros(layers, 4, device=self.device)  # tp, fp, fn, tn of the exit class

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        loss, logits = self.loss(features, labels)
        predicted = logits.argmax(-1) == 1
        labelled, positive = labels >= 0, labels == 1
        for column, hit in enumerate((predicted & positive, predicted & ~positive, ~predicted & positive,
                                      ~predicted & ~positive)):
            self.counts[:, column] += (hit & labelled).sum(0)
        self.log("val/loss", loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        for layer, metrics in enumerate(confusion_metrics(self.counts)):
            for name, value in metrics.items():
                self.log(f"val/layer{layer}/{name}", value)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.heads.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def confusion_metrics(counts: torch.Tensor) -> list[dict[str, float]]:
    """Per layer, from (tp, fp, fn, tn): accuracy, precision and recall of the exit class, positive rate."""
    metrics = []
    for tp, fp, fn, tn in counts.tolist():
        total = tp + fp + fn + tn
        metrics.append({
            "accuracy": (tp + tn) / total if total else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "positive_rate": (tp + fn) / total if total else float("nan"),
        })
    return metrics
