"""Qwen2-VL (`qwen2_vl`) and Qwen2.5-VL (`qwen2_5_vl`): images and videos, 3-D multimodal rotary (M-RoPE).

Positions are the stock ones: `get_rope_index` gives every token a (temporal, height, width) position [3, B, T]
once for the full prompt; the rotary (with the `mrope_section` interleave) turns them into per-token cos/sin
[B, T, head_dim], which the engine gathers for the tokens each layer keeps, so text keeps its 3-D positions
after the visual tokens leave. Decoding continues each row from the last prompt position, as `generate` does
(`position_ids[..., -1] + 1`, i.e. text position + `rope_deltas`).
"""

import torch

from .base import EmbeddedInputs, FamilyAdapter


class QwenVLAdapter(FamilyAdapter):
    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **position_inputs,  # mm_token_type_ids, second_per_grid_ts: used by `prefill_position_ids`
    ) -> EmbeddedInputs:
        inner = self.model.model
        inputs_embeds = self.embed_tokens(input_ids)
        encoded = dict(mm_encoder_outputs or {})
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = inner.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = inner.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        for modality, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            output = encoded.get(modality)
            self.check_placeholders(input_ids, modality, token_id, output is not None)
            if output is not None:
                inputs_embeds = self.scatter_features(input_ids, inputs_embeds, modality, list(output.pooler_output))
        return EmbeddedInputs(inputs_embeds, self.withdrawn_mask(input_ids))

    @staticmethod
    def _three_rows(position_ids: torch.Tensor) -> torch.Tensor:
        """[3, B, T] from what the stock model accepts: [B, T] (text), [3, B, T], or generate's [4, B, T]."""
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, *position_ids.shape)
        if position_ids.shape[0] == 4:  # generate prepends the 1-D text positions (used only for packed masks)
            return position_ids[1:]
        return position_ids

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, self._three_rows(position_ids))

    def prefill_position_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **unused,
    ) -> torch.Tensor:
        """What the stock forward computes (`compute_3d_position_ids` on a fresh prompt): [3, B, T].

        `input_ids` may extend the prompt the vision inputs were made for (e.g. prompt + teacher-forced answer):
        the extra tokens are text and continue each row by one, as generation does.
        """
        if image_grid_thw is None and video_grid_thw is None:
            batch, length = input_ids.shape
            return torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, length)
        if mm_token_type_ids is None:
            raise ValueError(
                "image_grid_thw/video_grid_thw were given without mm_token_type_ids, which M-RoPE positions need; "
                "pass the processor's mm_token_type_ids (or position_ids)."
            )
        if mm_token_type_ids.shape[1] < input_ids.shape[1]:  # tokens appended after the prompt (answers) are text
            extra_text = input_ids.shape[1] - mm_token_type_ids.shape[1]
            appended = mm_token_type_ids.new_zeros(len(input_ids), extra_text)
            mm_token_type_ids = torch.cat([mm_token_type_ids, appended], dim=1)
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        position_ids, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            **extra,
        )
        return position_ids

    def generation_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision_inputs
    ) -> torch.Tensor:
        """`get_rope_index` already skips padding, so generation and forward positions agree once there is vision
        input; text-only prompts get the 1-D generation positions on all three rows, as `generate` does."""
        if vision_inputs.get("image_grid_thw") is None and vision_inputs.get("video_grid_thw") is None:
            text = super().generation_position_ids(input_ids, attention_mask)
            return text[None].expand(3, *text.shape)
        return self.prefill_position_ids(input_ids, attention_mask, **vision_inputs)

    def next_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[3, B]: one past each row's last real prompt position (= text position + `rope_deltas`)."""
        return super().next_position_ids(self._three_rows(position_ids), attention_mask)
