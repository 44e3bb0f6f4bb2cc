"""LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`).

Both put the projected image features into the positions of `config.image_token_id`; LLaVA-NeXT's anyres tiling
and image-newline tokens only change how many features an image has, which the model's own
`get_image_features` already returns per image.
"""

import torch

from .base import EmbeddedInputs, FamilyAdapter


def image_token_runs(visual_mask: torch.Tensor) -> list[tuple[int, int]]:
    """`(sample, length)` of every contiguous run of image tokens, in batch order (one run per image)."""
    runs = []
    for sample, row in enumerate(visual_mask):
        positions = row.nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        breaks = ((positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
        runs.extend((sample, len(run)) for run in torch.tensor_split(positions, breaks))
    return runs


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
        image_mask = input_ids == self.image_token_id
        encoded = (mm_encoder_outputs or {}).get("image")
        has_pixels = encoded is not None or (pixel_values is not None and pixel_values.numel() > 0)
        if not has_pixels:
            if image_mask.any():
                samples = image_mask.any(dim=1).nonzero().squeeze(1).tolist()
                raise ValueError(
                    f"sample(s) {samples} contain image tokens (id {self.image_token_id}) but no pixel_values were given."
                )
            return inputs_embeds
        if not image_mask.any():
            raise ValueError(
                "pixel_values were given but no sample contains the image token "
                f"(id {self.image_token_id}); build the prompt with the processor so it inserts the image tokens."
            )
        if encoded is None:
            encoded = self.image_features(pixel_values, image_sizes, **vision_kwargs)
        features = encoded.pooler_output
        check_feature_counts(image_token_runs(image_mask), [f.shape[0] for f in features])
        features = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder = self.model.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=features
        )
        if isinstance(placeholder, tuple):  # families with videos return (image mask, video mask)
            placeholder = placeholder[0]
        return inputs_embeds.masked_scatter(placeholder, features)


def check_feature_counts(runs: list[tuple[int, int]], feature_counts: list[int]) -> None:
    """Name the sample whose image tokens do not match the vision tower's features, before `masked_scatter` fails."""
    if len(runs) == len(feature_counts):
        for image, ((sample, n_tokens), n_features) in enumerate(zip(runs, feature_counts)):
            if n_tokens != n_features:
                raise ValueError(
                    f"sample {sample}: image {image} has {n_tokens} image tokens in the prompt but {n_features} "
                    f"features from the vision tower (prompt built for another image size or processor?)."
                )
        return
    n_tokens, n_features = sum(n for _, n in runs), sum(feature_counts)
    if n_tokens != n_features:  # adjacent images share one run, so only the totals can be compared then
        per_sample: dict[int, int] = {}
        for sample, n in runs:
            per_sample[sample] = per_sample.get(sample, 0) + n
        raise ValueError(
            f"image tokens per sample {per_sample} (total {n_tokens}) do not match the {len(feature_counts)} "
            f"image(s) given, which have {n_features} features in total."
        )
