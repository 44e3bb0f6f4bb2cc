"""A method's own selection cost (`SelectionMeter`), matching on a cost (`solve_setting`), SparseVLM's share rule,
and compositions whose parts contradict."""

import pytest
from tiny_models import IMAGE_TOKEN, Sample, build_batch, build_model

from dyvte import VisualExit
from dyvte.evaluation import PolicySettings, build_policy
from dyvte.evaluation.cost import SelectionMeter, solve_setting
from dyvte.policies import CDPruner, SparseVLM, StaticExit
from dyvte.policies.pruners import sparsevlm_ratios, sparsevlm_share

L = 4


def test_cdpruner_selection_flops_are_its_own_matrix_products_by_hand():
    """One sample of 16 visual tokens (width 32): the similarity (2 n^2 d), the relevance to the m instruction tokens
    (2 n m d) and the greedy MAP's update of step i (2 i n), nothing of the decoder's own work."""
    model = build_model("llava", num_layers=L, seed=2)
    batch = build_batch(model, [Sample(text_after=9)])
    ids = batch["input_ids"][0]
    first_visual = int((ids == IMAGE_TOKEN).nonzero()[0])
    n, m, d, kept = 16, int((ids[first_visual:] != IMAGE_TOKEN).sum()), 32, 6
    meter = SelectionMeter(CDPruner(keep_ratio=kept / n))
    meter.counting = True
    VisualExit(model).prefill(**batch, policy=meter)
    assert meter.flops == 2 * n * n * d + 2 * n * m * d + sum(2 * i * n for i in range(kept))
    assert meter.seconds > 0
    assert SelectionMeter(StaticExit(2)).flops == 0


def test_solve_setting_takes_the_largest_setting_within_the_target():
    costs = {}

    def cost(policy):
        costs[policy] = policy
        return policy

    assert solve_setting(lambda x: x, cost, 0.3, 0.0, 1.0, steps=20)[0] == pytest.approx(0.3, abs=1e-5)
    assert solve_setting(lambda x: 2.0 + x, cost, 0.3, 0.0, 1.0) is None  # even the cheapest costs more
    assert solve_setting(lambda x: x, cost, 5.0, 0.0, 1.0) == (1.0, 1.0)
    stepped = solve_setting(lambda x: float(int(x * 4)), cost, 2.0, 0.0, 1.0)  # a discrete setting (an exit layer)
    assert 0.5 <= stepped[0] < 0.75 and stepped[1] == 2.0
    assert solve_setting(lambda x: None if x > 0.5 else x, cost, 0.9, 0.0, 1.0)[0] <= 0.5  # None: not reachable


def test_sparsevlm_share_is_what_the_engine_computes():
    """The share rule the budget solver uses equals the visual tokens the KV cache holds, recycled ones included."""
    model = build_model("llava", num_layers=L, seed=2)
    batch = build_batch(model, [Sample(text_after=9)])
    ratios, layers = [0.6, 0.35, 0.1], [0, 1, 2]
    out = VisualExit(model).prefill(**batch, policy=SparseVLM(L, ratios, layers))
    n_text = int(batch["attention_mask"].sum()) - 16
    visual = [int(out.past_key_values.num_keys(layer)[0]) - n_text for layer in range(L)]
    assert sum(visual) / (L * 16) == pytest.approx(sparsevlm_share(ratios, layers, L, 16))
    assert visual == [16, 10 + 1, 6 + 1, 2 + 1]  # kept + merged: 6 pruned -> int(0.3 * 6) + 1 = 2 recycled -> 1
    solved = sparsevlm_ratios(0.5, ratios, layers, L, 16)
    assert sparsevlm_share(solved, layers, L, 16) == pytest.approx(0.5, abs=0.05)
    assert sparsevlm_ratios(0.2, ratios, layers, L, 16) is None  # layer 0 alone holds 1/4 of the tokens


@pytest.mark.parametrize("name, message", [
    ("cdpruner+vispruner", "'cdpruner' and 'vispruner' both choose the visual tokens that enter the LLM.*Use one of "
                           "them, e.g. cdpruner\\+dynamic"),
    ("vtw+dynamic", "'vtw' and 'dynamic' both decide the exit layer.*Use one exit policy"),
    ("tome+tome", "names 'tome' twice"),
])
def test_contradicting_compositions_name_the_parts_and_the_fix(name, message):
    with pytest.raises(ValueError, match=message):
        build_policy(name, PolicySettings(vtw_layer=2, model=build_model("llava", num_layers=L)))
