"""One FLOPs convention for every report in dyvte.

Convention: 2 FLOPs per multiply-add. Per decoder layer with `n` query tokens attending `pairs` (query, key)
pairs in total:
    attention projections  2·n·(d·d_q + 2·d·d_kv + d_q·d)
    scores and values      4·pairs·d_q              (causal prefill: pairs = n(n+1)/2, the real lower triangle)
    MLP (gated, SwiGLU)    2·n·3·d·m
plus `lm_head` (2·d·V) for each position whose logits are computed. Norms, rotary, softmax and residual adds are
left out (they are O(n·d) and below 1% at any real width). Vision-tower FLOPs are not LM FLOPs and are not
counted here.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that determine a decoder's FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    q_dim: int
    kv_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From an MLLM config or its text config."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            q_dim=text.num_attention_heads * head_dim,
            kv_dim=kv_heads * head_dim,
            vocab_size=text.vocab_size,
        )


def _shape(config) -> DecoderShape:
    return config if isinstance(config, DecoderShape) else DecoderShape.from_config(config)


def layer_flops(config, n_queries: int, n_pairs: int) -> int:
    """One decoder layer: `n_queries` tokens computed, attending `n_pairs` (query, key) pairs in total."""
    s = _shape(config)
    d = s.hidden_size
    projections = 2 * n_queries * (d * s.q_dim + 2 * d * s.kv_dim + s.q_dim * d)
    attention = 4 * n_pairs * s.q_dim
    mlp = 2 * n_queries * 3 * d * s.intermediate_size
    return projections + attention + mlp


def lm_head_flops(config, n_positions: int = 1) -> int:
    s = _shape(config)
    return 2 * n_positions * s.hidden_size * s.vocab_size


def _check(s: DecoderShape, n_text: int, n_visual: int, exit_layer: int | None) -> int:
    exit_layer = s.num_layers if exit_layer is None else exit_layer
    if not 0 <= exit_layer <= s.num_layers:
        raise ValueError(f"exit_layer {exit_layer} is outside [0, {s.num_layers}].")
    if n_text < 0 or n_visual < 0:
        raise ValueError(f"token counts must be non-negative, got n_text={n_text}, n_visual={n_visual}.")
    return exit_layer


def prefill_flops(config, n_text: int, n_visual: int, exit_layer: int | None = None, logits_positions: int = 1) -> int:
    """LM FLOPs of one sample's prefill: layers before `exit_layer` see all tokens, the rest only the text."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    tokens = [n_text + n_visual] * exit_layer + [n_text] * (s.num_layers - exit_layer)
    return prefill_flops_from_counts(s, tokens, logits_positions)


def prefill_flops_from_counts(config, tokens_per_layer: list[int], logits_positions: int = 1) -> int:
    """LM FLOPs of one sample's prefill given the tokens each layer really computed (any pruning policy)."""
    s = _shape(config)
    if len(tokens_per_layer) != s.num_layers:
        raise ValueError(f"need one token count per layer ({s.num_layers}), got {len(tokens_per_layer)}.")
    body = sum(layer_flops(s, n, n * (n + 1) // 2) for n in tokens_per_layer)
    return body + lm_head_flops(s, logits_positions)


def decode_step_flops(
    config, n_text: int, n_visual: int, exit_layer: int | None = None, n_generated: int = 0
) -> int:
    """LM FLOPs of the decode step that produces token `n_generated + 1`, with the KV cache of the prefill."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    keys_full = n_text + n_visual + n_generated + 1
    keys_text = n_text + n_generated + 1
    return (
        exit_layer * layer_flops(s, 1, keys_full)
        + (s.num_layers - exit_layer) * layer_flops(s, 1, keys_text)
        + lm_head_flops(s, 1)
    )


def prefill_saving(config, n_text: int, n_visual: int, exit_layer: int) -> float:
    """Fraction of the full model's prefill FLOPs saved by exiting at `exit_layer`."""
    full = prefill_flops(config, n_text, n_visual, None)
    return 1.0 - prefill_flops(config, n_text, n_visual, exit_layer) / full


def kv_cache_bytes(config, n_text: int, n_visual: int, exit_layer: int | None = None, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values one sample holds after its prefill."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    tokens = exit_layer * (n_text + n_visual) + (s.num_layers - exit_layer) * n_text
    return 2 * tokens * s.kv_dim * bytes_per_value
