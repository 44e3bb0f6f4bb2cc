"""AutoPrune against its slow batch-1 reference (`autoprune_reference.py`, written from the official code and
importing nothing from dyvte): the per-sample schedule and mutual information, what each sample decided, batched
equals alone, composition with exit, the budgets it can reach, and what it refuses. The engine-level exactness
(same tokens in every layer's KV cache, last logits within 1e-4, greedy generation as the reference's loop without
cache, eager and SDPA, keep-all = the stock model) is `CASES["autoprune"]` of tests/test_baselines.py."""

import math
import random

import pytest
import torch
from autoprune_reference import account, autoprune_reference, autoprune_run, curve, keep_rates, simulated_counts
from autoprune_reference import mutual_information as reference_mutual_information
from test_baselines import assert_keeps_the_reference_tokens, reference_run, then_exit
from tiny_models import Sample, build_batch, build_model, sample_alone, siglip_llava

from dyvte import VisualExit
from dyvte.policies import AutoPrune, StaticExit
from dyvte.policies.pruners import (
    AutoPruneSettings,
    autoprune_accounted,
    autoprune_at_budget,
    autoprune_counts,
    autoprune_rates,
    mutual_information,
)

L = 4
SAMPLES = [Sample(left_pad=2), Sample(text_after=9), Sample(text_before=5, left_pad=1)]  # test_baselines'
DIFFERING = {"share": 11 / 16, "gamma": 20.0, "first_keep": 1.25}  # three samples, three schedules


@pytest.fixture(scope="module")
def reference_model():
    return build_model("llava", attn_implementation="eager", num_layers=L, seed=2)


@pytest.mark.parametrize("accounting", ["equivalent", "official"])
def test_the_schedule_is_the_reference_schedule(accounting):
    """Keep rates, scale and counts equal the reference's over random depths, image sizes, budgets and slopes, flat
    curves and the official early exit included. (The reference's schedule and MI were checked against the official
    functions themselves, executed from msl 1741-1754, 1868-1961 and 2010-2027: 300 random (budget, MI) draws at 32
    layers and 50 random MI matrices, all equal.)"""
    draws = random.Random(0)
    for _ in range(150):
        num_layers = draws.choice([2, 4, 12, 32])
        n_visual = draws.choice([16, 64, 576])
        target = draws.uniform(0.02, 0.6) * n_visual
        v0 = min(int(round(draws.choice([1.0, 2.5]) * target, 9)), n_visual)
        k = draws.choice([0.0, draws.uniform(0, 0.4), 0.4])
        rates, scale = autoprune_rates(k, n_visual, v0, target, num_layers, 14.9, accounting)
        expected_rates, expected_scale = keep_rates(k, n_visual, v0, target, num_layers, 14.9, accounting)
        assert scale == expected_scale and rates == expected_rates
        counts = autoprune_counts(rates, n_visual, v0)
        assert counts == simulated_counts(expected_rates, n_visual, v0)
        assert autoprune_accounted(counts, accounting) == account(counts, accounting)


def test_the_official_budget_counts_layers_1_to_L_and_equivalent_counts_what_layers_compute():
    """LLaVA-1.5-7B's official 64-token schedule on a flat curve (k = 0), by hand: 576 tokens in layer 0, v0 = 160 in
    layer 1, then each layer keeps 60 (ceil(159 s p)) and recycles the rest: 100 pruned -> 31 recycled -> 4 merged
    (64 in layer 2), then 4 -> 2 -> 1 (61 from layer 3 on). Officially counted (layers 1..31 and the 61 left after
    the last) 160 + 64 + 30 * 61 = 2054, the nearest integer step to 32 * 64 = 2048 (keeping 59: 2023); in equivalent
    tokens (576 + 160 + 64 + 29 * 61) / 32 = 80.28. Counted as dyvte does, the same budget keeps 43 per layer: (576 +
    160 + 47 + 29 * 44) / 32 = 64.34 (keeping 42: 63.41)."""
    rates, _ = autoprune_rates(0.0, 576, 160, 64, 32, 14.9, "official")
    counts = autoprune_counts(rates, 576, 160)
    assert counts == [576, 160, 64] + [61] * 30
    assert autoprune_accounted(counts, "official") == 2054 and sum(counts[:-1]) / 32 == 80.28125
    rates, _ = autoprune_rates(0.0, 576, 160, 64, 32, 14.9, "equivalent")
    counts = autoprune_counts(rates, 576, 160)
    assert counts == [576, 160, 47] + [44] * 30
    assert autoprune_accounted(counts, "equivalent") / 32 == 64.34375


