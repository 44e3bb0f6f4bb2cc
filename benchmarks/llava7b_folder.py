"""`python -m benchmarks.llava7b_folder [--out DIR]`: a random-weight LLaVA-1.5-7B in the llava-hf format.

The folder loads with `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` exactly like
llava-hf/llava-1.5-7b-hf: the same config (CLIP ViT-L/14 at 336 px, 24 vision layers of width 1024; a 32-layer
Llama decoder, hidden 4096, MLP 11008, 32 heads, vocabulary 32064), bf16 safetensors shards under the checkpoint's
own tensor names, and the real Llama-2 tokenizer, image processor and chat template, taken from the `llava-1.5`
real-format fixture (tests/fixtures/real_format.py). Only the weights are random.

Memory: the model is never materialised. Its parameter names and shapes come from a model built on the meta
device; each tensor is drawn (seeded by its name, so every build is the same folder), written into the current
shard and dropped; a shard holds at most `--shard-gib` GiB. Peak memory is about one shard, never two copies of
the model. The folder (about 14 GB) is written next to its final place and renamed when complete, under
`$DYVTE_FIXTURES_CACHE` or `~/.cache/dyvte-fixtures/` (never committed).
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.bfloat16
INIT_STD = 0.02  # the checkpoint's initializer_range (Llama and CLIP)


def llava7b_config(small_config):
    """llava-hf/llava-1.5-7b-hf's config, built on the real-format fixture's (same token ids, processor geometry,
    feature layer and strategy) with the checkpoint's layer sizes."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=32001,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=small_config.image_token_id,
                       pad_token_id=small_config.pad_token_id,
                       vision_feature_layer=small_config.vision_feature_layer,
                       vision_feature_select_strategy=small_config.vision_feature_select_strategy,
                       projector_hidden_act=small_config.projector_hidden_act,
                       image_seq_length=small_config.image_seq_length, tie_word_embeddings=False, dtype="bfloat16")


def _draw(name: str, shape: torch.Size) -> torch.Tensor:
    """The tensor `name`: norm scales 1, biases 0, everything else N(0, 0.02), seeded by the name."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=DTYPE)
    if len(shape) == 1 and ("norm" in name or "layernorm" in name):
        return torch.ones(shape, dtype=DTYPE)
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD).to(DTYPE)


def write_weights(model_class, config, folder: Path, shard_bytes: int) -> int:
    """Writes the tensors of `model_class(config)` as `model-0000i-of-0000n.safetensors` shards plus the index
    (tied weights once, as `save_pretrained` writes them); returns the bytes."""
    from transformers.modeling_utils import revert_weight_conversion

    with torch.device("meta"):
        meta_model = model_class(config)
    # The checkpoint's tensor names: the stock class's own renaming from its modules to the saved keys, as
    # `save_pretrained` applies it (language_model.model.layers.0..., as in llava-hf/llava-1.5-7b-hf).
    saved = revert_weight_conversion(meta_model, meta_model.state_dict())
    tied = set(meta_model.all_tied_weights_keys) if config.get_text_config().tie_word_embeddings else set()
    tensors = [(name, tensor.shape) for name, tensor in saved.items() if name not in tied]
    del meta_model, saved
    groups, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = shape.numel() * DTYPE.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for index, group in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: _draw(name, shape) for name, shape in group}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, folder / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
        del shard
        print(f"{filename}: {len(group)} tensors", file=sys.stderr, flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def fixtures_cache() -> Path:
    """Where random-weight real-shape folders live: `$DYVTE_FIXTURES_CACHE` or `~/.cache/dyvte-fixtures/`."""
    return Path(os.environ.get("DYVTE_FIXTURES_CACHE", Path.home() / ".cache" / "dyvte-fixtures"))


def default_folder() -> Path:
    return fixtures_cache() / "llava-1.5-7b-random"


def build(folder: Path, shard_gib: float = 2.0) -> Path:
    """The folder (built if missing; built next to its place, then renamed)."""
    from transformers import LlavaForConditionalGeneration

    return build_random_folder(folder, "llava-1.5", llava7b_config, LlavaForConditionalGeneration, shard_gib)


def build_random_folder(folder: Path, fixture_name: str, make_config, model_class, shard_gib: float) -> Path:
    """`folder` (built if missing; built next to its place, then renamed): random weights of
    `model_class(make_config(small config))`, with every other file of the real-format fixture `fixture_name`
    (tests/fixtures/real_format.py): its generation config, processor files and licence note, copied as they are."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.real_format import fixture
    from transformers import AutoConfig

    if (folder / "config.json").exists():
        return folder
    small = fixture(fixture_name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        config = make_config(AutoConfig.from_pretrained(small))
        write_weights(model_class, config, staging, int(shard_gib * 2**30))
        config.save_pretrained(staging)
        for path in small.iterdir():  # the processor's files, the generation config and the licence note, as they are
            if path.is_file() and path.name != "config.json" and not path.name.startswith("model"):
                shutil.copy(path, staging / path.name)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def folder_cli(build_folder, folder: Path, description: str) -> None:
    """The command line of a random-weight folder builder: `--out DIR` (default `folder`) and `--shard-gib`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=folder)
    parser.add_argument("--shard-gib", type=float, default=2.0)
    args = parser.parse_args()
    print(build_folder(args.out, args.shard_gib))


def main() -> None:
    folder_cli(build, default_folder(), __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
