"""LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`).

Both put the projected image features into the positions of `config.image_token_id`; LLaVA-NeXT's anyres tiling
and image-newline tokens only change how many features an image has, which the model's own
`get_image_features` already returns per image.
"""

import torch

from .base import EmbeddedInputs, FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **vision_kwargs,
    ) -> EmbeddedInputs:
        """`mm_encoder_outputs` is the vision output `model.generate` computes before the decoding loop."""
        inputs_embeds = self.embed_images(
            input_ids, self.embed_tokens(input_ids), pixel_values, image_sizes, mm_encoder_outputs, **vision_kwargs
        )
        return EmbeddedInputs(inputs_embeds, self.withdrawn_mask(input_ids))

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None, **vision_kwargs):
        """The model's own `get_image_features`: one feature tensor per image."""
        if image_sizes is not None:  # LLaVA-1.5's CLIP tower does not accept it; NeXT needs it.
            vision_kwargs["image_sizes"] = image_sizes
        return self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)

    def embed_images(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        mm_encoder_outputs: dict | None,
        **vision_kwargs,
    ) -> torch.Tensor:
        """`inputs_embeds` with the image features scattered into the image-token positions."""
        encoded = (mm_encoder_outputs or {}).get("image")
        has_pixels = encoded is not None or (pixel_values is not None and pixel_values.numel() > 0)
        self.check_placeholders(input_ids, "image", self.image_token_id, has_pixels)
        if not has_pixels:
            return inputs_embeds
        if encoded is None:
            encoded = self.image_features(pixel_values, image_sizes, **vision_kwargs)
        return self.scatter_features(input_ids, inputs_embeds, "image", list(encoded.pooler_output))