def test_the_curve_is_the_official_curve_scaled_to_the_depth():
    """At 32 layers the raw layer index (msl 1875: shift x0 + k); at 12 layers layer l sits at l * 32 / 12."""
    k, x0 = 0.3, 14.9
    official = [0.75 / (1 + math.exp(k * (layer - (x0 + k)))) for layer in range(1, 32)]
    assert curve(k, 32, x0) == pytest.approx(official, rel=1e-12)
    assert [round(p, 12) for p in curve(k, 12, x0)] == [
        round(0.75 / (1 + math.exp(k * (layer * 32 / 12 - (x0 + k)))), 12) for layer in range(1, 12)]


def test_mutual_information_is_the_references_per_row_and_head():
    """Batched over rows (different query counts, filler queries, keys outside the visual set) and summed over
    heads, it equals the reference's (the official formula, in float64) on each row's visual block."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, width, slots = 3, 4, 7, 12
    queries = torch.tensor([7, 3, 0])
    logits = 8 * torch.randn(batch, heads, width, slots, generator=generator)  # peaked: ratios below 1e-6 too
    probabilities = logits.softmax(dim=-1)
    probabilities *= (torch.arange(width)[None, :] < queries[:, None])[:, None, :, None]
    keys = torch.rand(batch, slots, generator=generator) > 0.4
    got = mutual_information(probabilities, keys, queries)
    for row in range(batch):
        expected = sum(reference_mutual_information(probabilities[row, h, : queries[row]][:, keys[row]])
                       for h in range(heads)) if queries[row] else 0.0
        assert float(got[row]) == pytest.approx(expected, abs=1e-5)
    assert float(got[2]) == 0.0


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_each_sample_decides_as_the_reference_and_the_schedules_differ(attn_implementation, reference_model):
    """MI0, MI1, k, the scale, v0, the keep rates and the visual tokens each layer computes, per sample of a padded
    batch, equal the reference's for that sample alone; the three samples get three different slopes."""
    model = build_model("llava", attn_implementation=attn_implementation, num_layers=L, seed=2)
    policy = AutoPrune(model, **DIFFERING)
    out = VisualExit(model).prefill(**build_batch(model, SAMPLES), policy=policy)
    decided = policy.decisions
    assert len({round(k, 6) for k in decided.k}) == 3 and 0.0 in decided.k
    for i in range(len(SAMPLES)):
        trace = autoprune_run(reference_model, sample_alone(reference_model, SAMPLES, i), 11.0, gamma=20.0,
                              first_keep=1.25, accounting="equivalent").trace
        assert decided.v0[i] == trace.v0
        assert decided.mi0[i] == pytest.approx(trace.mi0, abs=1e-6)
        assert decided.mi1[i] == pytest.approx(trace.mi1, abs=1e-5)
        assert decided.k[i] == pytest.approx(trace.k, abs=1e-5) and decided.scale[i] == trace.scale
        assert decided.rates[i] == pytest.approx(trace.rates, abs=1e-5)  # k from float32 MI
        text = int((build_batch(model, SAMPLES)["attention_mask"][i]).sum()) - 16
        computed = [int(out.past_key_values.num_keys(layer)[i]) - text for layer in range(L)]
        assert computed == [len(v) for v in trace.visual] == trace.expected[:L]


