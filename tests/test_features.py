"""Exit-head features: the label pass and the inference path (`DynamicExit`) compute the same features for the
same prompt, and both equal an independent computation from the stock model's hidden states and eager attention."""

import pytest
import torch
from tiny_models import EOS, IMAGE_TOKEN, PAD, Sample, build_batch, build_model

from dyvte import VisualExit
from dyvte.engine import greedy_answers
from dyvte.heads import INPUT_PARTS, ExitHeads, ExitHeadsConfig
from dyvte.policies import DynamicExit
from dyvte.training.dense_labels import LabelConfig, candidate_exits, dense_labels

L = 4
GROUPS = ("text", "visual", "attention", "lens")


@pytest.fixture(scope="module")
def setup():
    model = build_model("llava", attn_implementation="eager", num_layers=L, seed=4)
    batch = build_batch(model, [Sample(text_before=2, text_after=5), Sample(text_before=4, text_after=3)])
    engine = VisualExit(model)
    answers = greedy_answers(engine, batch, 3, EOS)
    candidates = candidate_exits(LabelConfig(), ["0", "1"], L)
    dense = dense_labels(engine, batch, answers, candidates, "after_first_visual", PAD, GROUPS)
    return model, batch, engine, {"text": dense.features, **dense.group_features}


def all_input_heads(model) -> ExitHeads:
    config = ExitHeadsConfig(32, L, 4, inputs=tuple(INPUT_PARTS), num_attention_heads=model.config.text_config.num_attention_heads)
    return ExitHeads(config)


def test_label_pass_and_inference_compute_the_same_features(setup):
    model, batch, engine, stored = setup
    heads = all_input_heads(model)
    seen = {}

    def record(layer_idx, inputs):
        seen[layer_idx] = inputs.clone()
        return torch.zeros(len(inputs))

    heads.exit_probability = record
    engine(**batch, policy=DynamicExit(heads, threshold=2.0, force=True))
    assert sorted(seen) == list(range(L - 1))  # head L-1 never decides: its exit is the full model
    expected = heads.assemble({g: v.float() for g, v in stored.items()})
    for layer_idx, inputs in seen.items():
        assert torch.allclose(inputs.half().float(), expected[:, layer_idx], atol=2e-3, rtol=2e-3), layer_idx


def test_features_equal_a_stock_model_computation(setup):
    """From the stock forward: hidden states after each layer, eager attention weights and the logit lens."""
    model, batch, engine, stored = setup
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    visual = ids == IMAGE_TOKEN
    after_image = visual.long().cumsum(dim=1) > 0
    text = batch["attention_mask"].bool() & ~visual & after_image
    text[:, -1] = False  # the last prompt token is the second half of the text features
    previous_top1 = None
    for layer in range(L - 1):  # hidden_states[layer + 1] is layer `layer`'s output (the last is after the norm)
        hidden = out.hidden_states[layer + 1]
        mean_text = (hidden * text[..., None]).sum(1) / text.sum(1, keepdim=True)
        mean_visual = (hidden * visual[..., None]).sum(1) / visual.sum(1, keepdim=True)
        last_visual = torch.stack([hidden[b, visual[b].nonzero().max()] for b in range(len(ids))])
        attention = (out.attentions[layer][:, :, -1] * visual[:, None]).sum(-1)
        log_p = model.lm_head(model.model.language_model.norm(hidden[:, -1])).log_softmax(-1)
        top = log_p.topk(2, dim=-1)
        p1, p2 = top.values.exp().unbind(-1)
        same = torch.zeros(len(ids)) if previous_top1 is None else (top.indices[:, 0] == previous_top1).float()
        previous_top1 = top.indices[:, 0]
        lens = torch.stack([p1, -(log_p.exp() * log_p).sum(-1), p1 - p2, same], dim=-1)
        expected = {"text": torch.cat([mean_text, hidden[:, -1]], -1), "visual": torch.cat([mean_visual, last_visual], -1),
                    "attention": attention, "lens": lens}
        for group, values in expected.items():
            assert torch.allclose(stored[group][:, layer].float(), values, atol=2e-3, rtol=2e-3), (group, layer)


def test_attention_status_reuses_the_layers_own_keys(setup):
    """The attention-status feature reads the keys the layer's own `k_proj` computes (a forward hook): with heads
    that read it, `k_proj` runs exactly as often as in a prefill without heads."""
    model, batch, engine, _ = setup
    calls = []
    handles = [layer.self_attn.k_proj.register_forward_hook(lambda *args: calls.append(1))
               for layer in engine.adapter.layers]
    try:
        engine(**batch)
        without_heads = len(calls)
        calls.clear()
        engine(**batch, policy=DynamicExit(all_input_heads(model), threshold=2.0, force=True))
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == without_heads == L
