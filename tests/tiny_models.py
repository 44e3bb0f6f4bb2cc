"""Tiny random-weight MLLMs built from configs, and batches for them, as transformers' own tests do.

Each family gets a builder for the model and for a batch described per sample (padding, text, images, videos), so
the same exactness suite runs on every family. All families share the token ids below (image placeholders are
`IMAGE_TOKEN`, video placeholders `VIDEO_TOKEN`), so tests can find the visual tokens the same way.
"""

import math
from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

IMAGE_TOKEN, VIDEO_TOKEN = 98, 97
VISION_START, VISION_END = 95, 96  # Qwen <|vision_start|>/<|vision_end|>, InternVL <img>/</img>
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_onevision"]
VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision"]
MROPE_FAMILIES = ["qwen2_vl", "qwen2_5_vl"]

# Qwen: 2x2 pixel patches, 2x2 spatial merge, 2 frames per temporal patch
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 2, 2, 2
# InternVL: 16x16 tiles of 4x4 patches, pixel-shuffled by 0.5 -> 4 tokens per tile
INTERNVL_TILE, INTERNVL_TOKENS_PER_TILE = 16, 4


def text_kwargs(num_layers: int, width: int = 1) -> dict:
    """`width` multiplies every hidden size: bitsandbytes' 4-bit CPU kernel needs linears with multiples of 32
    outputs and of its 64-wide quantization blocks as inputs, so quantized tests build `width=4` models."""
    return dict(
        vocab_size=99,
        hidden_size=32 * width,
        intermediate_size=64 * width,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def text_config(num_layers: int = 4, width: int = 1) -> LlamaConfig:
    return LlamaConfig(**text_kwargs(num_layers, width))


def build_model(family: str, attn_implementation: str = "sdpa", num_layers: int = 4, seed: int = 0, width: int = 1):
    """A random-weight model of `family`; `width` multiplies the hidden sizes of LLaVA-1.5 and Qwen2-VL."""
    torch.manual_seed(seed)
    if width != 1 and family not in ("llava", "qwen2_vl"):
        raise ValueError(f"width={width} is built for llava and qwen2_vl only")
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=16 * width, intermediate_size=32 * width, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
        )
        config = LlavaConfig(
            vision_config=vision, text_config=text_config(num_layers, width), image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        )
        model_class = LlavaForConditionalGeneration
    elif family == "llava_next":
        vision = CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
        )
        config = LlavaNextConfig(
            vision_config=vision, text_config=text_config(num_layers), image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=[[16, 16], [8, 16], [16, 8]], vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model_class = LlavaNextForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        text = {**text_kwargs(num_layers, width),
                "rope_parameters": {"rope_type": "default", "mrope_section": [2 * width, width, width],
                                    "rope_theta": 10000.0}}
        vision = dict(depth=2, num_heads=2, patch_size=QWEN_PATCH, spatial_merge_size=QWEN_MERGE,
                      temporal_patch_size=QWEN_TEMPORAL, in_channels=3)
        if family == "qwen2_vl":
            vision.update(embed_dim=16 * width, hidden_size=32 * width)
            config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        else:
            vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, window_size=8,
                          fullatt_block_indexes=[1])
            config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        config = config_class(
            text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
            vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        )
    elif family == "internvl":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      image_size=[INTERNVL_TILE] * 2, patch_size=[4, 4])
        config = InternVLConfig(
            vision_config=vision, text_config=Qwen2Config(**text_kwargs(num_layers)), image_token_id=IMAGE_TOKEN,
            image_seq_length=INTERNVL_TOKENS_PER_TILE, tie_word_embeddings=False,
        )
        model_class = InternVLForConditionalGeneration
    elif family == "llava_onevision":
        vision = SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
        )
        config = LlavaOnevisionConfig(
            vision_config=vision, text_config=Qwen2Config(**text_kwargs(num_layers)), image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN, image_grid_pinpoints=[[16, 16], [8, 16], [16, 8]],
            vision_feature_layer=-1, vision_feature_select_strategy="full",
        )
        model_class = LlavaOnevisionForConditionalGeneration
    else:
        raise ValueError(family)
    config._attn_implementation = attn_implementation
    model = model_class(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def siglip_llava(attn_implementation: str = "sdpa", num_layers: int = 4):
    """A tiny LLaVA whose tower is SigLIP (no CLS token: every output token is a patch, strategy 'full')."""
    torch.manual_seed(4)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                image_size=16, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=text_config(num_layers), image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config).eval()


