"""`python -m benchmarks.qwen2vl2b_folder [--out DIR]`: a random-weight Qwen2-VL-2B-Instruct in its own format.

The folder loads with `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` exactly like
Qwen/Qwen2-VL-2B-Instruct: the same config (a 32-block vision tower of width 1280 with 14-px patches merged 2 x 2
into the decoder's width; a 28-layer Qwen2 decoder, hidden 1536, MLP 8960, 12 query and 2 key-value heads, M-RoPE
sections [16, 24, 24], tied embeddings, vocabulary 151936), bf16 safetensors shards under the checkpoint's own tensor
names, and the real Qwen2 tokenizer, dynamic-resolution image processor and chat template, taken from the `qwen2-vl`
real-format fixture (tests/fixtures/real_format.py). Only the weights are random.

Built like `benchmarks.llava7b_folder` (never materialised: tensor by tensor, seeded by name, one shard in memory),
about 4.4 GB under `$DYVTE_FIXTURES_CACHE` or `~/.cache/dyvte-fixtures/` (never committed).
"""

from pathlib import Path

from .llava7b_folder import build_random_folder, fixtures_cache, folder_cli


def qwen2vl2b_config(small_config):
    """Qwen/Qwen2-VL-2B-Instruct's config, built on the real-format fixture's (same token ids) with the
    checkpoint's layer sizes."""
    from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

    text = Qwen2VLTextConfig(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, sliding_window=32768,
        max_window_layers=28, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0})
    vision = Qwen2VLVisionConfig(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_channels=3,
                                 hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=small_config.image_token_id,
                         video_token_id=small_config.video_token_id,
                         vision_start_token_id=small_config.vision_start_token_id,
                         vision_end_token_id=small_config.vision_end_token_id, tie_word_embeddings=True,
                         dtype="bfloat16")


def default_folder() -> Path:
    return fixtures_cache() / "qwen2-vl-2b-random"


def build(folder: Path, shard_gib: float = 2.0) -> Path:
    """The folder (built if missing; built next to its place, then renamed)."""
    from transformers import Qwen2VLForConditionalGeneration

    return build_random_folder(folder, "qwen2-vl", qwen2vl2b_config, Qwen2VLForConditionalGeneration, shard_gib)


def main() -> None:
    folder_cli(build, default_folder(), __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
