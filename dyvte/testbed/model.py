"""The tiny LLaVA of the testbed, built from stock configs: CLIP vision tower + Llama decoder + word tokenizer.

Everything here is a stock Hugging Face class, so the saved checkpoint loads with
`AutoModelForImageTextToText` / `AutoProcessor` and exercises the same code paths as a real LLaVA.
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dyvte.testbed.scenes import SceneConfig, vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

# "<s>USER: <image>\n{question} ASSISTANT:" and, for assistant turns, " {answer}</s>". Content may be a string
# or a list of {"type": "image"} / {"type": "text"} parts, as in the standard Hugging Face conversation format.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in parts %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the tiny LLaVA. The vision tower is shallow on purpose: one object per patch is easy to
    describe, and the relational work is left to the decoder layers."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 12
    num_heads: int = 4
    vision_hidden_size: int = 96
    vision_intermediate_size: int = 192
    vision_layers: int = 2
    vision_heads: int = 4
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # the output head shares the input embeddings


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the generator's closed vocabulary; no BOS is added automatically because the
    chat template writes it."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return tokenizer


def build_processor(scene_config: SceneConfig = SceneConfig()) -> LlavaProcessor:
    size = scene_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=scene_config.cell,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_model(
    processor: LlavaProcessor, model_config: ModelConfig = ModelConfig(), scene_config: SceneConfig = SceneConfig()
) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=model_config.vision_hidden_size,
        intermediate_size=model_config.vision_intermediate_size,
        num_hidden_layers=model_config.vision_layers,
        num_attention_heads=model_config.vision_heads,
        image_size=scene_config.image_size,
        patch_size=scene_config.cell,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size,
        num_hidden_layers=model_config.num_layers,
        num_attention_heads=model_config.num_heads,
        num_key_value_heads=model_config.num_heads,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": model_config.rope_theta},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=model_config.tie_embeddings,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=scene_config.grid**2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=model_config.tie_embeddings,
    )
    config.model_config = asdict(model_config)
    config.scene_config = asdict(scene_config)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def pixel_values(images, scene_config: SceneConfig = SceneConfig()) -> torch.Tensor:
    """Fast path of the image processor for images already at the model's resolution (used in pre-training,
    where the PIL processor would dominate the step time); `tests/test_testbed.py` checks they agree."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255.0
    array = (array - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