@dataclass
class Sample:
    text_before: int = 3
    images: list = field(default_factory=lambda: [(16, 16)])  # image sizes (H, W); LLaVA-1.5 ignores them
    text_after: int = 6
    left_pad: int = 0
    right_pad: int = 0
    videos: list = field(default_factory=list)  # video sizes (frames, H, W), for the video families


def qwen_grid(size, frames: int = 1) -> list[int]:
    """(t, h, w) patch grid of an image (frames=1, repeated to a temporal patch) or video of `size` pixels."""
    h, w = (2 * math.ceil(s / (QWEN_PATCH * QWEN_MERGE)) for s in size)
    return [max(1, math.ceil(frames / QWEN_TEMPORAL)), h, w]


def internvl_tiles(size) -> int:
    return max(1, size[0] * size[1] // 64)


def image_tokens(model, size, tiled: bool = True) -> int:
    """Visual tokens of one image; `tiled=False`: OneVision's multi-image prompts (base view only, no anyres)."""
    config = model.config
    family = config.model_type
    if family == "llava":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if family in MROPE_FAMILIES:
        t, h, w = qwen_grid(size)
        return t * h * w // QWEN_MERGE**2
    if family == "internvl":
        return internvl_tiles(size) * INTERNVL_TOKENS_PER_TILE
    tile = config.vision_config.image_size
    patches = image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if tiled else 1
    extra = {} if family == "llava_next" else {"batch_num_images": torch.tensor([1 if tiled else 2])}
    return model.model.get_image_features(
        pixel_values=torch.zeros(1, patches, 3, tile, tile), image_sizes=torch.tensor([size]), return_dict=True, **extra
    ).pooler_output[0].shape[0]


def video_tokens(model, video) -> int:
    frames, h, w = video
    if model.config.model_type in MROPE_FAMILIES:
        t, gh, gw = qwen_grid((h, w), frames)
        return t * gh * gw // QWEN_MERGE**2
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return frames * math.ceil(side / 2) ** 2 + 1  # pooled frames + one newline


def placeholder(model, token: int, count: int) -> list[int]:
    """A visual span as the family's processor writes it (Qwen and InternVL wrap it in start/end markers)."""
    if model.config.model_type in (*MROPE_FAMILIES, "internvl"):
        return [VISION_START] + [token] * count + [VISION_END]
    return [token] * count


def build_batch(model, samples: list[Sample], seed: int = 0, indices: list[int] | None = None) -> dict:
    """Processor-like inputs: visual tokens expanded, padding as described, pixels in the family's layout.

    Sample `i`'s tokens and pixels depend only on `(seed, indices[i])` (default `indices[i] = i`), so a sample
    rebuilt alone with its index is the same sample as in a joint batch.
    """
    family = model.config.model_type
    indices = list(range(len(samples))) if indices is None else indices
    rows, masks, images, videos = [], [], [], []  # images/videos: (size, pixel tensor) in batch order
    for sample, index in zip(samples, indices):
        generator = torch.Generator().manual_seed(seed * 7919 + index)

        def text(n: int) -> list[int]:
            return torch.randint(3, 90, (n,), generator=generator).tolist()

        ids = [BOS] + text(sample.text_before)
        tiled = not (family == "llava_onevision" and len(sample.images) > 1)  # as OneVision's processor does
        for size in sample.images:
            ids += placeholder(model, IMAGE_TOKEN, image_tokens(model, size, tiled)) + text(1)
            images.append((size, image_pixels(model, size, generator, tiled)))
        for video in sample.videos:
            ids += placeholder(model, VIDEO_TOKEN, video_tokens(model, video)) + text(1)
            videos.append((video, video_pixels(model, video, generator)))
        ids += text(sample.text_after)
        rows.append([PAD] * sample.left_pad + ids + [PAD] * sample.right_pad)
        masks.append([0] * sample.left_pad + [1] * len(ids) + [0] * sample.right_pad)
    length = max(len(r) for r in rows)
    rows = [[PAD] * (length - len(r)) + r for r in rows]  # equalise with extra left padding
    masks = [[0] * (length - len(m)) + m for m in masks]
    batch = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
    if family in MROPE_FAMILIES:
        ids = batch["input_ids"]
        batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long() + 2 * (ids == VIDEO_TOKEN).long()
        if images:
            batch["pixel_values"] = torch.cat([p for _, p in images])
            batch["image_grid_thw"] = torch.tensor([qwen_grid(s) for s, _ in images])
        if videos:
            batch["pixel_values_videos"] = torch.cat([p for _, p in videos])
            batch["video_grid_thw"] = torch.tensor([qwen_grid(v[1:], v[0]) for v, _ in videos])
            if family == "qwen2_5_vl":  # seconds per temporal patch: spreads the temporal positions of frames
                batch["second_per_grid_ts"] = torch.tensor([0.5 * (i + 1) for i in range(len(videos))])
        return batch
    if images:
        if family in ("llava", "internvl"):
            batch["pixel_values"] = torch.cat([p for _, p in images])
        else:  # anyres: [images, max patches, 3, tile, tile], each image's unused patches zero
            most = max(p.shape[0] for _, p in images)
            batch["pixel_values"] = torch.stack(
                [torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for _, p in images]
            )
            batch["image_sizes"] = torch.tensor([s for s, _ in images])
            if family == "llava_onevision":
                batch["batch_num_images"] = torch.tensor([len(sample.images) for sample in samples])
    if videos:  # llava_onevision: [videos, frames, 3, tile, tile], one frame count per batch
        if len({v[0] for v, _ in videos}) > 1:
            raise ValueError("llava_onevision videos in one batch need the same frame count")
        batch["pixel_values_videos"] = torch.stack([p for _, p in videos])
    return batch


def image_pixels(model, size, generator: torch.Generator, tiled: bool = True) -> torch.Tensor:
    """One image's pixels, as the family's processor lays them out (to be concatenated/stacked per batch)."""
    family = model.config.model_type
    if family in MROPE_FAMILIES:
        return torch.randn(math.prod(qwen_grid(size)), 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=generator)
    if family == "llava":
        return torch.randn(1, 3, 16, 16, generator=generator)
    if family == "internvl":
        return torch.randn(internvl_tiles(size), 3, INTERNVL_TILE, INTERNVL_TILE, generator=generator)
    tile = model.config.vision_config.image_size
    patches = image_size_to_num_patches(size, model.config.image_grid_pinpoints, tile) if tiled else 1
    return torch.randn(patches, 3, tile, tile, generator=generator)


def video_pixels(model, video, generator: torch.Generator) -> torch.Tensor:
    frames, h, w = video
    if model.config.model_type in MROPE_FAMILIES:
        grid = qwen_grid((h, w), frames)
        return torch.randn(math.prod(grid), 3 * QWEN_TEMPORAL * QWEN_PATCH**2, generator=generator)
    tile = model.config.vision_config.image_size
    return torch.randn(frames, 3, tile, tile, generator=generator)


def sample_alone(model, samples: list[Sample], i: int, seed: int = 0) -> dict:
    """Sample `i` of `build_batch(model, samples, seed)` as a batch of its own, without padding."""
    alone = Sample(**{**samples[i].__dict__, "left_pad": 0, "right_pad": 0})
    return build_batch(model, [alone], seed, indices=[i])


def visual_mask(batch: dict) -> torch.Tensor:
    """Every image and video placeholder of a batch built here."""
    return (batch["input_ids"] == IMAGE_TOKEN) | (batch["input_ids"] == VIDEO_TOKEN)
