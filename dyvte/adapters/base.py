"""What every family adapter provides to the withdrawal engine."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EmbeddedInputs:
    """Language-model inputs after the vision tower: `inputs_embeds` [B, T, d] and which positions are visual."""

    inputs_embeds: torch.Tensor
    visual_mask: torch.Tensor


class FamilyAdapter:
    """Access to the stock decoder of one MLLM family; subclasses implement `embed`.

    The defaults fit decoders laid out as transformers v5 Llama-style text models
    (`model.model.language_model.{embed_tokens, layers, norm, rotary_emb}` and `model.lm_head`).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.language_model = model.model.language_model
        self.text_config = model.config.get_text_config(decoder=True)

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation or "eager"

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary `(cos, sin)` of shape [B, T, head_dim], computed once for the full sequence and gathered later."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def prefill_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Positions the stock forward uses when none are given: 0..T-1 for every sample."""
        batch, length = input_ids.shape
        return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)

    def next_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position of the first generated token of each sample: one past its last real prompt token."""
        return position_ids.masked_fill(attention_mask == 0, -1).amax(dim=-1) + 1

    def embed(self, input_ids: torch.Tensor, **vision_inputs) -> EmbeddedInputs:
        raise NotImplementedError
