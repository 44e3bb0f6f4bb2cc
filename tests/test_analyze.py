"""analyze.py and `dyvte.evaluation.findings` against independent references: the attention masses and entropies
from the stock model's own eager attention weights (full, and with visual keys masked after an exit), stock
`generate` for the withdrawal sweep, hand-made curves for the stage rule; end to end on a tiny testbed-shaped
checkpoint; bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed
from hydra import compose, initialize_config_dir
from reference import stock_inputs_embeds, stock_positions
from tiny_models import FAMILIES, Sample, build_batch, build_model, text_kwargs, visual_mask
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen3Config

from dyvte import StaticExit, VisualExit, cli
from dyvte.configs import ConfigError, check_analyze_config
from dyvte.data import PromptCollator, read_llava_json
from dyvte.evaluation.findings import (
    AnalysisSettings,
    analyze,
    layer_stats,
    record_attention,
    stage_boundaries,
    withdrawal_sweep,
)
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import Decision, ExitPolicy
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR

ROOT = Path(__file__).resolve().parent.parent
cli.register_resolvers()
SAMPLES = [Sample(left_pad=2), Sample(text_after=9), Sample(text_before=5, left_pad=1, images=[(16, 16), (16, 16)])]
TOLERANCE = 1e-5


def text_queries(batch: dict) -> torch.Tensor:
    """[B, T] the prompt's real text tokens after its first visual token."""
    visual = visual_mask(batch)
    return batch["attention_mask"].bool() & ~visual & (visual.long().cumsum(dim=1) > 0)


def reference_values(weights: torch.Tensor, batch: dict, exit_layer: list[int] | None = None) -> dict:
    """The recorder's quantities by hand from eager weights, one [H, T, T] per sample and layer ([L] of
    [B, H, T, T]); from layer `exit_layer[b]` on, sample b has no visual keys or queries (their weights are 0)."""
    real = batch["attention_mask"].bool()
    visual = visual_mask(batch) & real
    text = real & ~visual
    queries = text_queries(batch)
    batch_size, num_layers = real.shape[0], len(weights)
    nan = float("nan")
    out = {name: torch.full((batch_size, num_layers), nan)
           for name in ("visual_self", "visual_text", "cross", "text_self", "entropy_cross", "entropy_text_self")}
    for b in range(batch_size):
        for layer in range(num_layers):
            gone = exit_layer is not None and layer >= exit_layer[b]
            w = weights[layer][b].double()  # [H, T, T]
            if not gone:
                on_visual = w[:, visual[b]][:, :, visual[b]].sum(dim=-1)  # [H, visual queries]
                out["visual_self"][b, layer] = on_visual.mean()
                out["visual_text"][b, layer] = w[:, visual[b]][:, :, text[b]].sum(dim=-1).mean()
            rows = w[:, queries[b]]  # [H, text queries, T]
            out["cross"][b, layer] = rows[:, :, visual[b]].sum(dim=-1).mean()
            out["text_self"][b, layer] = rows[:, :, text[b]].sum(dim=-1).mean()
            for name, keys in (("entropy_cross", visual[b]), ("entropy_text_self", text[b])):
                if name == "entropy_cross" and gone:
                    continue
                p = rows[:, :, keys]
                p = p / p.sum(dim=-1, keepdim=True)
                out[name][b, layer] = -(p * p.log()).nan_to_num().sum(dim=-1).mean()
    return out


def assert_close(actual: dict, expected: dict):
    for name, values in expected.items():
        assert torch.equal(actual[name].isnan(), values.isnan()), name
        defined = ~values.isnan()
        assert (actual[name][defined].double() - values[defined]).abs().max() <= TOLERANCE, name


@pytest.mark.parametrize("family", FAMILIES)
def test_masses_and_entropies_equal_the_eager_attention_weights(family):
    """The per-query path inside the engine's SDPA prefill against the stock model's full eager attention."""
    model = build_model(family, num_layers=3, seed=5)
    eager = build_model(family, attn_implementation="eager", num_layers=3, seed=5)
    batch = build_batch(model, SAMPLES)
    recorded = record_attention(VisualExit(model), [batch], query_chunk=7)  # chunks of 7 queries: several per row
    with torch.no_grad():
        weights = eager(**batch, position_ids=stock_positions(eager, batch), output_attentions=True).attentions
    expected = reference_values(weights, batch)
    assert_close(recorded.values, expected)
    assert not any(values.isnan().any() for values in expected.values())  # every quantity was compared
    assert recorded.exit_layer.tolist() == [3, 3, 3]


