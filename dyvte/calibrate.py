"""Choosing static settings from a few samples: VTW's withdrawal layer."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .engine import VisualExit


@dataclass
class VTWSearch:
    k: int  # the withdrawal layer: first k >= start_layer with KL below eta (L if none)
    kl: list[float]  # KL(full || exit at k) of the first answer token, averaged over samples, for k = 0..L
    eta: float
    start_layer: int


@torch.no_grad()
def vtw_search(engine: VisualExit, batches: list[dict], eta: float = 0.003, start_layer: int = 5, n: int = 20
               ) -> VTWSearch:
    """VTW's search: exit at the first layer whose next-token distribution stays within `eta` (KL) of the full
    model's, measured at the first answer token over `n` calibration samples (processor batches)."""
    if not any(bool(engine.adapter.visual_token_mask(b["input_ids"]).any()) for b in batches):
        raise ValueError("vtw_search needs calibration samples with visual tokens; none of these has any.")
    totals = torch.zeros(engine.num_layers + 1, dtype=torch.float64)
    seen = 0
    for batch in batches:  # whole batches until at least `n` samples
        if seen >= n:
            break
        inputs = dict(batch)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        positions = engine.adapter.generation_position_ids(ids, mask, **inputs)

        def next_token_log_p(exit_layer):
            logits = engine.prefill(ids, mask, positions, exit_layer, use_cache=False, last_only=True, **inputs)
            return F.log_softmax(logits.logits[:, -1].float(), dim=-1)

        full = next_token_log_p(None)
        for k in range(engine.num_layers + 1):
            kl = F.kl_div(next_token_log_p(k), full, log_target=True, reduction="none").sum(dim=-1)
            totals[k] += kl.sum().double()
        seen += ids.shape[0]
    kl = (totals / seen).tolist()
    below = [k for k in range(start_layer, engine.num_layers + 1) if kl[k] < eta]
    return VTWSearch(k=below[0] if below else engine.num_layers, kl=kl, eta=eta, start_layer=start_layer)

