"""Keep-rate schedules (G-Search's Sort & Reduce, P-Sigmoid) and their searches, against independent references:
the stock model's eager attention weights, a masked full-length run of the stock layers, the stock `generate`, a
no-cache greedy loop, the paper's formula and agreement counted by hand."""

import json
import math

import pytest
import torch
from reference import forward_positions, greedy_without_cache, stock_inputs_embeds
from tiny_models import EOS, IMAGE_TOKEN, Sample, build_batch, build_model

from dyvte import DynamicExit, KeepRateSchedule, PSigmoid, VisualExit
from dyvte.evaluation import PolicySettings, build_policy
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import Decision, ExitPolicy
from dyvte.policies.search import GSearch, PSigmoidSearch, g_search, p_sigmoid_search

NEW = 6
SAMPLES = [Sample(left_pad=2), Sample(text_after=9), Sample(text_before=5, left_pad=1, images=[(16, 16), (16, 16)])]


def text_queries(batch: dict) -> torch.Tensor:
    """The prompt's real text tokens after its first visual token."""
    visual = batch["input_ids"] == IMAGE_TOKEN
    return batch["attention_mask"].bool() & ~visual & (visual.long().cumsum(dim=1) > 0)


def last_query(batch: dict) -> torch.Tensor:
    mask = batch["attention_mask"]
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[torch.arange(mask.shape[0]), (mask * torch.arange(mask.shape[1])).argmax(dim=1)] = True
    return last


