"""Exit policies against their definitions: NoExit, StaticExit, forced heads, per-sample batching, FastV."""

import math

import pytest
import torch
from reference import masked_logits, stock_inputs_embeds
from tiny_models import EOS, IMAGE_TOKEN, PAD, Sample, build_batch, build_model

from dyvte import VisualExit
from dyvte.engine import greedy_answers
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import DynamicExit, FastV, KeepRateSchedule, NoExit, StaticExit
from dyvte.training.dense_labels import LabelConfig, candidate_exits, dense_labels

L = 4
NEW = 8


@pytest.fixture(scope="module")
def engine():
    return VisualExit(build_model("llava", num_layers=L, seed=1))


@pytest.fixture(scope="module")
def batch(engine):
    return build_batch(engine.model, [Sample(left_pad=2), Sample(text_after=9), Sample(text_before=5, left_pad=1)])


def forced_heads(exit_after: int) -> ExitHeads:
    """Heads that say "exit" (p = 1) after layer `exit_after` only."""
    heads = ExitHeads(ExitHeadsConfig(32, L, 8))
    for i, head in enumerate(heads.heads):
        head[2].weight.data.zero_()
        head[2].bias.data = torch.tensor([0.0, 20.0]) if i == exit_after else torch.tensor([20.0, 0.0])
    return heads


