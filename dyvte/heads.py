"""Exit heads: one small MLP per decoder layer that reads the text tokens' state and scores "exit now".

Head `i` reads the output of decoder layer `i`; its "exit" means `exit_layer = i + 1`. DyVTE's heads read
`[mean of the prompt's text tokens except the last, last prompt token]` (`2 * hidden_size` wide); the inputs and
architecture are configurable (`ExitHeadsConfig`), and the features come from `dyvte.engine.features`.

`ExitHeads` is a Hub model (`huggingface_hub.PyTorchModelHubMixin`): `save_pretrained(dir)` writes
`config.json` (an `ExitHeadsConfig`) and `model.safetensors`; `ExitHeads.from_pretrained(dir or "user/heads")` and
`push_to_hub("user/heads")` work as for any Hub model.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from .engine.features import LENS_FEATURES
from .files import atomic_write
from .loading import model_identity

# What a head can read (`ExitHeadsConfig.inputs`): halves of the feature groups of `dyvte.engine.features`.
INPUT_PARTS = {
    "mean_text": ("text", 0), "last_text": ("text", 1), "mean_visual": ("visual", 0), "last_visual": ("visual", 1),
    "attention": ("attention", None), "lens": ("lens", None),
}
PAPER_INPUTS = ("mean_text", "last_text")
ARCHITECTURES = ("per_layer", "shared")
LABEL_SHAPES = ("per_layer", "monotone")
LABEL_TARGETS = ("safe", "match")


@dataclass
class ExitHeadsConfig:
    """What the heads are and what they were trained on (`config.json`).

    DyVTE's heads are `inputs=("mean_text", "last_text")`, `architecture="per_layer"`, `head_hidden=2048`, one
    global `threshold`, trained on per-layer labels. The other settings: `inputs` may add the visual tokens' mean and
    last state, the attention status and the logit lens; `architecture="shared"` is one MLP for every layer with a
    learned layer embedding; `thresholds` holds one threshold per head; `label_shape="monotone"` records heads
    trained on "safe from here on" labels, `label_target="match"` heads trained on "the answer is kept" without
    DyVTE's cross-entropy margin."""

    hidden_size: int  # the decoder's hidden size d
    num_layers: int  # one head per decoder layer
    head_hidden: int = 2048  # width h of each head's hidden layer
    feature_span: str = "after_first_visual"  # which prompt tokens are averaged into the text features
    threshold: float = 0.5  # default exit threshold, calibrated by `train.py`
    model: str | None = None  # the MLLM the heads were trained on: name or path
    revision: str | None = None
    weights_sha256: str | None = None  # that MLLM's weight files, for a local checkpoint (`loading.model_identity`)
    commit: str | None = None  # the Hub commit `revision` resolved to, for a Hub id
    withdraw: str = "both"  # which visual tokens exit (images, videos or both)
    labels: dict | None = None  # the label settings of the training data
    inputs: tuple[str, ...] = PAPER_INPUTS  # the parts of the features a head reads (`INPUT_PARTS`)
    num_attention_heads: int | None = None  # the decoder's attention heads (width of the `attention` input)
    architecture: str = "per_layer"  # per_layer (the paper) | shared
    thresholds: tuple[float, ...] | None = None  # per-head thresholds (None: `threshold` for every head)
    label_shape: str = "per_layer"  # what the heads were trained on: per_layer (the paper) | monotone
    label_target: str = "safe"  # safe: DyVTE's label (answer kept, CE within alpha) | match: answer kept

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "head_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ExitHeadsConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
        self.inputs = tuple(self.inputs)
        if not self.inputs or set(self.inputs) - set(INPUT_PARTS) or len(set(self.inputs)) != len(self.inputs):
            raise ValueError(f"inputs must be distinct parts of {', '.join(INPUT_PARTS)}; got {list(self.inputs)}.")
        if "attention" in self.inputs and not self.num_attention_heads:
            raise ValueError("the attention input needs num_attention_heads (the decoder's attention heads).")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}.")
        if self.label_shape not in LABEL_SHAPES:
            raise ValueError(f"label_shape must be one of {', '.join(LABEL_SHAPES)}; got {self.label_shape!r}.")
        if self.label_target not in LABEL_TARGETS:
            raise ValueError(f"label_target must be one of {', '.join(LABEL_TARGETS)}; got {self.label_target!r}.")
        if self.thresholds is not None:
            self.thresholds = tuple(float(t) for t in self.thresholds)
            if len(self.thresholds) != self.num_layers:
                raise ValueError(f"thresholds needs one value per head ({self.num_layers}), got {len(self.thresholds)}.")

    @property
    def feature_groups(self) -> tuple[str, ...]:
        """The feature groups the inputs come from, in `dyvte.engine.features.FEATURE_GROUPS` order."""
        needed = {INPUT_PARTS[part][0] for part in self.inputs}
        return tuple(g for g in ("text", "visual", "attention", "lens") if g in needed)

    @property
    def input_size(self) -> int:
        widths = {"attention": self.num_attention_heads or 0, "lens": LENS_FEATURES}
        return sum(self.hidden_size if half is not None else widths[group]
                   for group, half in (INPUT_PARTS[part] for part in self.inputs))


