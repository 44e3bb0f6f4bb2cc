"""The withdrawal engine: a stock Hugging Face MLLM run layer by layer, each sample dropping its visual tokens
at its own exit layer.

`exit_layer = k` means decoder layers `0..k-1` see the visual tokens and layers `k..L-1` do not: from layer `k`
on, the sample's visual tokens are gone from the hidden states, the attention and the KV cache. Text tokens keep
their original positions (rotary is computed once for the whole prompt, then gathered), so `k = L` is exactly
the stock model and `k = 0` is the text-only prompt at its original positions.
"""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..adapters import get_adapter
from .cache import WithdrawalCache
from .policy import Decision, ExitPolicy, PrefillState
from .subbatch import SubBatch, attention_mask


@dataclass
class VisualExitGenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: the fields of transformers' `GenerateDecoderOnlyOutput` that
    the engine fills, and where each sample's visual tokens left.

    `sequences` [B, T]: prompt and generated tokens; `scores` / `logits`: one [B, V] per step when the generation
    config asks for them; `cache`: the withdrawal KV cache (`past_key_values` is the same, the name transformers
    used before 5.24); `exit_layer` [B] (`L`: never)."""

    sequences: torch.LongTensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    cache: WithdrawalCache | None = None
    exit_layer: torch.Tensor | None = None

    @property
    def past_key_values(self) -> WithdrawalCache | None:
        return self.cache


@dataclass
class VisualExitOutput(ModelOutput):
    """A prefill's result.

    `logits`: [B, T, V] aligned with the input from `engine(**inputs)` (values at withdrawn visual positions are
    undefined), [B, 1, V] at each sample's last prompt token from `engine.prefill(**inputs)`. `cache`: the
    withdrawal KV cache (`past_key_values` is the same, the name transformers used before 5.24); `exit_layer` [B]:
    where each sample's visual tokens left (`L`: never); `visual_mask` [B, T]: the visual tokens that could leave."""

    logits: torch.Tensor | None = None
    cache: WithdrawalCache | None = None
    exit_layer: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None

    @property
    def past_key_values(self) -> WithdrawalCache | None:
        return self.cache


