"""InternVL (HF-native `InternVLForConditionalGeneration`, e.g. `OpenGVLab/InternVL3-2B-hf`).

Each image is split into tiles and every tile gives `image_seq_length` features; the processor writes
`<img>` + that many image tokens per tile + `</img>`. Video frames go through the same image tokens (the model has
no separate video placeholder), so images and videos cannot be withdrawn apart: `withdraw` must be "both".
The language model is a stock Qwen2/Llama decoder with 1-D positions (the base defaults).
"""

import torch

from .base import EmbeddedInputs, FamilyAdapter

VISION_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy")


class InternVLAdapter(FamilyAdapter):
    separate_video_tokens = False

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **vision_kwargs,
    ) -> EmbeddedInputs:
        inner = self.model.model
        inputs_embeds = self.embed_tokens(input_ids)
        encoded = (mm_encoder_outputs or {}).get("image")
        has_pixels = encoded is not None or (pixel_values is not None and pixel_values.numel() > 0)
        self.check_placeholders(input_ids, "image", self.image_token_id, has_pixels)
        if not has_pixels:
            return EmbeddedInputs(inputs_embeds, self.withdrawn_mask(input_ids))
        if encoded is None:
            options = {k: vision_kwargs[k] for k in VISION_OPTIONS if vision_kwargs.get(k) is not None}
            encoded = inner.get_image_features(pixel_values=pixel_values, return_dict=True, **options)
        tiles = list(encoded.pooler_output)  # [tokens per tile, d] each
        inputs_embeds = self.scatter_features(input_ids, inputs_embeds, "image", tiles, item="tile")
        return EmbeddedInputs(inputs_embeds, self.withdrawn_mask(input_ids))