def sharpened(attn_implementation: str):
    """The tiny LLaVA with layer 0's queries and keys scaled by 16 and the other layers' by 8 (logits by 256 and 64):
    peaked attention, so the mutual information is large (MI0 0.45-0.57, MI1 0.66-0.78 bits), the text term of
    layer 0's score weighs as much as the [CLS] attention, and the official constants (gamma 0.2, k0 0.4) give each
    sample its own slope (k 0.25-0.27)."""
    model = build_model("llava", attn_implementation=attn_implementation, num_layers=L, seed=2)
    with torch.no_grad():
        for index, layer in enumerate(model.model.language_model.layers):
            layer.self_attn.q_proj.weight.mul_(16.0 if index == 0 else 8.0)
            layer.self_attn.k_proj.weight.mul_(16.0 if index == 0 else 8.0)
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_with_large_mutual_information_it_keeps_the_reference_tokens(attn_implementation):
    """On the sharpened model, at the official constants: each sample's MI, slope and the tokens every layer keeps
    (its KV cache) are the reference's, and the last logits within 1e-4."""
    reference_model, model = sharpened("eager"), sharpened(attn_implementation)
    policy = AutoPrune(model, share=11 / 16, first_keep=1.25)
    out = VisualExit(model).prefill(**build_batch(model, SAMPLES), policy=policy)

    def make_reference(model, alone):
        return autoprune_reference(model, alone, 11.0, first_keep=1.25, accounting="equivalent")

    assert_keeps_the_reference_tokens(out, reference_model, make_reference)
    for i in range(len(SAMPLES)):
        trace = autoprune_run(reference_model, sample_alone(reference_model, SAMPLES, i), 11.0, first_keep=1.25,
                              accounting="equivalent").trace
        assert policy.decisions.mi0[i] == pytest.approx(trace.mi0, rel=1e-4) and trace.mi0 > 0.4
        assert policy.decisions.k[i] == pytest.approx(trace.k, abs=1e-5) and 0 < trace.k < 0.3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_batched_equals_alone_with_two_images_and_a_text_only_sample(attn_implementation, reference_model):
    """A sample's decisions depend on itself only: in a batch with a two-image sample (its visual tokens one pool,
    each scored by its own image's [CLS] attention) and a text-only one, every sample's logits and kept tokens are
    those it gets alone; the two-image sample also equals the reference."""
    model = build_model("llava", attn_implementation=attn_implementation, num_layers=L, seed=2)
    samples = [Sample(images=[(16, 16), (16, 16)], left_pad=1), Sample(images=[]), *SAMPLES]
    engine = VisualExit(model)
    policy = AutoPrune(model, **DIFFERING)
    batch = build_batch(model, samples)
    out = engine.prefill(**batch, policy=policy)
    for i in range(len(samples)):
        alone = sample_alone(model, samples, i)
        single = engine.prefill(**alone, policy=policy)
        assert (out.logits[i, -1] - single.logits[0, -1]).abs().max() <= 1e-5
        counts = [int(out.past_key_values.num_keys(layer)[i]) for layer in range(L)]
        assert counts == [int(single.past_key_values.num_keys(layer)[0]) for layer in range(L)]
    run = autoprune_run(reference_model, sample_alone(reference_model, samples, 0), 22.0, gamma=20.0,
                        first_keep=1.25, accounting="equivalent")
    assert (out.logits[0, -1] - run.logits).abs().max() <= 1e-4
    text = int(batch["attention_mask"][0].sum()) - 32
    assert [int(out.past_key_values.num_keys(layer)[0]) - text for layer in range(L)] == run.trace.expected[:L]


def test_autoprune_composes_with_exit(reference_model):
    """AutoPrune's cuts, then every visual token withdrawn by a static exit before layer 3: as the reference."""
    model = build_model("llava", num_layers=L, seed=2)
    out = VisualExit(model).prefill(**build_batch(model, SAMPLES), policy=AutoPrune(model, **DIFFERING) + StaticExit(3))
    assert out.exit_layer.tolist() == [3] * 3
    for i in range(len(SAMPLES)):
        alone = sample_alone(reference_model, SAMPLES, i)
        edit = then_exit(autoprune_reference(reference_model, alone, 11.0, gamma=20.0, first_keep=1.25,
                                             accounting="equivalent"), alone, 3)
        logits, _ = reference_run(reference_model, edit, alone)
        assert (out.logits[i, -1] - logits[0, -1]).abs().max() <= 1e-4


def reachable(num_layers: int, n_visual: int, budget: int, k0: float = 0.4) -> bool:
    """The reference's reach of an equivalent-tokens budget (of 576): keeping nothing after layer 1 costs at most the
    budget, the steepest curve at scale 20 at least."""
    target = budget / 576 * n_visual
    v0 = min(int(round(2.5 * target, 9)), n_visual)
    low = sum(simulated_counts([0.0] * (num_layers - 1), n_visual, v0)[:-1])
    high = sum(simulated_counts([20 * p for p in curve(k0, num_layers, 14.9)], n_visual, v0)[:-1])
    return low <= num_layers * target + 1e-9 and high >= num_layers * target - 1e-9


