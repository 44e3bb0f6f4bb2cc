"""Exit heads: one small MLP per decoder layer that reads the text tokens' state and scores "exit now".

Head `i` reads the output of decoder layer `i`; its "exit" means `exit_layer = i + 1`. Features are
`[mean of the prompt's text tokens except the last, last prompt token]`, so a head's input is `2 * hidden_size`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .loading import model_identity

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ExitHeads(nn.Module):
    """Independent `Linear(2d, h) -> GELU -> Linear(h, 2)` heads, one per decoder layer (DyVTE's hyper-networks)."""

    def __init__(self, hidden_size: int, num_layers: int, head_hidden: int = 2048, meta: dict | None = None):
        super().__init__()
        self.hidden_size, self.num_layers, self.head_hidden = hidden_size, num_layers, head_hidden
        self.meta = dict(meta or {})  # model name/revision, feature span, label config, default threshold
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_size, head_hidden), nn.GELU(), nn.Linear(head_hidden, 2))
            for _ in range(num_layers)
        )

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, L, 2d] -> logits [B, L, 2]."""
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def exit_probability(self, layer_idx: int, features: torch.Tensor) -> torch.Tensor:
        """p(exit) [B] of head `layer_idx` for features [B, 2d]."""
        head = self.heads[layer_idx]
        return head(features.to(head[0].weight.dtype)).softmax(dim=-1)[:, 1]

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "head_hidden": self.head_hidden,
            **self.meta,
        }
        _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2)))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p)))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ExitHeads":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{directory} holds no exit heads ({CONFIG_NAME} + {WEIGHTS_NAME}).")
        config = json.loads((directory / CONFIG_NAME).read_text())
        sizes = {k: config.pop(k) for k in ("hidden_size", "num_layers", "head_hidden")}
        heads = cls(**sizes, meta=config)
        heads.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return heads

    def check_fits(self, model, name_or_path: str | None = None, revision: str | None = None) -> None:
        """Refuse heads trained on another model: sizes must match; the weights of a local checkpoint (else the
        name) and the revision too when both are known."""
        text = model.config.get_text_config(decoder=True)
        problems = []
        if text.hidden_size != self.hidden_size:
            problems.append(f"hidden size {self.hidden_size} vs the model's {text.hidden_size}")
        if text.num_hidden_layers != self.num_layers:
            problems.append(f"{self.num_layers} layers vs the model's {text.num_hidden_layers}")
        trained_on, trained_weights = self.meta.get("model"), self.meta.get("weights_sha256")
        weights = model_identity(name_or_path, revision).get("weights_sha256") if name_or_path else None
        if weights and trained_weights:  # a local checkpoint: its weights decide, whatever its path is called
            if weights != trained_weights:
                problems.append(
                    f"trained on weights with sha256 {trained_weights[:12]}…, but {name_or_path!r} has "
                    f"{weights[:12]}… (a retrained or other checkpoint: train the heads again)"
                )
        elif name_or_path and trained_on and trained_on != name_or_path:
            problems.append(f"trained on {trained_on!r}, not {name_or_path!r}")
        trained_revision = self.meta.get("revision")
        if revision and trained_revision and trained_revision != revision:
            problems.append(f"trained on revision {trained_revision!r}, not {revision!r}")
        if problems:
            raise ValueError("these exit heads do not fit the model: " + "; ".join(problems) + ".")


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary sibling, then rename: a crash never leaves a half-written file under `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)
