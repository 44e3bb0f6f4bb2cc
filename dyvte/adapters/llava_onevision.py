"""LLaVA-OneVision (`llava_onevision`): LLaVA-NeXT-style anyres images plus videos with their own token.

Images go through the LLaVA path (the model's own `get_image_features`, one feature tensor per image); videos
through `get_video_features` (pooled frames + one newline feature per video) into the `video_token_id` positions.
The language model is a stock Qwen2 decoder with 1-D positions (the base defaults).
"""

import torch

from .base import EmbeddedInputs
from .llava import LlavaAdapter

VISION_OPTIONS = ("batch_num_images", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")


class LlavaOnevisionAdapter(LlavaAdapter):
    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, **vision_kwargs):
        """`batch_num_images` (from the processor) tells multi-image prompts apart: their images are not tiled."""
        options = {k: vision_kwargs[k] for k in VISION_OPTIONS if vision_kwargs.get(k) is not None}
        return self.model.model.get_image_features(pixel_values, image_sizes, return_dict=True, **options)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **vision_kwargs,
    ) -> EmbeddedInputs:
        inputs_embeds = self.embed_images(
            input_ids, self.embed_tokens(input_ids), pixel_values, image_sizes, mm_encoder_outputs, **vision_kwargs
        )
        encoded = (mm_encoder_outputs or {}).get("video")
        has_videos = encoded is not None or pixel_values_videos is not None
        self.check_placeholders(input_ids, "video", self.video_token_id, has_videos)
        if encoded is None and pixel_values_videos is not None:
            encoded = self.model.model.get_video_features(pixel_values_videos, return_dict=True)
        if encoded is not None:
            inputs_embeds = self.scatter_features(input_ids, inputs_embeds, "video", list(encoded.pooler_output))
        return EmbeddedInputs(inputs_embeds, self.withdrawn_mask(input_ids))