def received(weights: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[B, T] attention each key receives from `queries`, from eager weights [B, H, T, T]."""
    per_query = weights.mean(dim=1) * queries[:, :, None]
    return per_query.sum(dim=1) / queries.sum(dim=1, keepdim=True)


class Probe(ExitPolicy):
    """Before each layer, records which positions each sample still has and, at `layer`, the adapter's attention."""

    def __init__(self, layer: int = -1, queries: torch.Tensor | None = None):
        self.layer, self.queries, self.present, self.scores = layer, queries, {}, None

    def before_layer(self, layer_idx, sub, state) -> Decision:
        row, slot = sub.valid.nonzero(as_tuple=True)
        present = torch.zeros_like(state.visual_mask)
        present[sub.rows[row], sub.index[row, slot]] = True
        self.present[layer_idx] = present
        if layer_idx == self.layer:
            adapter = state.adapter
            layer = adapter.layers[layer_idx]
            if self.queries is None:
                scores = adapter.last_query_attention(layer, sub)
            else:
                scores = adapter.query_attention(layer, sub, sub.slots_of(self.queries))
            self.scores = torch.zeros(state.visual_mask.shape)
            self.scores[sub.rows[row], sub.index[row, slot]] = scores[row, slot]
        return Decision()


@torch.no_grad()
def eager_schedule(model, batch: dict, rates: list[float], queries: torch.Tensor):
    """Sort & Reduce on the stock layers with eager attention: the full-length sequence runs through every layer,
    a pruned visual token is hidden as a key from its layer on, and each pruning ranks the remaining visual tokens
    by the attention weights the stock attention module returned in the previous layer.

    Returns the positions each layer computes on ([L] of [B, T]), every layer's weights and the logits."""
    language_model = model.model.language_model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch_size, length = ids.shape
    visual = ids == IMAGE_TOKEN
    hidden = stock_inputs_embeds(model, **batch)
    cos, sin = language_model.rotary_emb(hidden, forward_positions(model, batch))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    present = mask.bool().clone()
    computed, weights = [], []
    for i, layer in enumerate(language_model.layers):
        if i and rates[i] < rates[i - 1]:
            scores = received(weights[-1], queries)
            for b in range(batch_size):
                n_keep = math.ceil(round(rates[i] * int(visual[b].sum()), 9))
                ranked = scores[b].masked_fill(~(visual[b] & present[b]), -1.0).argsort(descending=True)
                present[b, ranked[n_keep:]] &= ~visual[b, ranked[n_keep:]]
        computed.append(present.clone())
        allowed = (causal[None] & present[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
        additive = torch.zeros(batch_size, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        handle = layer.self_attn.register_forward_hook(lambda module, args, output: weights.append(output[1]))
        hidden = layer(hidden, attention_mask=additive, position_embeddings=(cos, sin))
        handle.remove()
    return computed, weights, model.lm_head(language_model.norm(hidden))


def answers_of(sequences: torch.Tensor, prompt_length: int) -> list[list[int]]:
    rows = sequences[:, prompt_length:].tolist()
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows]


def agreement_by_hand(engine, batch, policy, model) -> float:
    """Share of samples whose greedy answer with `policy` equals the stock model's."""
    length = batch["input_ids"].shape[1]
    full = answers_of(model.generate(**batch, max_new_tokens=NEW, do_sample=False), length)
    mine = answers_of(engine.generate(**batch, policy=policy, max_new_tokens=NEW, do_sample=False), length)
    return sum(a == b for a, b in zip(mine, full)) / len(full)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("queries", ["text", "last"])
def test_query_attention_matches_eager_attention_weights(family, queries):
    layer = 1
    model = build_model(family, num_layers=3, seed=3)
    eager = build_model(family, attn_implementation="eager", num_layers=3, seed=3)
    batch = build_batch(model, SAMPLES)
    chosen = text_queries(batch) if queries == "text" else last_query(batch)
    probe = Probe(layer, chosen if queries == "text" else None)
    VisualExit(model)(**batch, policy=probe)
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    expected = received(attentions[layer], chosen)
    real = batch["attention_mask"].bool()
    assert (probe.scores - expected)[real].abs().max() <= 1e-5
    assert (expected[real & (batch["input_ids"] == IMAGE_TOKEN)] > 0).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("queries", ["text", "last"])
def test_schedule_keeps_the_eager_attention_top_k(family, queries):
    rates = [1.0, 1.0, 0.6, 0.3, 0.3]  # 16 visual tokens keep 10 then 5; 32 keep 20 then 10
    model = build_model(family, num_layers=5, seed=4)
    eager = build_model(family, attn_implementation="eager", num_layers=5, seed=4)
    batch = build_batch(model, SAMPLES)
    chosen = text_queries(batch) if queries == "text" else last_query(batch)
    computed, weights, expected = eager_schedule(eager, batch, rates, chosen)
    with torch.no_grad():  # the reference's first, unpruned layers are the stock model's own attention
        stock = eager(**batch, output_attentions=True).attentions
    real = batch["attention_mask"].bool()
    for i in range(2):
        assert (weights[i] - stock[i]).abs().amax(dim=(1, 3))[real].max() <= 1e-6
    probe = Probe()
    out = VisualExit(model)(**batch, policy=KeepRateSchedule(rates, queries) + probe)
    n_visual = (batch["input_ids"] == IMAGE_TOKEN).sum(dim=1)
    assert (computed[2] & (batch["input_ids"] == IMAGE_TOKEN)).sum(1).tolist() == [10, 10, 20]
    assert (n_visual - (computed[3] & (batch["input_ids"] == IMAGE_TOKEN)).sum(1)).tolist() == [11, 11, 22]
    for i in (2, 3):  # the probe sees, before layer i + 1, the positions layer i computed on
        assert torch.equal(probe.present[i + 1], computed[i])
    cache = out.past_key_values
    assert [cache.num_keys(i).tolist() for i in range(5)] == [c.sum(1).tolist() for c in computed]
    assert (out.logits - expected)[computed[-1]].abs().max() <= 1e-4
    assert out.exit_layer.tolist() == [5] * 3


def test_all_rates_one_is_the_stock_model():
    model = build_model("llava", num_layers=4, seed=1)
    batch = build_batch(model, SAMPLES)
    out = VisualExit(model).generate(**batch, policy=KeepRateSchedule([1.0] * 4), max_new_tokens=NEW,
                                     return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(**batch, max_new_tokens=NEW, do_sample=False))
    assert out.exit_layer.tolist() == [4] * 3


@pytest.mark.parametrize("first_zero", [0, 2, 3])
def test_rates_dropping_to_zero_are_static_exit(first_zero):
    model = build_model("llava", num_layers=4, seed=1)
    batch = build_batch(model, SAMPLES)
    rates = [1.0] * first_zero + [0.0] * (4 - first_zero)
    out = VisualExit(model).generate(**batch, policy=KeepRateSchedule(rates), max_new_tokens=4,
                                     return_dict_in_generate=True)
    expected = greedy_without_cache(model, batch, torch.full((3,), first_zero), 4)
    assert torch.equal(out.sequences, expected)
    assert out.exit_layer.tolist() == [first_zero] * 3


def forced_heads(exit_after: int, num_layers: int) -> ExitHeads:
    """Heads that say "exit" (p = 1) after layer `exit_after` only."""
    heads = ExitHeads(ExitHeadsConfig(32, num_layers, 8))
    for i, head in enumerate(heads.heads):
        head[2].weight.data.zero_()
        head[2].bias.data = torch.tensor([0.0, 20.0]) if i == exit_after else torch.tensor([20.0, 0.0])
    return heads


def test_schedule_plus_dynamic_prunes_then_exits():
    model = build_model("llava", num_layers=5, seed=1)
    batch = build_batch(model, SAMPLES)
    policy = KeepRateSchedule([1.0, 1.0, 0.5, 0.25, 0.25]) + DynamicExit(forced_heads(2, 5), 0.5)
    assert policy.name == "schedule+dynamic"
    out = VisualExit(model)(**batch, policy=policy)
    assert out.exit_layer.tolist() == [3] * 3
    n_real = batch["attention_mask"].sum(1)
    n_visual = (batch["input_ids"] == IMAGE_TOKEN).sum(1)  # 16, 16, 32
    counts = [out.past_key_values.num_keys(i).tolist() for i in range(5)]
    assert counts[:2] == [n_real.tolist()] * 2
    assert counts[2] == (n_real - n_visual // 2).tolist()
    assert counts[3] == counts[4] == (n_real - n_visual).tolist()


def test_p_sigmoid_follows_the_paper_formula():
    for budget, k in ((0.5, 1.0), (0.3, 0.4), (0.8, 2.0)):
        alpha = (2 + 11) / 2  # the midpoint of layers 2..11 (the paper's 3..L, 1-based)
        expected = [1.0, 1.0] + [min(1.0, 2 * budget / (1 + math.exp(k * (i - alpha)))) for i in range(2, 12)]
        rates = PSigmoid(budget, k, num_layers=12).rates
        assert rates == pytest.approx(expected, abs=1e-12)
        assert all(a >= b for a, b in zip(rates, rates[1:])) and 0 <= min(rates)
    assert sum(PSigmoid(0.3, 0.4, num_layers=12).rates[2:]) / 10 == pytest.approx(0.3)  # the budget, for any k
    assert PSigmoid(0.4, 0.0, num_layers=6).rates == pytest.approx([1, 1, 0.4, 0.4, 0.4, 0.4])
    assert PSigmoid(0.5, 1.0, num_layers=8, alpha=3.0, first_layer=3).rates[3] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def calibration():
    model = build_model("llava", num_layers=4, seed=1)
    samples = [Sample(text_before=1 + i, text_after=3 + i, left_pad=i % 2) for i in range(6)]
    return model, VisualExit(model), build_batch(model, samples, seed=5)


def test_g_search_maximises_agreement_minus_lambda_rate(calibration):
    model, engine, batch = calibration
    lam = 0.01
    result = g_search(engine, [batch], lam=lam, every=3, trials=6, max_new_tokens=NEW)
    assert len(result.steps) == 1 and result.steps[0]["layer"] == 2  # layers 2, 5, ... of 4: one step
    trials = result.steps[0]["trials"]
    assert [t["rate"] for t in trials[:2]] == [1.0, 0.0]  # the previous rate and "withdraw all" come first
    by_hand = {t["rate"]: agreement_by_hand(engine, batch, KeepRateSchedule([1, 1, t["rate"], t["rate"]]), model)
               for t in trials}
    assert by_hand[1.0] == 1.0 and len(set(by_hand.values())) > 1, "pruning should change some answers"
    assert [t["score"] for t in trials] == [by_hand[t["rate"]] for t in trials]
    best = max(by_hand, key=lambda r: by_hand[r] - lam * r)
    assert result.rates == [1.0, 1.0, best, best]
    assert result.score == by_hand[best]


def test_g_search_rates_never_increase():
    model = build_model("llava", num_layers=6, seed=1)
    result = g_search(VisualExit(model), [build_batch(model, SAMPLES)], every=2, trials=3, max_new_tokens=4)
    rates = result.rates
    assert rates[:2] == [1.0, 1.0] and all(0.0 <= r <= 1.0 for r in rates)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert [s["layer"] for s in result.steps] == [2, 4][: len(result.steps)]
    assert rates[2] == rates[3] == result.steps[0]["rate"]
    if len(result.steps) == 2:
        assert all(t["rate"] <= rates[2] for t in result.steps[1]["trials"])


def test_p_sigmoid_search_picks_the_best_k(calibration):
    model, engine, batch = calibration
    result = p_sigmoid_search(engine, [batch], budget=0.4, trials=4, k_max=3.0, max_new_tokens=NEW)
    ks = [t["k"] for t in result.trials]
    assert ks[0] == 0.0 and all(0.0 <= k <= 3.0 for k in ks)
    assert result.alpha == 2.5
    expected = [1.0, 1.0] + [min(1.0, 0.8 / (1 + math.exp(result.k * (i - 2.5)))) for i in (2, 3)]
    assert result.rates == pytest.approx(expected, abs=1e-12)
    assert result.score == max(t["score"] for t in result.trials)
    assert result.score == agreement_by_hand(engine, batch, KeepRateSchedule(result.rates), model)


def test_search_results_reload_from_json(calibration, tmp_path):
    _, engine, batch = calibration
    searched = g_search(engine, [batch], trials=3, max_new_tokens=4)
    searched.save(tmp_path / "gsearch.json")
    assert json.loads((tmp_path / "gsearch.json").read_text())["rates"] == searched.rates
    loaded = GSearch.load(tmp_path / "gsearch.json")
    assert loaded == searched and loaded.policy().rates == searched.rates
    curve = p_sigmoid_search(engine, [batch], budget=0.5, trials=2, max_new_tokens=4)
    curve.save(tmp_path / "psigmoid.json")
    reloaded = PSigmoidSearch.load(tmp_path / "psigmoid.json")
    assert reloaded == curve and reloaded.policy().rates == curve.rates
    assert build_policy("gsearch", PolicySettings(gsearch=loaded.policy())).rates == searched.rates
    with pytest.raises(ValueError, match="psigmoid.json is not a saved gsearch schedule"):
        GSearch.load(tmp_path / "psigmoid.json")


@pytest.mark.parametrize("rates, message", [
    ([1.0, 1.2, 1.0], r"rates\[1\] = 1.2 is outside \[0, 1\]"),
    ([1.0, -0.1], r"rates\[1\] = -0.1 is outside \[0, 1\]"),
    ([1.0, 0.5, 0.7], r"rates must not increase with depth: rates\[2\] = 0.7 > rates\[1\] = 0.5"),
    ([0.5, 0.5], r"rates\[0\] = 0.5: layer 0 has no earlier layer to rank visual tokens by"),
    ([], "rates is empty"),
])
def test_bad_rates_are_named(rates, message):
    with pytest.raises(ValueError, match=message):
        KeepRateSchedule(rates)


def test_bad_settings_are_named(calibration):
    model, engine, batch = calibration
    with pytest.raises(ValueError, match="queries must be one of text, last; got 'all'"):
        KeepRateSchedule([1.0] * 4, queries="all")
    with pytest.raises(ValueError, match="the schedule has 3 keep rates but the model has 4 decoder layers"):
        engine(**batch, policy=KeepRateSchedule([1.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match=r"budget must be in \[0, 1\], got 1.5"):
        PSigmoid(1.5, 1.0, num_layers=4)
    with pytest.raises(ValueError, match="k must be >= 0"):
        PSigmoid(0.5, -1.0, num_layers=4)
    with pytest.raises(ValueError, match=r"first_layer must be in \[1, 3\] for 4 layers, got 4"):
        g_search(engine, [batch], first_layer=4)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        g_search(engine, [batch], lam=-0.1)
    with pytest.raises(ValueError, match="trials must be >= 2"):
        g_search(engine, [batch], trials=1)
    with pytest.raises(ValueError, match="policy 'psigmoid' needs keep rates"):
        build_policy("psigmoid", PolicySettings())
    text_only = build_batch(model, [Sample(images=[]), Sample(images=[], text_after=3)])
    with pytest.raises(ValueError, match="g_search needs calibration samples with visual tokens; none of these"):
        g_search(engine, [text_only])
    with pytest.raises(ValueError, match="p_sigmoid_search needs calibration samples with visual tokens"):
        p_sigmoid_search(engine, [text_only], budget=0.5)
