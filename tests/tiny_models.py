"""Tiny random-weight MLLMs built from configs, and batches for them, as transformers' own tests do.

Each family gets a builder for the model and for a batch described per sample (padding, text, images), so the
same exactness suite runs on every family.
"""

from dataclasses import dataclass, field

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

IMAGE_TOKEN = 98
PAD, BOS, EOS = 0, 1, 2


def text_config(num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def build_model(family: str, attn_implementation: str = "sdpa", num_layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llava":
        vision = CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4
        )
        config = LlavaConfig(
            vision_config=vision, text_config=text_config(num_layers), image_token_id=IMAGE_TOKEN,
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
    else:
        raise ValueError(family)
    config._attn_implementation = attn_implementation
    model = model_class(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


@dataclass
class Sample:
    text_before: int = 3
    images: list = field(default_factory=lambda: [(16, 16)])  # image sizes (H, W); LLaVA-1.5 ignores them
    text_after: int = 6
    left_pad: int = 0
    right_pad: int = 0


def image_tokens(model, size) -> int:
    config = model.config
    if config.model_type == "llava":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return model.model.get_image_features(
        pixel_values=torch.zeros(1, 5, 3, 8, 8), image_sizes=torch.tensor([size]), return_dict=True
    ).pooler_output[0].shape[0]


def build_batch(model, samples: list[Sample], seed: int = 0) -> dict:
    """Processor-like inputs: image tokens expanded, padding as described, one pixel tensor per image."""
    generator = torch.Generator().manual_seed(seed)
    rows, masks, sizes = [], [], []
    for sample in samples:
        ids = [BOS] + torch.randint(3, 90, (sample.text_before,), generator=generator).tolist()
        for size in sample.images:
            ids += [IMAGE_TOKEN] * image_tokens(model, size)
            ids += torch.randint(3, 90, (1,), generator=generator).tolist()
            sizes.append(size)
        ids += torch.randint(3, 90, (sample.text_after,), generator=generator).tolist()
        rows.append([PAD] * sample.left_pad + ids + [PAD] * sample.right_pad)
        masks.append([0] * sample.left_pad + [1] * len(ids) + [0] * sample.right_pad)
    length = max(len(r) for r in rows)
    rows = [[PAD] * (length - len(r)) + r for r in rows]  # equalise with extra left padding
    masks = [[0] * (length - len(m)) + m for m in masks]
    batch = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
    if sizes:
        if model.config.model_type == "llava":
            batch["pixel_values"] = torch.randn(len(sizes), 3, 16, 16, generator=generator)
        else:
            num_patches = max(image_size_to_num_patches(s, model.config.image_grid_pinpoints, 8) for s in sizes)
            batch["pixel_values"] = torch.randn(len(sizes), num_patches, 3, 8, 8, generator=generator)
            batch["image_sizes"] = torch.tensor(sizes)
    return batch
