"""A model that will not fit is refused before any weight is read, with the bytes needed against the bytes free.

References: the bytes of a really built model (stock transformers, real tensors), and the bitsandbytes storage
rule counted by hand over its linear layers.
"""

import math
from collections import namedtuple

import psutil
import pytest
import torch
from tiny_models import FAMILIES, build_model
from transformers import AutoModelForImageTextToText

from dyvte.loading import load_mllm
from dyvte.memory import weight_bytes

VirtualMemory = namedtuple("VirtualMemory", "total available")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build_model(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_equal_the_loaded_models(model, dtype, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtype)  # fp32 rotary buffers stay fp32
    expected = sum(t.numel() * t.element_size() for t in (*loaded.parameters(), *loaded.buffers()))
    assert weight_bytes(model.config, dtype) == expected


@pytest.mark.parametrize("quantization, per_linear", [
    ("4bit", lambda w: math.ceil(w.numel() / 2) + 4 * math.ceil(w.numel() / 64)),
    ("nf4", lambda w: math.ceil(w.numel() / 2) + 4 * math.ceil(w.numel() / 64)),
    ("8bit", lambda w: w.numel() + 4 * w.shape[0]),
])
def test_quantized_weight_bytes_by_hand(model, quantization, per_linear):
    built = AutoModelForImageTextToText.from_config(model.config, dtype=torch.bfloat16)
    lm_head = built.get_output_embeddings().weight
    linear = [m.weight for m in built.modules() if isinstance(m, torch.nn.Linear) and m.weight is not lm_head]
    others = {id(w) for w in linear}
    expected = sum(per_linear(w) for w in linear) + sum(
        t.numel() * t.element_size() for t in (*built.parameters(), *built.buffers()) if id(t) not in others)
    assert weight_bytes(model.config, torch.bfloat16, quantization) == expected


def test_a_model_that_does_not_fit_is_refused_before_loading(model, tmp_path, monkeypatch):
    model.config.save_pretrained(tmp_path)  # a folder without weights: loading anything would fail otherwise
    needed = weight_bytes(model.config, torch.float32)
    free = 2**30 // 4
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VirtualMemory(2**34, free))
    with pytest.raises(MemoryError) as error:
        load_mllm(str(tmp_path), dtype=torch.float32)
    message = str(error.value)
    assert f"weights take {needed / 2**30:.1f} GiB" in message
    assert "0.2 GiB free" in message and "1.0 GiB to run" in message  # 1 GiB + 15% of a tiny model
    assert "model.quantization=4bit" in message and "model.dtype=bfloat16" in message and "Nothing was loaded" in message


def test_a_model_that_fits_goes_on_to_load(model, tmp_path, monkeypatch):
    model.config.save_pretrained(tmp_path)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VirtualMemory(2**34, 2**33))
    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin|no file named"):  # past the check
        load_mllm(str(tmp_path), dtype=torch.float32)


def test_head_inputs_stream_the_batches_a_whole_tensor_gives(tmp_path):
    """The heads' training batches read from the memory-mapped cache a batch at a time equal those of one fp32
    tensor of every row (the mean and last text state, the halves of the cached `features`), in the same order."""
    import datasets
    from torch.utils.data import DataLoader, TensorDataset

    from dyvte.heads import ExitHeadsConfig
    from dyvte.training.heads_module import HeadInputs
    from dyvte.training.label_store import row_features

    n, layers, d = 37, 3, 8
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, layers, 2 * d, generator=generator).half()
    labels = torch.randint(-1, 2, (n, layers + 1), generator=generator, dtype=torch.int8)
    rows = {"id": [f"{i:03d}" for i in range(n)], "family": ["q"] * n, "answer": ["a"] * n, "ground_truth": ["a"] * n,
            "n_text": [5] * n, "n_visual": [9] * n, "vision_flops": [0] * n, "labels": labels.tolist(),
            "match": (labels == 1).tolist(), "ce": torch.rand(n, layers + 1).tolist(),
            "accurate": (labels == 1).tolist(), "features": features.numpy()}
    datasets.Dataset.from_dict(rows, features=row_features(layers, d, 2)).save_to_disk(str(tmp_path / "shard"))
    dataset = datasets.load_from_disk(str(tmp_path / "shard"))
    config = ExitHeadsConfig(d, layers, 4, inputs=("mean_text", "last_text"), label_shape="per_layer",
                             label_target="safe")
    whole = TensorDataset(features.float(), labels[:, 1:].long())  # mean_text then last_text: the stored order

    def batches(data):
        return list(DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3)))

    for (streamed_x, streamed_y), (x, y) in zip(batches(HeadInputs(dataset, config)), batches(whole), strict=True):
        assert streamed_x.dtype == torch.float32 and torch.equal(streamed_x, x) and torch.equal(streamed_y, y)
