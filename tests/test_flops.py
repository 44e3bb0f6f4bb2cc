"""The FLOPs convention against hand computations."""

import pytest
from transformers import LlamaConfig

from dyvte import flops

# d=8, m=16, 2 layers, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), vocab 10
CONFIG = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=10)


def test_layer_flops_by_hand():
    # 3 tokens, causal pairs 1+2+3 = 6
    projections = 2 * 3 * (8 * 8 + 2 * 8 * 4 + 8 * 8)  # 1152
    attention = 4 * 6 * 8  # 192
    mlp = 2 * 3 * 3 * 8 * 16  # 2304
    assert flops.layer_flops(CONFIG, 3, 6) == projections + attention + mlp == 3648


def test_prefill_by_hand():
    # 2 text + 1 visual, exit after layer 1: layer 0 sees 3 tokens (3648), layer 1 sees 2 (pairs 3)
    text_layer = 2 * 2 * (64 + 64 + 64) + 4 * 3 * 8 + 2 * 2 * 3 * 8 * 16  # 768 + 96 + 1536 = 2400
    lm_head = 2 * 8 * 10
    assert flops.prefill_flops(CONFIG, n_text=2, n_visual=1, exit_layer=1) == 3648 + text_layer + lm_head
    assert flops.prefill_flops(CONFIG, 2, 1) == 2 * 3648 + lm_head
    assert flops.prefill_flops(CONFIG, 2, 1, exit_layer=2) == flops.prefill_flops(CONFIG, 2, 1, None)


def test_decode_step_by_hand():
    # 2 text + 1 visual + 1 generated already; the new token attends 5 keys before exit, 4 after
    per_token = 2 * (64 + 64 + 64) + 2 * 3 * 8 * 16  # projections 384 + mlp 768
    expected = (per_token + 4 * 5 * 8) + (per_token + 4 * 4 * 8) + 2 * 8 * 10
    assert flops.decode_step_flops(CONFIG, 2, 1, exit_layer=1, n_generated=1) == expected


@pytest.mark.parametrize("k", [0, 8, 16, 24, 32])
def test_exit_ratio_closed_form_llava7b(k):
    """LLaVA-1.5-7B shape, 576 visual + 64 text: saving = (L-k)/L · (F(640) - F(64)) / (F(640) + head/L)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064)
    d, m, n_full, n_text = 4096, 11008, 640, 64

    def per_layer(n):
        return 2 * n * 4 * d * d + 4 * (n * (n + 1) // 2) * d + 6 * n * d * m

    head = 2 * d * 32064
    full = 32 * per_layer(n_full) + head
    expected = (32 - k) * (per_layer(n_full) - per_layer(n_text)) / full
    assert flops.prefill_saving(config, n_text, 576, k) == pytest.approx(expected, rel=1e-12)


def test_kv_bytes_shrink_with_exit():
    assert flops.kv_cache_bytes(CONFIG, 2, 1, exit_layer=1, bytes_per_value=4) == 2 * (3 + 2) * 4 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"exit_layer 3 is outside \[0, 2\]"):
        flops.prefill_flops(CONFIG, 2, 1, exit_layer=3)
    with pytest.raises(ValueError, match="non-negative"):
        flops.prefill_flops(CONFIG, -1, 1)
