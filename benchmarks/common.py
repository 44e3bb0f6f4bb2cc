"""Shape-faithful random-weight models, inputs with the vision tower precomputed, timing and environment records.

Models are the stock transformers classes built from configs at the real widths of the checkpoints they stand for
(LLaVA-1.5-7B, Qwen2-VL-2B) with fewer decoder layers and a tiny vision tower: the language model's cost is what
the benchmarks measure, and the vision features are computed once and handed to the engine as
`mm_encoder_outputs`, so no timed call runs the vision tower.
"""

import gc
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.initialization import no_init_weights

from dyvte.adapters import ADAPTERS

PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class Shape:
    """A decoder at a real checkpoint's width with `num_layers` of its layers."""

    name: str  # what it stands for
    family: str  # "llava" or "qwen2_vl"
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    num_layers: int
    full_depth: int  # layers of the real checkpoint (for projections)
    n_visual: int = 576
    n_text: int = 64
    dtype: str = "float32"

    def record(self) -> dict:
        out = asdict(self)
        out["head_dim"] = self.hidden_size // self.num_heads
        return out


LLAVA_7B = Shape("llava-1.5-7b width", "llava", 4096, 11008, 32, 32, 32064, num_layers=4, full_depth=32)
QWEN2VL_2B = Shape("qwen2-vl-2b width", "qwen2_vl", 1536, 8960, 12, 2, 151936, num_layers=4, full_depth=28)
QUICK_LLAVA = Shape("quick (tiny llava)", "llava", 64, 172, 4, 4, 512, num_layers=4, full_depth=4, n_visual=36,
                    n_text=16)
QUICK_QWEN = Shape("quick (tiny qwen2-vl)", "qwen2_vl", 64, 128, 4, 2, 512, num_layers=4, full_depth=4,
                   n_visual=36, n_text=16)


def _grid_side(n_visual: int) -> int:
    side = int(round(n_visual**0.5))
    if side * side != n_visual:
        raise ValueError(f"n_visual must be a square number of tokens, got {n_visual}")
    return side


def build_model(shape: Shape, seed: int = 0, device: str | torch.device = "cpu"):
    """The stock MLLM class with the real decoder width, `shape.num_layers` layers and a tiny vision tower, built
    directly on `device` in `shape.dtype`."""
    torch.manual_seed(seed)
    side = _grid_side(shape.n_visual)
    if shape.family == "llava":
        text = LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads, max_position_embeddings=4096, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS,
        )
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=2 * side, patch_size=2)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab_size - 1,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
        model_class = LlavaForConditionalGeneration
    elif shape.family == "qwen2_vl":
        if "qwen2_vl" not in ADAPTERS:
            raise RuntimeError("the qwen2_vl adapter is not registered; use a llava-family shape instead")
        head_dim = shape.hidden_size // shape.num_heads
        section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # Qwen2-VL: [16, 24, 24] at head_dim 128
        text = dict(
            vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads, max_position_embeddings=32768, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1000000.0},
        )
        vision = dict(depth=1, num_heads=2, embed_dim=16, hidden_size=shape.hidden_size, patch_size=2,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        v = shape.vocab_size
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=v - 4, video_token_id=v - 3,
                               vision_start_token_id=v - 2, vision_end_token_id=v - 1, tie_word_embeddings=True)
        model_class = Qwen2VLForConditionalGeneration
    else:
        raise ValueError(shape.family)
    config._attn_implementation = "sdpa"
    # transformers' own init is slow at this size; `random_init` does the same job
    with no_init_weights(), torch.device(device):
        model = model_class._from_config(config, dtype=getattr(torch, shape.dtype))
    random_init(model, seed)
    model = model.eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


@torch.no_grad()
def random_init(model, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices and embeddings, unit norm weights, zero biases (transformers' scheme for these
    families, without its per-module overhead). Buffers (rotary frequencies) are left as the constructors made them."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if "norm" in type(module).__name__.lower():
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                param.normal_(0.0, std, generator=generator)


def build_inputs(model, shape: Shape, batch: int, seed: int = 0, n_text: int | None = None,
                 precompute_vision: bool = True) -> dict:
    """Engine inputs for `batch` samples of `n_visual` image tokens and `n_text` text tokens (BOS, a few text
    tokens, the image, the question), on the model's device, with the vision features precomputed into
    `mm_encoder_outputs`; with `precompute_vision=False`, the pixels instead (the tiny tower then runs inside each
    call: transformers before 5.23's `generate` refuses `mm_encoder_outputs`)."""
    n_text = shape.n_text if n_text is None else n_text
    side = _grid_side(shape.n_visual)
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    before = 4
    rows = []
    for _ in range(batch):
        text = torch.randint(3, shape.vocab_size - 8, (n_text,), generator=generator).tolist()
        if shape.family == "llava":
            row = [BOS] + text[: before - 1] + [config.image_token_id] * shape.n_visual + text[before - 1 : n_text - 1]
        else:  # the vision start/end markers are text tokens of the prompt
            row = ([BOS] + text[: before - 2] + [config.vision_start_token_id]
                   + [config.image_token_id] * shape.n_visual + [config.vision_end_token_id] + text[before - 2 : n_text - 3])
        rows.append(row)
    device = model.device
    input_ids = torch.tensor(rows, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if shape.family == "llava":
        size = config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(batch, 3, size, size, generator=generator).to(device)
    else:
        inputs["image_grid_thw"] = torch.tensor([[1, 2 * side, 2 * side]] * batch, device=device)
        inputs["pixel_values"] = torch.randn(batch * 4 * side * side, 3 * 2 * 2 * 2, generator=generator).to(device)
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
    if not precompute_vision:
        return inputs
    with torch.no_grad():
        if shape.family == "llava":
            encoded = model.model.get_image_features(pixel_values=inputs.pop("pixel_values"), return_dict=True)
        else:
            encoded = model.model.get_image_features(inputs.pop("pixel_values"), inputs["image_grid_thw"],
                                                     return_dict=True)
    inputs["mm_encoder_outputs"] = {"image": encoded}
    return inputs


def select_rows(inputs: dict, rows: list[int]) -> dict:
    """Samples `rows` of a batch from `build_inputs` (same tokens, same precomputed features)."""
    out = {}
    for key, value in inputs.items():
        if key == "mm_encoder_outputs":
            encoded = value["image"]
            features = [encoded.pooler_output[r] for r in rows]
            out[key] = {"image": type(encoded)(pooler_output=features)}
        else:
            out[key] = value[rows]
    return out


def free(*objects) -> None:
    del objects
    gc.collect()


# --- timing ----------------------------------------------------------------------------------------------------
def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
            "runs_s": times}


# --- environment ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def other_load() -> dict:
    """Whether the machine is shared right now (timings under contention are not comparable)."""
    pretraining = False
    try:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if "dyvte.testbed.pretrain" in cmd and int(pid) != os.getpid():
                    pretraining = True
    except OSError:
        pass
    return {"loadavg": list(os.getloadavg()), "pretraining_running": pretraining}


def environment(threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "machine_load_at_start": other_load(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
