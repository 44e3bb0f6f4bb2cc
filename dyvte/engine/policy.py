"""The policy interface through which policies steer the engine, layer by layer: what a policy sees and returns.

Before decoder layer `i` runs, the engine shows the policy the sub-batch of samples that still have visual tokens
(its hidden states are layer `i - 1`'s output) and the policy returns a `Decision`: which of those samples exit
now (all their visual tokens leave), optionally which tokens the others keep, and optionally new hidden states for
the sub-batch (token merging and pooling write a merged token into the slot it keeps). A policy is one small object
with its own state, reset by `reset` at the start of every prefill; `a + b` composes two policies. A policy may
also `observe` every sub-batch a layer then really runs on (the exited samples' text-only one included), which is
how the attention analysis (`dyvte.evaluation.findings`) reads a layer without deciding anything.
"""

from dataclasses import dataclass, replace

import torch

from ..adapters import FamilyAdapter
from .subbatch import SubBatch


@dataclass
class Decision:
    """What a policy decides before a layer, for the sub-batch it was shown ([b] samples, [n] slots).

    `hidden` replaces the sub-batch's hidden states before `exit` and `keep` apply: a merging policy writes each
    merged token into the slot it keeps and drops the slots merged into it. Only visual slots may change; text
    slots are returned as they were.
    """

    exit: torch.Tensor | None = None  # [b] bool: drop all visual tokens before this layer
    keep: torch.Tensor | None = None  # [b, n] bool: slots to keep (visual ones may be dropped), for pruning
    hidden: torch.Tensor | None = None  # [b, n, d] new hidden states of the slots, for merging and pooling


@dataclass
class PrefillState:
    """What a policy may read about the current prefill call: the prompt, and the model through its family adapter,
    the only place that knows a model (its decoder layers and depth, attention recomputed for chosen queries, a
    layer's keys, rotary, text masks, the vision tower). The layer's inputs come with each call (`SubBatch`)."""

    adapter: FamilyAdapter  # the family adapter of the model being run
    input_ids: torch.Tensor  # [B, T] the prompt
    attention_mask: torch.Tensor  # [B, T]
    visual_mask: torch.Tensor  # [B, T] visual tokens that may leave

    @property
    def num_layers(self) -> int:
        """The decoder's depth `L`."""
        return self.adapter.num_layers


class ExitPolicy:
    """Base class of every policy: `before_layer` decides; `reset` clears what the policy remembered."""

    name = "policy"

    def reset(self, state: PrefillState) -> None:
        """Called once at the start of every prefill, before layer 0; a policy with state clears it here."""

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        raise NotImplementedError

    def observe(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> None:
        """Called, after the layer's decisions, with each sub-batch layer `layer_idx` is about to run on: the samples
        still holding visual tokens (as pruned, merged or pooled) and those that exited (text only). Read-only."""

    def __add__(self, other: "ExitPolicy") -> "ExitPolicy":
        return Compose([self, other])


class Compose(ExitPolicy):
    """Several policies at once: a sample exits if any says so; a token stays only if all keep it. Policies that
    rewrite hidden states act in order: each later policy is shown the states the earlier ones wrote."""

    def __init__(self, policies: list[ExitPolicy]):
        self.policies = [q for p in policies for q in (p.policies if isinstance(p, Compose) else [p])]
        self.name = "+".join(p.name for p in self.policies)

    def reset(self, state: PrefillState) -> None:
        for policy in self.policies:
            policy.reset(state)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        exits, keep, hidden = None, None, None
        for policy in self.policies:
            decision = policy.before_layer(layer_idx, sub, state)
            if decision.exit is not None:
                exits = decision.exit if exits is None else exits | decision.exit
            if decision.keep is not None:
                keep = decision.keep if keep is None else keep & decision.keep
            if decision.hidden is not None:
                hidden = decision.hidden
                sub = replace(sub, hidden=hidden)
        return Decision(exits, keep, hidden)

    def observe(self, layer_idx, sub, state) -> None:
        for policy in self.policies:
            policy.observe(layer_idx, sub, state)