def splitting_heads(engine, batch) -> ExitHeads:
    """Heads whose p_exit > 0.5 exactly when one feature lies above its median over `batch` at that layer, so
    samples of one batch exit at different layers. The features come from the label pass (the same code)."""
    answers = greedy_answers(engine, batch, 2, EOS)
    candidates = candidate_exits(LabelConfig(), [str(i) for i in range(len(answers))], L)
    features = dense_labels(engine, batch, answers, candidates, "after_first_visual", PAD).features.float()
    heads = ExitHeads(ExitHeadsConfig(32, L, 2))
    for i, head in enumerate(heads.heads):
        column = int(features[:, i].std(dim=0).argmax())
        values = features[:, i, column].sort().values
        median = float(values[len(values) // 2 - 1 : len(values) // 2 + 1].mean())  # between two samples, not on one
        head[0].weight.data.zero_()
        head[0].weight.data[0, column], head[0].weight.data[1, column] = 1.0, -1.0
        head[0].bias.data = torch.tensor([-median, median])
        head[2].weight.data = torch.tensor([[0.0, 0.0], [1e3, -1e3]])  # GELU(z) - GELU(-z) = z
        head[2].bias.data.zero_()
    return heads


def test_threshold_above_one_is_no_exit(engine, batch):
    expected = engine.generate(**batch, policy=NoExit(), max_new_tokens=NEW)
    policy = DynamicExit(forced_heads(0), threshold=1.5, force=True)
    out = engine.generate(**batch, policy=policy, max_new_tokens=NEW, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.exit_layer.tolist() == [L] * 3
    assert torch.equal(expected, engine.model.generate(**batch, max_new_tokens=NEW))


@pytest.mark.parametrize("exit_after", [0, 1, 2])
def test_forced_heads_equal_static_exit(engine, batch, exit_after):
    expected = engine.generate(**batch, policy=StaticExit(exit_after + 1), max_new_tokens=NEW)
    out = engine.generate(**batch, policy=DynamicExit(forced_heads(exit_after), 0.5), max_new_tokens=NEW,
                          return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert out.exit_layer.tolist() == [exit_after + 1] * 3


def test_mixed_dynamic_decisions_equal_each_sample_alone(engine):
    samples = [Sample(text_before=1 + i, text_after=3 + 2 * i, left_pad=i % 2) for i in range(6)]
    batch = build_batch(engine.model, samples)
    p = DynamicExit(splitting_heads(engine, batch), 0.5)
    out = engine.generate(**batch, policy=p, max_new_tokens=NEW, return_dict_in_generate=True)
    assert len(set(out.exit_layer.tolist())) > 1, "the heads should split this batch"
    for i, sample in enumerate(samples):
        alone = build_batch(engine.model, [sample], indices=[i])
        single = engine.generate(**alone, policy=p, max_new_tokens=NEW, return_dict_in_generate=True)
        assert single.exit_layer.item() == out.exit_layer[i].item()
        real_new = out.sequences[i, batch["input_ids"].shape[1]:]
        assert torch.equal(single.sequences[0, alone["input_ids"].shape[1]:], real_new)


def test_threshold_checked():
    with pytest.raises(ValueError, match=r"threshold 1.5 is outside \[0, 1\]; pass force=True"):
        DynamicExit(forced_heads(0), threshold=1.5)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.25])
def test_fastv_keeps_the_eager_attention_top_k(keep_ratio):
    layer = 2
    model = build_model("llava", attn_implementation="eager", num_layers=L, seed=2)
    batch = build_batch(model, [Sample(left_pad=3), Sample(text_after=8), Sample(left_pad=1, text_before=4)])
    ids = batch["input_ids"]
    visual = ids == IMAGE_TOKEN
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    scores = attentions[layer - 1][:, :, -1, :].mean(dim=1)  # last prompt token, averaged over heads
    dropped = torch.zeros_like(visual)
    for row in range(ids.shape[0]):
        n_keep = math.ceil(keep_ratio * int(visual[row].sum()))
        ranked = scores[row].masked_fill(~visual[row], -1).argsort(descending=True)
        dropped[row, ranked[n_keep:]] = True
    dropped &= visual
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    expected = masked_logits(model, stock_inputs_embeds(model, **batch), batch["attention_mask"], positions, dropped,
                             torch.full((ids.shape[0],), layer))
    out = VisualExit(model)(**batch, policy=FastV(layer, keep_ratio))
    kept = batch["attention_mask"].bool() & ~dropped
    assert (out.logits - expected)[kept].abs().max() <= 1e-5
    n_real = batch["attention_mask"].sum(1)
    assert out.past_key_values.num_keys(layer).tolist() == (n_real - dropped.sum(1)).tolist()


def test_fastv_plus_dynamic(engine, batch):
    policy = FastV(2, 0.5) + DynamicExit(forced_heads(2), 0.5)
    assert policy.name == "fastv+dynamic"
    out = engine(**batch, policy=policy)
    assert out.exit_layer.tolist() == [3] * 3
    n_real = batch["attention_mask"].sum(1)
    n_visual = (batch["input_ids"] == IMAGE_TOKEN).sum(1)
    cache = out.past_key_values
    assert cache.num_keys(1).tolist() == n_real.tolist()
    assert cache.num_keys(2).tolist() == (n_real - n_visual // 2).tolist()
    assert cache.num_keys(3).tolist() == (n_real - n_visual).tolist()


def test_two_static_exits_compose_to_the_earlier_exit(engine, batch):
    """Each policy keeps its own state: composed, every sample leaves at the earlier of its two exits."""
    first, second = torch.tensor([1, 3, 2]), torch.tensor([2, 1, 3])
    out = engine(**batch, policy=StaticExit(first) + StaticExit(second))
    assert out.exit_layer.tolist() == [1, 1, 2]
    expected = engine(**batch, exit_layer=torch.minimum(first, second))
    assert torch.equal(out.logits[batch["attention_mask"].bool() & ~out.visual_mask],
                       expected.logits[batch["attention_mask"].bool() & ~expected.visual_mask])


def test_a_policy_reused_on_another_batch_starts_afresh(engine, batch):
    """A schedule keeps its ranking queries and scores for one prefill only: reused on a batch of another shape,
    it ranks by that batch's own text tokens, as a fresh instance does."""
    other = build_batch(engine.model, [Sample(text_after=7), Sample(left_pad=2)], seed=3)
    rates = [1.0, 0.5, 0.25, 0.25]
    policy = KeepRateSchedule(rates)
    engine(**batch, policy=policy)
    reused = engine(**other, policy=policy)
    fresh = engine(**other, policy=KeepRateSchedule(rates))
    assert [reused.past_key_values.num_keys(i).tolist() for i in range(L)] == \
        [fresh.past_key_values.num_keys(i).tolist() for i in range(L)]
    assert torch.equal(reused.logits, fresh.logits)