@torch.no_grad()
def masked_eager_weights(model, batch: dict, exit_layer: list[int]) -> list[torch.Tensor]:
    """The stock eager layers over the full sequence, sample b's visual keys hidden from layer `exit_layer[b]` on;
    each layer's attention weights, as its attention module returns them."""
    language_model = model.model.language_model
    real = batch["attention_mask"].bool()
    visual = visual_mask(batch)
    batch_size, length = real.shape
    hidden = stock_inputs_embeds(model, **batch)
    cos, sin = language_model.rotary_emb(hidden, stock_positions(model, batch))  # generation's positions
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = []
    for layer_idx, layer in enumerate(language_model.layers):
        keys = real & ~(visual & (torch.tensor(exit_layer) <= layer_idx)[:, None])
        allowed = (causal[None] & keys[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
        mask = torch.zeros(batch_size, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        handle = layer.self_attn.register_forward_hook(lambda module, args, output: weights.append(output[1]))
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        handle.remove()
    return weights


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_entropy_under_exit_equals_masked_eager_attention(family):
    """With exit, the text-only rows the engine runs are observed too: text self entropy over the text keys equals
    the eager weights with the visual keys masked; cross-attention is 0 and its entropy undefined after exit."""
    exits = [1, 3, 2]
    model = build_model(family, num_layers=3, seed=6)
    eager = build_model(family, attn_implementation="eager", num_layers=3, seed=6)
    batch = build_batch(model, SAMPLES)
    recorded = record_attention(VisualExit(model), [batch], StaticExit(torch.tensor(exits)))
    expected = reference_values(masked_eager_weights(eager, batch, exits), batch, exits)
    assert_close(recorded.values, expected)
    assert recorded.exit_layer.tolist() == exits
    assert recorded.values["cross"][0, 1:].tolist() == [0.0, 0.0]


class QueryProbe(ExitPolicy):
    """Collects, for every sub-batch a layer runs on, each query's mass on visual keys and on text keys."""

    def __init__(self):
        self.masses = []

    def before_layer(self, layer_idx, sub, state) -> Decision:
        return Decision()

    def observe(self, layer_idx, sub, state) -> None:
        visual = sub.slots_of(state.visual_mask)
        probabilities, _, used = state.adapter.query_probabilities(state.adapter.layers[layer_idx], sub, sub.valid)
        on_visual = (probabilities * visual[:, None, None, :]).sum(dim=-1)
        on_text = (probabilities * (sub.valid & ~visual)[:, None, None, :]).sum(dim=-1)
        self.masses.append((on_visual, on_text, used))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_each_querys_masses_sum_to_one(family):
    model = build_model(family, num_layers=3, seed=7)
    batch = build_batch(model, SAMPLES)
    probe = QueryProbe()
    VisualExit(model).prefill(**batch, policy=StaticExit(torch.tensor([1, 3, 2])) + probe)
    assert len(probe.masses) == 3 + 2  # layer 0: one sub-batch; layers 1 and 2: still visual and text only
    for on_visual, on_text, used in probe.masses:
        total = (on_visual + on_text)[used[:, None, :].expand_as(on_visual)]
        assert (total - 1).abs().max() <= 1e-6
    recorded = record_attention(VisualExit(model), [batch])
    values = recorded.values
    assert ((values["visual_self"] + values["visual_text"]) - 1).abs().max() <= 1e-6
    assert ((values["cross"] + values["text_self"]) - 1).abs().max() <= 1e-6


def test_stage_rule_on_hand_made_curves():
    steps = stage_boundaries([0.9, 0.9, 0.2, 0.2, 0.2, 0.6, 0.6, 0.6])
    assert steps["boundaries"] == [2, 5] and steps["squared_error"] == pytest.approx(0.0, abs=1e-12)
    assert steps["stages"] == {"early_fusion": [0, 1], "intra_modality": [2, 4], "multimodal_reasoning": [5, 7]}
    assert steps["levels"] == pytest.approx([0.9, 0.2, 0.6])
    noisy = stage_boundaries([0.9, 0.86, 0.2, 0.24, 0.2, 0.6, 0.64, 0.58])
    assert noisy["boundaries"] == [2, 5]
    decreasing = stage_boundaries([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert decreasing["boundaries"] is None and "does not dip and resume" in decreasing["reason"]
    shallow = [0.5, 0.5, 0.49, 0.5, 0.9]  # a dip of 0.01 in a range of 0.41
    assert stage_boundaries(shallow)["boundaries"] is None
    # with no margin the dip counts. Splits with a middle level below both outer ones and their squared errors:
    # (1,3) 0.08005, (1,4) 6.67e-5, (2,3) 0.08, (2,4) [0.5, 0.5] / [0.49, 0.5] / [0.9] 5e-5: the least
    assert stage_boundaries(shallow, min_dip=0.0)["boundaries"] == [2, 4]
    assert stage_boundaries(shallow, min_dip=0.0)["squared_error"] == pytest.approx(5e-5)
    assert stage_boundaries([0.5, 0.1])["boundaries"] is None


def test_layer_stats_skip_undefined_samples():
    nan = float("nan")
    stats = layer_stats(torch.tensor([[1.0, nan, nan], [3.0, 2.0, nan], [2.0, 4.0, nan]]))
    assert stats["samples"] == [3, 2, 0]
    assert stats["mean"][:2] == pytest.approx([2.0, 3.0]) and stats["mean"][2] is None
    assert stats["std"][:2] == pytest.approx([(2 / 3) ** 0.5, 1.0]) and stats["std"][2] is None  # ddof 0


@pytest.fixture(scope="module")
def testbed_shaped(tmp_path_factory):
    """A tiny random checkpoint of the testbed's shape (3 layers), its processor, and random exit heads for it."""
    root = tmp_path_factory.mktemp("analyze")
    model, processor = save_tiny_testbed(root / "model")
    torch.manual_seed(1)
    ExitHeads(ExitHeadsConfig(hidden_size=32, num_layers=3, head_hidden=8, threshold=0.5)).save_pretrained(
        root / "heads")
    return model, processor, root


def test_withdrawal_sweep_at_every_layer_is_the_stock_model(testbed_shaped):
    model, processor, _ = testbed_shaped
    samples = read_llava_json(TESTBED_DATA_DIR / "test.json", TESTBED_DATA_DIR / "images")[:6]
    collator = PromptCollator(processor, require_answer=False)
    batches = [collator(samples[i : i + 3]) for i in range(0, 6, 3)]
    engine = VisualExit(model)
    sweep = withdrawal_sweep(engine, processor, batches, [0, 3], max_new_tokens=5)
    stock = []
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        stock += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert sweep.runs[3].answers == stock and sweep.full.answers == stock
    assert sweep.runs[0].exit_layer == [0] * 6 and sweep.runs[3].exit_layer == [3] * 6
    with pytest.raises(ValueError, match=r"withdrawal layers \[4\] outside \[0, 3\]"):
        withdrawal_sweep(engine, processor, batches, [0, 4], max_new_tokens=5)


def run_analyze(root: Path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), f"model.name_or_path={root / 'model'}", f"heads={root / 'heads'}",
         *overrides], cwd=ROOT, capture_output=True, text=True, check=False)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_analyze_end_to_end(testbed_shaped, tmp_path):
    _, _, root = testbed_shaped
    out = tmp_path / "analysis"
    result = run_analyze(root, "analysis.n=16", "batch_size=8", "max_new_tokens=4", f"out_dir={out}",
                         f"hydra.run.dir={tmp_path / 'run'}")
    results = json.loads((out / "analysis.json").read_text())
    families = ["colour", "count", "glyph", "glyph_colour", "list_colours", "presence", "relation", "shape"]
    assert results["samples"] == 16 and results["num_layers"] == 3
    assert list(results["groups"]) == ["all", *families] and sum(results["groups"][f] for f in families) == 16
    for group in results["groups"]:
        for part in ("visual_self", "visual_text", "cross", "text_self"):
            stats = results["attention"][group][part]
            assert len(stats["mean"]) == len(stats["std"]) == 3 and stats["samples"] == [results["groups"][group]] * 3
        found = results["stages"][group]
        assert found["boundaries"] == stage_boundaries(results["attention"][group]["cross"]["mean"])["boundaries"]
    assert results["stages"]["min_dip"] == 0.1 and "step function of three levels" in results["stages"]["rule"]
    points = results["withdrawal"]["all"]["points"]
    assert [p["k"] for p in points] == [0, 1, 2, 3]  # every layer by default
    assert points[3]["agreement"] == 1 and points[3]["flops_saved"] == 0 and points[0]["flops_saved"] > 0
    entropy = results["entropy"]
    assert entropy["policy"] == "dynamic" and set(entropy["with"]) == set(results["groups"])
    assert 1 <= entropy["mean_exit_layer"]["all"] <= 3
    for name in ("attention_stages.png", "attention_stages_by_family.png", "withdrawal.png", "entropy.png",
                 "analysis.md"):
        assert (out / name).stat().st_size > 0, name
    assert "## Attention stages" in result.stdout and "| early fusion |" in result.stdout

    vtw = run_analyze(root, "analysis.n=4", "analysis.policy=vtw", "analysis.vtw_layer=1",
                      "analysis.withdrawal_layers=[0,3]", f"out_dir={tmp_path / 'vtw'}",
                      f"hydra.run.dir={tmp_path / 'run_vtw'}")
    assert vtw.returncode == 0
    exited = json.loads((tmp_path / "vtw" / "analysis.json").read_text())
    assert exited["entropy"]["mean_exit_layer"]["all"] == 1
    assert exited["entropy"]["with"]["all"]["cross"]["samples"] == [4, 0, 0]  # no visual keys after the exit
    assert [p["k"] for p in exited["withdrawal"]["all"]["points"]] == [0, 3]


def compose_analyze(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("analyze", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["analysis.policy=fastv"], r"analysis.policy='fastv': must be one of none, dynamic, vtw"),
        (["analysis.policy=vtw"], r"analysis.vtw_layer=None: must be an integer >= 0"),
        (["analysis.vtw_layer=3"], r"analysis.vtw_layer=3: is the exit layer of analysis.policy=vtw"),
        (["analysis.n=0"], r"analysis.n=0: must be an integer >= 1 \(or null\)"),
        (["analysis.withdrawal_layers=[0,-1]"], r"analysis.withdrawal_layers=\[0, -1\]: must be null"),
        (["analysis.min_dip=2"], r"analysis.min_dip=2: must be in \[0.0, 1.0\]"),
        (["analysis.query_chunk=0"], r"analysis.query_chunk=0: must be an integer >= 1"),
        (["threshold=1.5"], r"threshold=1.5: must be in \[0.0, 1.0\]"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    check_analyze_config(compose_analyze())
    with pytest.raises(ConfigError, match=message):
        check_analyze_config(compose_analyze(*overrides))


@pytest.mark.slow
def test_bad_input_is_named(testbed_shaped, tmp_path):
    _, _, root = testbed_shaped
    past = run_analyze(root, "analysis.policy=vtw", "analysis.vtw_layer=5", f"out_dir={tmp_path}",
                       f"hydra.run.dir={tmp_path / 'past'}", ok=False)
    assert past.returncode != 0 and "analysis.vtw_layer=5 is past the model's 3 layers" in past.stderr
    split = run_analyze(root, "analysis.split=dev", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'split'}",
                        ok=False)
    assert split.returncode != 0 and ("analysis.split='dev': the data has no such split (it has train, val, test, "
                                      "certification)") in \
        split.stderr
    # a decoder whose attention normalises its queries and keys (Qwen3's q_norm / k_norm): the recomputed weights
    # would not be the model's
    config = LlavaConfig(vision_config=build_model("llava").config.vision_config, image_token_id=98,
                         text_config=Qwen3Config(**text_kwargs(2), head_dim=8))
    model = LlavaForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"the attention analysis .* needs the decoder's attention weights.*layer 0 "
                                         r"attention \(Qwen3Attention\) also applies q_norm, k_norm"):
        analyze(VisualExit(model), None, [], AnalysisSettings())