class _KVCapture:
    """Stands in for the cache during one prefill layer call, keeping that call's keys and values."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states


def resolve_exit_layer(exit_layer, batch_size: int, num_layers: int, device: torch.device) -> torch.Tensor:
    """`None`, an int, or one value per sample, checked against `[0, num_layers]`; returns LongTensor [B]."""
    if exit_layer is None:
        exit_layer = num_layers
    exit_layer = torch.as_tensor(exit_layer, device=device)
    if exit_layer.is_floating_point():
        raise ValueError(f"exit_layer must hold integers, got dtype {exit_layer.dtype}.")
    if exit_layer.dim() == 0:
        exit_layer = exit_layer.expand(batch_size)
    if exit_layer.shape != (batch_size,):
        raise ValueError(
            f"exit_layer must be one int or one per sample (shape [{batch_size}]), got shape "
            f"{list(exit_layer.shape)}."
        )
    bad = ((exit_layer < 0) | (exit_layer > num_layers)).nonzero().squeeze(1).tolist()
    if bad:
        raise ValueError(
            f"exit_layer of sample {bad[0]} is {int(exit_layer[bad[0]])}, outside [0, {num_layers}] "
            f"(0 = text only, {num_layers} = the full model)."
        )
    return exit_layer.long()


class VisualExit:
    """Wraps a stock transformers MLLM; `engine(**inputs, exit_layer=...)` and `engine.generate(...)`.

    The model is not modified: the adapter reads its embeddings and vision features through the model's own
    methods and the engine calls its decoder layers directly.
    """

    def __init__(self, model, withdraw: str = "both"):
        """`withdraw`: which visual tokens exit, "both" (images and videos), "images" or "videos"."""
        self.model = model
        self.adapter = get_adapter(model, withdraw=withdraw)

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        exit_layer=None,
        policy: ExitPolicy | None = None,
        use_cache: bool = True,
        **vision_inputs,
    ) -> VisualExitOutput:
        """Like `model(**inputs)`: logits [B, T, V] for every input position, at the positions the stock forward
        uses when none are given; exits from a static `exit_layer` or from a `policy`."""
        if position_ids is None:
            position_ids = self.adapter.prefill_position_ids(input_ids, attention_mask, **vision_inputs)
        return self._prefill(input_ids, attention_mask, position_ids, exit_layer, policy, use_cache, False,
                             vision_inputs)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        exit_layer=None,
        policy: ExitPolicy | None = None,
        use_cache: bool = True,
        **vision_inputs,
    ) -> VisualExitOutput:
        """The prefill of `generate` on a processor batch (`engine.prefill(**inputs, policy=...)`): positions as
        `model.generate` forms them (padding skipped), logits [B, 1, V] at each sample's last prompt token, and the
        KV cache that decoding continues from."""
        if position_ids is None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            position_ids = self.adapter.generation_position_ids(input_ids, mask, **vision_inputs)
        return self._prefill(input_ids, attention_mask, position_ids, exit_layer, policy, use_cache, True, vision_inputs)

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        exit_layer,
        policy: ExitPolicy | None,
        use_cache: bool,
        last_only: bool,
        vision_inputs: dict,
    ) -> VisualExitOutput:
        """Run the decoder in at most two sub-batches per layer: samples still with visual tokens, and the rest.

        Exits come from `exit_layer` (static, per sample) or from `policy` (decided layer by layer); the output's
        `exit_layer` says where each sample exited (`L`: never). With `last_only`, logits are [B, 1, V] at each
        sample's last kept prompt token (what generation needs).
        """
        batch, length = input_ids.shape
        if policy is not None and exit_layer is not None:
            raise ValueError("give either exit_layer (a static exit) or policy, not both.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with_visual, visual_mask = self.embed_batch(input_ids, attention_mask, position_ids, **vision_inputs)
        state = PrefillState(self.adapter, input_ids, attention_mask, visual_mask)
        if policy is None:
            static_exit = resolve_exit_layer(exit_layer, batch, self.num_layers, input_ids.device)
        else:
            policy.reset(state)
        exited_at = torch.full((batch,), self.num_layers, dtype=torch.long, device=input_ids.device)
        text_only: SubBatch | None = None
        keys, values, key_valid = [], [], []
        for layer_idx, layer in enumerate(self.adapter.layers):
            if not len(with_visual):
                decision = Decision()
            elif policy is None:
                decision = Decision(exit=static_exit[with_visual.rows] == layer_idx)
            else:
                decision = policy.before_layer(layer_idx, with_visual, state)
            if decision.hidden is not None:
                if decision.hidden.shape != with_visual.hidden.shape:
                    raise ValueError(
                        f"policy {policy.name!r} returned hidden states of shape {list(decision.hidden.shape)} for a "
                        f"sub-batch of shape {list(with_visual.hidden.shape)}."
                    )
                with_visual.hidden = decision.hidden
            leaving = decision.exit if decision.exit is not None else torch.zeros_like(with_visual.rows, dtype=torch.bool)
            if leaving.any():
                moved = with_visual.compact(leaving, ~with_visual.slots_of(visual_mask))
                text_only = moved if text_only is None else SubBatch.concat([text_only, moved])
                exited_at[with_visual.rows[leaving]] = layer_idx
            if decision.keep is not None:
                with_visual = with_visual.compact(~leaving, decision.keep)
            elif leaving.any():
                with_visual = with_visual.select(~leaving)
            calls = []
            for sub in (with_visual, text_only):
                if sub is None or len(sub) == 0:
                    continue
                if policy is not None:
                    policy.observe(layer_idx, sub, state)
                capture = _KVCapture() if use_cache else None
                self.run_layer(layer, sub, capture)
                calls.append((sub, capture))
            if use_cache:
                layer_keys, layer_values, layer_valid = _gather_layer_cache(calls, batch)
                keys.append(layer_keys), values.append(layer_values), key_valid.append(layer_valid)

        subs = [sub for sub in (with_visual, text_only) if sub is not None and len(sub) > 0]
        logits = self._last_logits(subs, batch) if last_only else self._all_logits(subs, batch, length)
        cache = WithdrawalCache(keys, values, key_valid) if use_cache else None
        return VisualExitOutput(logits=logits, cache=cache, exit_layer=exited_at, visual_mask=visual_mask)

    def embed_batch(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        continuation_ids: torch.Tensor | None = None, continuation_mask: torch.Tensor | None = None,
        **vision_inputs,
    ) -> tuple[SubBatch, torch.Tensor]:
        """The batch as one sub-batch of its real tokens (padding packed away), and its visual-token mask [B, T].

        `continuation_ids` [B, C] (teacher forcing) are appended after the prompt as generated tokens would be:
        embedded as text whatever their ids, at the positions generation would give them.
        """
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embedded = self.adapter.embed(input_ids, **vision_inputs)
        if position_ids is None:
            position_ids = self.adapter.prefill_position_ids(input_ids, attention_mask, **vision_inputs)
        inputs_embeds, visual_mask, mask = embedded.inputs_embeds, embedded.visual_mask, attention_mask
        if continuation_ids is not None:
            steps = torch.arange(continuation_ids.shape[1], device=input_ids.device)
            next_positions = self.adapter.next_position_ids(position_ids, attention_mask)
            position_ids = torch.cat([position_ids, next_positions[..., None] + steps], dim=-1)
            inputs_embeds = torch.cat([inputs_embeds, self.adapter.embed_tokens(continuation_ids)], dim=1)
            visual_mask = torch.cat([visual_mask, torch.zeros_like(continuation_ids, dtype=torch.bool)], dim=1)
            mask = torch.cat([attention_mask, continuation_mask], dim=1)
        length = mask.shape[1]
        cos, sin = self.adapter.rotary(inputs_embeds, position_ids)
        index = torch.arange(length, device=input_ids.device).expand(batch, length).masked_fill(mask == 0, -1)
        rows = torch.arange(batch, device=input_ids.device)
        everyone = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        packed = SubBatch(rows, inputs_embeds, index, cos, sin).compact(everyone, index >= 0)
        return packed, visual_mask

    def run_layer(self, layer, sub: SubBatch, capture: _KVCapture | None = None) -> None:
        """One decoder layer over a sub-batch, in place; `capture` receives its keys and values."""
        sub.hidden = layer(
            sub.hidden,
            attention_mask=self._prefill_mask(sub),
            position_embeddings=(sub.cos, sub.sin),
            use_cache=capture is not None,
            **{self.adapter.layer_cache_kwarg: capture},
        )

    def _prefill_mask(self, sub: SubBatch) -> torch.Tensor | None:
        if self.adapter.attn_implementation == "sdpa" and bool(sub.valid.all()):
            return None  # plain causal: SDPA's fused kernel, no mask tensor
        return attention_mask(sub.valid, sub.hidden.dtype)

    def _all_logits(self, subs: list[SubBatch], batch: int, length: int) -> torch.Tensor:
        hidden = subs[0].hidden.new_zeros(batch, length, subs[0].hidden.shape[-1])
        for sub in subs:
            row, slot = sub.valid.nonzero(as_tuple=True)
            hidden[sub.rows[row], sub.index[row, slot]] = self.adapter.norm(sub.hidden[row, slot])
        return self.adapter.lm_head(hidden)

    def _last_logits(self, subs: list[SubBatch], batch: int) -> torch.Tensor:
        hidden = subs[0].hidden.new_zeros(batch, subs[0].hidden.shape[-1])
        for sub in subs:
            last = sub.index.argmax(dim=1)  # the last real token: padding has index -1
            hidden[sub.rows] = sub.hidden[torch.arange(len(sub), device=last.device), last]
        return self.adapter.lm_head(self.adapter.norm(hidden))[:, None]

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache: WithdrawalCache) -> torch.Tensor:
        """One new token per sample ([B]) at `position_ids` ([B], or [3, B] for M-RoPE); one call per layer."""
        hidden = self.adapter.embed_tokens(tokens[:, None])
        cos, sin = self.adapter.rotary(hidden, position_ids[..., None])
        masks = cache.add_step(hidden.dtype)
        for layer, mask in zip(self.adapter.layers, masks):
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True,
                           **{self.adapter.layer_cache_kwarg: cache})
        return self.adapter.lm_head(self.adapter.norm(hidden))[:, -1]

    def generate(self, exit_layer=None, policy: ExitPolicy | None = None, **kwargs):
        """Like `model.generate` (greedy or sampling, any logits processors and stopping criteria), with exit.

        Generation settings, processors and stopping criteria are prepared by the model's own `generate`; only
        the decoding loop is ours, passed through the public `custom_generate` hook.
        """
        return self.model.generate(
            custom_generate=_decode_with_exit, engine=self, exit_layer=exit_layer, policy=policy, **kwargs
        )


@torch.no_grad()
def greedy_answers(engine: "VisualExit", inputs: dict, max_new_tokens: int, eos_token_id: int | list[int],
                   policy: ExitPolicy | None = None) -> list[list[int]]:
    """The frozen model's own greedy answers (or with `policy`'s exits), each up to and including the first of
    the `eos_token_id`s (one id or the generation config's list: generation stops at any of them)."""
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    generated = engine.generate(**inputs, policy=policy, max_new_tokens=max_new_tokens, do_sample=False)
    answers = []
    for row in generated[:, inputs["input_ids"].shape[1] :].tolist():
        ends = [i for i, token in enumerate(row) if token in stop]
        answers.append(row[: ends[0] + 1] if ends else row)
    return answers


def generation_eos_ids(model, tokenizer=None) -> list[int]:
    """The ids generation stops at: the model's generation config's, else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model's generation config has no eos_token_id and the tokenizer no eos_token: "
                         "set model.generation_config.eos_token_id.")
    return [eos] if isinstance(eos, int) else list(eos)


def _gather_layer_cache(calls: list[tuple[SubBatch, _KVCapture]], batch: int):
    """One layer's keys and values for the whole batch, each sample's kept keys packed to the right."""
    length = max(sub.index.shape[1] for sub, _ in calls)
    first = calls[0][1].keys
    heads, head_dim = first.shape[1], first.shape[3]
    keys = first.new_zeros(batch, heads, length, head_dim)
    values = calls[0][1].values.new_zeros(batch, heads, length, calls[0][1].values.shape[3])
    valid = torch.zeros(batch, length, dtype=torch.bool, device=first.device)
    for sub, capture in calls:
        n = sub.index.shape[1]
        keys[sub.rows, :, length - n :] = capture.keys
        values[sub.rows, :, length - n :] = capture.values
        valid[sub.rows, length - n :] = sub.valid
    return keys, values, valid


_NOT_VISION_INPUTS = ("past_key_values", "cache", "use_cache", "logits_to_keep", "cache_position", "return_dict")


def _decode_with_exit(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    engine: VisualExit,
    exit_layer=None,
    policy: ExitPolicy | None = None,
    **model_kwargs,
):
    """The decoding loop of `model.generate`'s sampling mode, with the withdrawal engine as the model."""
    if generation_config.num_beams > 1:
        raise ValueError("VisualExit.generate supports greedy search and sampling, not beam search (num_beams > 1).")
    batch = input_ids.shape[0]
    if exit_layer is not None and torch.as_tensor(exit_layer).dim() == 1:
        exit_layer = torch.as_tensor(exit_layer, device=input_ids.device)
        if batch != exit_layer.shape[0] and batch % exit_layer.shape[0] == 0:  # num_return_sequences > 1
            exit_layer = exit_layer.repeat_interleave(batch // exit_layer.shape[0])
    attention_mask = model_kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = model_kwargs.pop("position_ids", None)
    for key in _NOT_VISION_INPUTS:
        model_kwargs.pop(key, None)

    if position_ids is None:
        position_ids = engine.adapter.generation_position_ids(input_ids, attention_mask, **model_kwargs)
    prefill = engine.prefill(input_ids, attention_mask, position_ids, exit_layer, policy, **model_kwargs)
    cache = prefill.cache
    next_positions = engine.adapter.next_position_ids(position_ids, attention_mask)

    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(batch, dtype=torch.long, device=input_ids.device)
    scores, raw_logits = [], []
    logits = prefill.logits[:, -1]
    while True:
        logits = logits.to(torch.float32)
        next_scores = logits_processor(input_ids, logits)
        if generation_config.output_scores:
            scores.append(next_scores)
        if generation_config.output_logits:
            raw_logits.append(logits)
        if generation_config.do_sample:
            next_tokens = torch.multinomial(next_scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = next_scores.argmax(dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
        if unfinished.max() == 0:
            break
        logits = engine.decode_step(next_tokens, next_positions, cache)
        next_positions = next_positions + 1

    if generation_config.return_dict_in_generate:
        return VisualExitGenerateOutput(
            sequences=input_ids,
            scores=tuple(scores) or None,
            logits=tuple(raw_logits) or None,
            cache=cache,
            exit_layer=prefill.exit_layer,
        )
    return input_ids
