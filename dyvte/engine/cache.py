"""The KV cache left by withdrawal: per layer, only the keys that layer actually computed."""

import torch
from transformers import DynamicCache

from .subbatch import attention_mask


class WithdrawalCache(DynamicCache):
    """A `DynamicCache` whose layers hold a different number of keys per sample.

    Layer `l` stores keys `[B, H, S_l, D]`, each sample's keys packed to the right, with `key_valid[l]` `[B, S_l]`
    marking the real ones. Layers at or after a sample's exit hold only its text keys, so `S_l` shrinks to the
    longest text once every sample has exited: decode attends over fewer keys and the cache takes less memory.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], key_valid: list[torch.Tensor]):
        super().__init__()
        for layer_idx, (k, v) in enumerate(zip(keys, values)):
            self.update(k, v, layer_idx)
        self.key_valid = key_valid

    def num_keys(self, layer_idx: int) -> torch.Tensor:
        """Real keys per sample in layer `layer_idx` ([B])."""
        return self.key_valid[layer_idx].sum(dim=1)

    def nbytes(self) -> int:
        """Bytes held by keys and values, padding included (what the allocator really holds)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def add_step(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Register one new (real) key per sample in every layer; returns the decode masks [B, 1, 1, S_l + 1]."""
        masks = []
        for layer_idx, valid in enumerate(self.key_valid):
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
            self.key_valid[layer_idx] = valid
            masks.append(attention_mask(valid, dtype, query_length=1))
        return masks

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.key_valid = [valid[indices] for valid in self.key_valid]
