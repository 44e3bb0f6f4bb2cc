"""Exit heads: one small MLP per decoder layer that reads the text tokens' state and scores "exit now".

Head `i` reads the output of decoder layer `i`; its "exit" means `exit_layer = i + 1`. Features are
`[mean of the prompt's text tokens except the last, last prompt token]`, so a head's input is `2 * hidden_size`.

`ExitHeads` is a Hub model (`huggingface_hub.PyTorchModelHubMixin`): `save_pretrained(dir)` writes
`config.json` (an `ExitHeadsConfig`) and `model.safetensors`; `ExitHeads.from_pretrained(dir or "user/heads")` and
`push_to_hub("user/heads")` work as for any Hub model.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write
from .loading import model_identity


@dataclass
class ExitHeadsConfig:
    """What the heads are and what they were trained on (`config.json`)."""

    hidden_size: int  # the decoder's hidden size d (features are 2d wide)
    num_layers: int  # one head per decoder layer
    head_hidden: int = 2048  # width h of each head's hidden layer
    feature_span: str = "after_first_visual"  # which prompt tokens are averaged into the features
    threshold: float = 0.5  # default exit threshold, calibrated by `train.py`
    model: str | None = None  # the MLLM the heads were trained on: name or path
    revision: str | None = None
    weights_sha256: str | None = None  # that MLLM's weights, for a local checkpoint
    withdraw: str = "both"  # which visual tokens exit (images, videos or both)
    labels: dict | None = None  # the label settings of the training data

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "head_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ExitHeadsConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")


class ExitHeads(nn.Module, PyTorchModelHubMixin, library_name="dyvte", tags=["visual-token-exit", "dyvte"]):
    """Independent `Linear(2d, h) -> GELU -> Linear(h, 2)` heads, one per decoder layer (DyVTE's hyper-networks)."""

    def __init__(self, config: ExitHeadsConfig):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * config.hidden_size, config.head_hidden), nn.GELU(),
                          nn.Linear(config.head_hidden, 2))
            for _ in range(config.num_layers)
        )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def head_hidden(self) -> int:
        return self.config.head_hidden

    @property
    def threshold(self) -> float:
        return float(self.config.threshold)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, L, 2d] -> logits [B, L, 2]."""
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.heads)], dim=1)

    def exit_probability(self, layer_idx: int, features: torch.Tensor) -> torch.Tensor:
        """p(exit) [B] of head `layer_idx` for features [B, 2d]."""
        head = self.heads[layer_idx]
        return head(features.to(head[0].weight.dtype)).softmax(dim=-1)[:, 1]

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights as a plain safetensors state dict (the mixin writes `config.json` and the model card)."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(save_directory / constants.SAFETENSORS_SINGLE_FILE, lambda tmp: save_file(state, str(tmp)))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", **model_kwargs) -> "ExitHeads":
        """Every weight must be there and fit (strict), from a local folder or a Hub repository."""
        if Path(model_id).is_dir():
            weights = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
            if not weights.exists():
                raise FileNotFoundError(f"{model_id} holds no exit heads ({constants.SAFETENSORS_SINGLE_FILE}).")
        else:
            weights = hf_hub_download(model_id, constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        heads = cls(**model_kwargs)
        heads.load_state_dict(load_file(str(weights), device=map_location))
        return heads.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "ExitHeads":
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and not (path / constants.CONFIG_NAME).exists():
            raise FileNotFoundError(f"{path} holds no exit heads ({constants.CONFIG_NAME} + "
                                    f"{constants.SAFETENSORS_SINGLE_FILE}).")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def check_fits(self, model, name_or_path: str | None = None, revision: str | None = None) -> None:
        """Refuse heads trained on another model: sizes must match; the weights of a local checkpoint (else the
        name) and the revision too when both are known."""
        text = model.config.get_text_config(decoder=True)
        config = self.config
        problems = []
        if text.hidden_size != config.hidden_size:
            problems.append(f"hidden size {config.hidden_size} vs the model's {text.hidden_size}")
        if text.num_hidden_layers != config.num_layers:
            problems.append(f"{config.num_layers} layers vs the model's {text.num_hidden_layers}")
        weights = model_identity(name_or_path, revision).get("weights_sha256") if name_or_path else None
        if weights and config.weights_sha256:  # a local checkpoint: its weights decide, whatever its path is called
            if weights != config.weights_sha256:
                problems.append(
                    f"trained on weights with sha256 {config.weights_sha256[:12]}…, but {name_or_path!r} has "
                    f"{weights[:12]}… (a retrained or other checkpoint: train the heads again)"
                )
        elif name_or_path and config.model and config.model != name_or_path:
            problems.append(f"trained on {config.model!r}, not {name_or_path!r}")
        if revision and config.revision and config.revision != revision:
            problems.append(f"trained on revision {config.revision!r}, not {revision!r}")
        if problems:
            raise ValueError("these exit heads do not fit the model: " + "; ".join(problems) + ".")