@pytest.mark.parametrize("num_layers, n_visual, lowest, highest", [(12, 64, 70, 511), (32, 576, 21, 467)])
def test_budgets_out_of_reach_are_refused_with_the_reason(num_layers, n_visual, lowest, highest):
    """The testbed's shape (12 layers, 64 tokens) reaches 70..511 equivalent tokens of 576, LLaVA-1.5-7B's 21..467
    (layer 0 computes every token and layer 1 keeps 2.5x the budget; the steepest curve prunes the last layers);
    the budget formula takes exactly the budgets the reference reaches, and names the reason for the others."""
    settings = AutoPruneSettings()
    taken = [b for b in range(1, 577)
             if autoprune_at_budget(settings, b / 576, num_layers, n_visual)[0] is not None]
    assert taken == [b for b in range(1, 577) if reachable(num_layers, n_visual, b)]
    assert (taken[0], taken[-1]) == (lowest, highest)
    solved, words = autoprune_at_budget(settings, 128 / 576, num_layers, n_visual)
    assert solved.share == 128 / 576 and words == "share 0.222 (equivalent accounting)"
    _, low = autoprune_at_budget(settings, (lowest - 1) / 576, num_layers, n_visual)
    assert low.startswith(f"out of reach: layer 0 computes all {n_visual} visual tokens and layer 1 keeps "
                          "first_keep = 2.5 x the target")
    _, high = autoprune_at_budget(settings, (highest + 1) / 576, num_layers, n_visual)
    assert high.startswith("out of reach: its steepest curve (k = k0 = 0.4, a sample without mutual information)")
    flat = AutoPruneSettings(k0=0.0)
    assert autoprune_at_budget(flat, 1.0, num_layers, n_visual)[0] is not None  # a flat curve keeps every token


def test_a_sample_out_of_reach_is_refused_at_the_prefill():
    model = build_model("llava", num_layers=L, seed=2)
    batch = build_batch(model, SAMPLES)
    with pytest.raises(ValueError, match=r"AutoPrune: sample 0 has 16 visual tokens, and share = 0.25 is out of reach "
                                         r"for it: layer 0 computes all 16 visual tokens and layer 1 keeps"):
        VisualExit(model).prefill(**batch, policy=AutoPrune(model, share=0.25))


def test_towers_without_cls_and_other_families_are_refused_naming_autoprune():
    with pytest.raises(ValueError, match=r"AutoPrune scores the visual tokens after layer 0 by the vision tower's "
                                         r"\[CLS\] attention; this model's tower \(SiglipVisionModel\) has no CLS"):
        AutoPrune(siglip_llava())
    for family in ("qwen2_vl", "llava_next", "internvl"):
        with pytest.raises(ValueError, match=f"AutoPrune needs each image's visual tokens to be the vision tower's "
                                             f"patches.*'{family}'"):
            AutoPrune(build_model(family, num_layers=2))


@pytest.mark.parametrize("settings, message", [
    ({"share": 0.0}, r"AutoPrune: share = 0.0 is outside \(0, 1\]"),
    ({"share": 1.5}, r"AutoPrune: share = 1.5 is outside \(0, 1\]"),
    ({"gamma": -1.0}, r"AutoPrune: gamma must be in \[0, 1e\+06\], got -1.0"),
    ({"k0": float("nan")}, r"AutoPrune: k0 must be in \[0, 1e\+06\], got nan"),
    ({"first_keep": 0.0}, r"AutoPrune: first_keep must be in \(0, 1e\+06\], got 0.0"),
    ({"x0": float("inf")}, r"AutoPrune: x0 must be in \[-1e\+06, 1e\+06\], got inf"),
    ({"accounting": "paper"}, r"AutoPrune: accounting must be one of equivalent, official; got 'paper'"),
])
def test_bad_settings_name_autoprune(settings, message):
    with pytest.raises(ValueError, match=message):
        AutoPruneSettings(**settings)
