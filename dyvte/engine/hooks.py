"""The per-layer hook through which policies steer the engine: what a policy sees and what it returns.

Before decoder layer `i` runs, the engine shows the policy the sub-batch of samples that still have visual tokens
(its hidden states are layer `i - 1`'s output) and the policy returns a `Decision`: which of those samples exit
now (all their visual tokens leave) and, optionally, which tokens the others keep. A policy is one small object
with its own state, reset by `reset` at the start of every prefill; `a + b` composes two policies.
"""

from dataclasses import dataclass

import torch

from .subbatch import SubBatch


@dataclass
class Decision:
    exit: torch.Tensor | None = None  # [b] bool: drop all visual tokens before this layer
    keep: torch.Tensor | None = None  # [b, n] bool: slots to keep (visual ones may be dropped), for pruning


@dataclass
class PrefillState:
    """What a policy may read about the current prefill call."""

    engine: object  # the `VisualExit` running the prefill
    input_ids: torch.Tensor  # [B, T] the prompt
    attention_mask: torch.Tensor  # [B, T]
    visual_mask: torch.Tensor  # [B, T] visual tokens that may leave


class ExitPolicy:
    """Base class of every policy: `before_layer` decides; `reset` clears what the policy remembered."""

    name = "policy"

    def reset(self, state: PrefillState) -> None:
        """Called once at the start of every prefill, before layer 0; a policy with state clears it here."""

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        raise NotImplementedError

    def __add__(self, other: "ExitPolicy") -> "ExitPolicy":
        return Compose([self, other])


class Compose(ExitPolicy):
    """Several policies at once: a sample exits if any says so; a token stays only if all keep it."""

    def __init__(self, policies: list[ExitPolicy]):
        self.policies = [q for p in policies for q in (p.policies if isinstance(p, Compose) else [p])]
        self.name = "+".join(p.name for p in self.policies)

    def reset(self, state: PrefillState) -> None:
        for policy in self.policies:
            policy.reset(state)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        exits, keep = None, None
        for policy in self.policies:
            decision = policy.before_layer(layer_idx, sub, state)
            if decision.exit is not None:
                exits = decision.exit if exits is None else exits | decision.exit
            if decision.keep is not None:
                keep = decision.keep if keep is None else keep & decision.keep
        return Decision(exits, keep)
