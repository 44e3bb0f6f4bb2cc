"""The engine on a bitsandbytes-quantized frozen model, on the CPU: exit at `k` equals a masked-attention reference
run on the same quantized model; and the loader's bad input (missing extra, a mode bitsandbytes cannot run).

The models are the tiny LLaVA-1.5 and Qwen2-VL at `width=4` (every linear a whole number of bitsandbytes' blocks),
saved and loaded back through `load_frozen_model(..., quantization=...)` as a user's checkpoint would be. 8-bit runs
at `llm_int8_threshold=0`: at bitsandbytes' default 6.0, LLM.int8 chooses its unquantized outlier columns from all
rows of a matmul, so withdrawing visual rows changes text rows and no exactness holds (docs/precision.md).
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed
from reference import forward_positions, greedy_without_cache, masked_logits, stock_inputs_embeds
from tiny_models import Sample, build_batch, build_model, visual_mask

from dyvte import VisualExit
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.loading import load_frozen_model
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR

bitsandbytes = pytest.importorskip("bitsandbytes", reason="the quant extra: pip install 'dyvte[quant]'")
pytest.importorskip("accelerate", reason="the quant extra: pip install 'dyvte[quant]'")

ROOT = Path(__file__).resolve().parent.parent
IMAGE = TESTBED_DATA_DIR / "images" / "test_00000.png"
L = 4
# Both sides run the same quantized layers with fp32 activations; they differ only in the order of the sums over
# keys (the engine's sequence is shorter), so the logits (of magnitude ~0.7) agree to fp32 rounding (measured
# <= 5e-7).
ATOL = 1e-5
MODES = [("nf4", 6.0), ("fp4", 6.0), ("8bit", 0.0)]
QUANTIZED_LINEARS = {"nf4": "Linear4bit", "fp4": "Linear4bit", "8bit": "Linear8bitLt"}


@functools.lru_cache(maxsize=None)
def checkpoint(family: str, folder: str) -> str:
    model = build_model(family, num_layers=L, width=4)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family(request):
    return request.param


@pytest.fixture(scope="module", params=MODES, ids=[mode for mode, _ in MODES])
def quantized(request, family, tmp_path_factory):
    mode, threshold = request.param
    folder = checkpoint(family, str(tmp_path_factory.getbasetemp() / f"quantized-{family}"))
    model = load_frozen_model(folder, quantization=mode, llm_int8_threshold=threshold)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return mode, model


def padded_samples(family: str) -> list[Sample]:
    sizes = [(16, 16)] * 3 if family == "llava" else [(16, 16), (8, 16), (13, 7)]
    return [Sample(text_before=2, images=[sizes[0]], text_after=7, left_pad=3),
            Sample(text_before=4, images=[sizes[1]], text_after=5, right_pad=2),
            Sample(text_before=1, images=[sizes[2]], text_after=9)]


def text_positions(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool() & ~visual_mask(batch)


def reference(model, batch: dict, exit_layer, embeds=None) -> torch.Tensor:
    embeds = stock_inputs_embeds(model, **batch) if embeds is None else embeds
    return masked_logits(model, embeds, batch["attention_mask"], forward_positions(model, batch), visual_mask(batch),
                         exit_layer)


def test_layers_are_quantized(quantized):
    mode, model = quantized
    kinds = {type(m).__name__ for m in model.model.language_model.layers.modules()}
    assert QUANTIZED_LINEARS[mode] in kinds and "Linear" not in kinds


def test_every_exit_layer_equals_masked_reference(quantized, family):
    _, model = quantized
    batch = build_batch(model, padded_samples(family))
    engine, text = VisualExit(model), text_positions(batch)
    embeds = stock_inputs_embeds(model, **batch)
    for k in range(L + 1):
        exit_layer = torch.full((3,), k)
        logits = engine(**batch, exit_layer=exit_layer).logits
        assert (logits - reference(model, batch, exit_layer, embeds))[text].abs().max() <= ATOL, f"exit_layer={k}"


def test_mixed_exit_layers_equal_masked_reference(quantized, family):
    _, model = quantized
    batch = build_batch(model, padded_samples(family) + [Sample(text_before=5, images=[], text_after=4, left_pad=1)])
    exit_layer = torch.tensor([1, 3, 0, 2])
    logits = VisualExit(model)(**batch, exit_layer=exit_layer).logits
    assert (logits - reference(model, batch, exit_layer))[text_positions(batch)].abs().max() <= ATOL


def test_greedy_generate_with_mixed_exits_equals_no_cache_reference(quantized, family):
    _, model = quantized
    sizes = [(16, 16)] * 2 if family == "llava" else [(16, 16), (8, 16)]
    batch = build_batch(model, [Sample(left_pad=3, images=sizes), Sample(images=sizes[1:]), Sample(left_pad=1)])
    exit_layer = torch.tensor([0, 2, 3])
    expected = greedy_without_cache(model, batch, exit_layer, max_new_tokens=8)
    generated = VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, expected)


def test_int8_threshold_reaches_bitsandbytes(tmp_path):
    folder = checkpoint("llava", str(tmp_path / "llava"))
    for threshold in (0.0, 6.0):
        model = load_frozen_model(folder, quantization="8bit", llm_int8_threshold=threshold)
        layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear8bitLt)]
        assert layers and {m.state.threshold for m in layers} == {threshold}


def test_int8_outliers_in_visual_rows_change_text_rows_unless_threshold_is_zero(tmp_path):
    """Visual embeddings with one huge feature (as real projectors produce outliers): at threshold 6, LLM.int8 runs
    that input column unquantized only while visual rows are in the matmul, so withdrawing them changes the text
    logits; at threshold 0 nothing is an outlier and exit stays exact."""
    model = build_model("llava", num_layers=L, width=4)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight[5].mul_(100)
        model.model.multi_modal_projector.linear_2.bias[5].add_(30)
    model.save_pretrained(tmp_path / "outliers")
    differences = {}
    for threshold in (0.0, 6.0):
        quantized = load_frozen_model(str(tmp_path / "outliers"), quantization="8bit", llm_int8_threshold=threshold)
        batch = build_batch(quantized, padded_samples("llava"))
        exit_layer = torch.full((3,), 1)
        logits = VisualExit(quantized)(**batch, exit_layer=exit_layer).logits
        differences[threshold] = (logits - reference(quantized, batch, exit_layer))[text_positions(batch)].abs().max()
    assert differences[0.0] <= ATOL
    assert differences[6.0] > 100 * ATOL  # measured 5e-3 on logits of magnitude ~0.7


def test_mode_bitsandbytes_cannot_run_names_layer_and_fix(tmp_path, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_kernel)
    folder = checkpoint("llava", str(tmp_path / "llava"))
    with pytest.raises(ValueError, match=r"quantization='nf4': the installed bitsandbytes .* cannot run "
                                         r"model\..*Linear4bit.*no 4-bit kernel.*quantization=8bit"):
        load_frozen_model(folder, quantization="nf4")


@pytest.mark.slow
def test_train_infer_analyze_run_quantized(tmp_path):
    """train.py (labels -> heads -> validate) on an NF4 model, infer.py with its heads, analyze.py on LLM.int8; the
    NF4 heads recalibrated on the full-precision model (`stages=[labels,validate] heads=...`); and heads of another
    width refused before any labelling, the finished caches kept."""
    save_tiny_testbed(tmp_path / "model")
    checkpoint, cache = f"model.name_or_path={tmp_path / 'model'}", tmp_path / "cache"
    run("train.py", checkpoint, "model.quantization=nf4", "data.limit=8", "data.eval_limit=8",
        "head_training.epochs=1", "head_training.hidden=8", f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'train'}")
    report = json.loads((tmp_path / "train" / "validate.json").read_text())
    assert report["samples"] == 8 and 0 <= report["flops_saved"] <= 1
    caches = [json.loads(meta.read_text()) for meta in cache.glob("*/meta.json")]
    assert {c["split"] for c in caches} == {"train", "val", "test"} and {c["quantization"] for c in caches} == {"nf4"}
    answer = run("infer.py", checkpoint, "model.quantization=nf4", f"heads={tmp_path / 'train' / 'heads'}",
                 f"image={IMAGE}", "question=how many objects are there ?")
    assert 1 <= json.loads(answer.stdout[answer.stdout.index("{"):])["exit_layer"] <= 3
    run("analyze.py", checkpoint, "model.quantization=8bit", "model.llm_int8_threshold=0", "analysis.n=4",
        "batch_size=4", "max_new_tokens=3", "analysis.withdrawal_layers=[0,3]", f"out_dir={tmp_path / 'analysis'}",
        f"hydra.run.dir={tmp_path / 'analyze'}", f"heads={tmp_path / 'train' / 'heads'}")
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["samples"] == 4

    # the NF4 heads recalibrated on the full-precision model: its own labels, thresholds chosen on its val split
    run("train.py", checkpoint, "stages=[labels,validate]", f"heads={tmp_path / 'train' / 'heads'}",
        "validate.calibration=val", "data.limit=8", "data.eval_limit=8", f"cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'recalibrated'}")
    recalibrated = json.loads((tmp_path / "recalibrated" / "validate.json").read_text())
    assert recalibrated["samples"] == 8 and recalibrated["calibration"]["split"] == "val"
    caches = [json.loads(meta.read_text()) for meta in cache.glob("*/meta.json")]
    assert sorted(c["quantization"] or "none" for c in caches) == ["nf4"] * 3 + ["none"] * 3

    shards = sorted(p.name for p in cache.glob("*/shard-*"))
    ExitHeads(ExitHeadsConfig(hidden_size=64, num_layers=3, head_hidden=8)).save_pretrained(tmp_path / "wide")
    refused = run("train.py", checkpoint, "model.quantization=nf4", "stages=[labels,validate]",
                  f"heads={tmp_path / 'wide'}", "data.limit=8", "data.eval_limit=8", f"cache_dir={cache}",
                  f"hydra.run.dir={tmp_path / 'refused'}", ok=False)
    assert refused.returncode != 0
    assert "do not fit the model: hidden size 64 vs the model's 32" in refused.stderr
    assert "Train exit heads on this model" in refused.stderr
    assert sorted(p.name for p in cache.glob("*/shard-*")) == shards


def run(script: str, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result