class ExitHeads(nn.Module, PyTorchModelHubMixin, library_name="dyvte", tags=["visual-token-exit", "dyvte"]):
    """One exit head per decoder layer: `Linear(n_in, h) -> GELU -> Linear(h, 2)` on the configured inputs.

    `per_layer` (DyVTE's hyper-networks): independent MLPs. `shared`: one MLP for all layers, with a learned
    embedding of the layer added to its hidden layer, so a head costs `n_in * h` parameters once, not per layer."""

    def __init__(self, config: ExitHeadsConfig):
        super().__init__()
        self.config = config
        n_in, hidden = config.input_size, config.head_hidden
        if config.architecture == "per_layer":
            self.heads = nn.ModuleList(
                nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 2)) for _ in range(config.num_layers)
            )
        else:
            self.shared = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 2))
            self.layer_embedding = nn.Embedding(config.num_layers, hidden)

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

    @property
    def feature_groups(self) -> tuple[str, ...]:
        return self.config.feature_groups

    def calibrate(self, threshold: float, thresholds: tuple[float, ...] | None = None) -> None:
        """Record the calibrated default `threshold` and per-head `thresholds` (None: `threshold` for every head) in
        the config that `save_pretrained` writes, checked as `ExitHeadsConfig` checks them when it is built."""
        checked = replace(self.config, threshold=float(threshold), thresholds=thresholds)
        self.config.threshold, self.config.thresholds = checked.threshold, checked.thresholds

    def layer_threshold(self, layer_idx: int) -> float:
        """Head `layer_idx`'s default threshold: its own where calibrated per head, else the global one."""
        return self.config.thresholds[layer_idx] if self.config.thresholds else self.threshold

    def assemble(self, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        """The heads' input [..., n_in] from feature groups [..., width] (`dyvte.engine.features`)."""
        return self.assemble_inputs(self.config, groups)

    @staticmethod
    def assemble_inputs(config: ExitHeadsConfig, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        d = config.hidden_size
        parts = []
        for part in config.inputs:
            group, half = INPUT_PARTS[part]
            values = groups[group]
            parts.append(values if half is None else values[..., half * d : (half + 1) * d])
        return torch.cat(parts, dim=-1)

    def layer_logits(self, layer_idx: int, inputs: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2] of head `layer_idx` for inputs [B, n_in]."""
        if self.config.architecture == "per_layer":
            return self.heads[layer_idx](inputs)
        first, activation, second = self.shared
        return second(activation(first(inputs) + self.layer_embedding.weight[layer_idx]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs [B, L, n_in] -> logits [B, L, 2]."""
        if self.config.architecture == "per_layer":
            return torch.stack([head(inputs[:, i]) for i, head in enumerate(self.heads)], dim=1)
        first, activation, second = self.shared
        return second(activation(first(inputs) + self.layer_embedding.weight))

    def exit_probability(self, layer_idx: int, inputs: torch.Tensor) -> torch.Tensor:
        """p(exit) [B] of head `layer_idx` for inputs [B, n_in]."""
        dtype = next(self.parameters()).dtype
        return self.layer_logits(layer_idx, inputs.to(dtype)).softmax(dim=-1)[:, 1]

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
        """Refuse heads trained on another model: sizes must match; the weights of a local checkpoint (every weight
        file, `loading.model_identity`), else the Hub commit, else the name, and the revision too when known."""
        text = model.config.get_text_config(decoder=True)
        config = self.config
        problems = []
        if text.hidden_size != config.hidden_size:
            problems.append(f"hidden size {config.hidden_size} vs the model's {text.hidden_size}")
        if text.num_hidden_layers != config.num_layers:
            problems.append(f"{config.num_layers} layers vs the model's {text.num_hidden_layers}")
        identity = model_identity(name_or_path, revision) if name_or_path else {}
        weights, commit = identity.get("weights_sha256"), identity.get("commit")
        if weights and config.weights_sha256:  # a local checkpoint: its weights decide, whatever its path is called
            if weights != config.weights_sha256:
                problems.append(
                    f"trained on weights with sha256 {config.weights_sha256[:12]}…, but {name_or_path!r} has "
                    f"{weights[:12]}… (a retrained or other checkpoint: train the heads again)"
                )
        elif commit and config.commit and commit != config.commit:  # a Hub id: the commit its revision resolved to
            problems.append(f"trained on commit {config.commit[:12]} of {config.model!r}, but {name_or_path!r} "
                            f"resolves to commit {commit[:12]} (the repository changed: train the heads again)")
        elif name_or_path and config.model and config.model != name_or_path:
            problems.append(f"trained on {config.model!r}, not {name_or_path!r}")
        if revision and config.revision and config.revision != revision:
            problems.append(f"trained on revision {config.revision!r}, not {revision!r}")
        if problems:
            raise ValueError("these exit heads do not fit the model: " + "; ".join(problems)
                             + ". Train exit heads on this model (train.py with its model.name_or_path).")
