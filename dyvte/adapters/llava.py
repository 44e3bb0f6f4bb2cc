"""LLaVA-1.5 (`llava`) and LLaVA-NeXT (`llava_next`).

Both put the projected image features into the positions of `config.image_token_id`; LLaVA-NeXT's anyres tiling
and image-newline tokens only change how many features an image has, which the model's own
`get_image_features` already returns per image.

LLaVA-1.5's visual tokens are its CLIP or SigLIP tower's patches, one square grid per image in row-major order
with nothing between images: the methods that select before the LLM read that tower here (`patch_grid`,
`TowerFeatures`). LLaVA-NeXT (anyres tiles, newline tokens) refuses them.
"""

import weakref

import torch

from .base import EmbeddedInputs, FamilyAdapter

GRID_FAMILIES = ("llava",)  # one square grid of tokens per image, in row-major order, nothing between images


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

    def patch_grid(self, method: str) -> tuple[int, bool]:
        """(side of one image's square grid of patch tokens, whether the tower has a CLS token). Refuses LLaVA-NeXT
        and settings whose visual tokens are not each image's patches one to one."""
        config = self.model.config
        if config.model_type not in GRID_FAMILIES:
            return super().patch_grid(method)
        has_cls = hasattr(self.model.model.vision_tower.embeddings, "class_embedding")
        if has_cls != (config.vision_feature_select_strategy == "default"):
            raise ValueError(
                f"{method} needs the prompt's image tokens to be the tower's patches: vision_feature_select_strategy "
                f"'default' for a tower with a CLS token, 'full' for one without; this model has "
                f"{config.vision_feature_select_strategy!r} and {'a' if has_cls else 'no'} CLS token."
            )
        vision = config.vision_config
        return vision.image_size // vision.patch_size, has_cls

    def tower_features(self, method: str, owner: object) -> "TowerFeatures":
        _, has_cls = self.patch_grid(method)
        return TowerFeatures(method, self.model, has_cls, owner)


class _TowerCapture:
    """The input and output of one vision-tower layer at its last call (a forward hook's target)."""

    def __init__(self):
        self.inputs: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None

    def record(self, module, args, kwargs, output) -> None:
        self.inputs = args[0] if args else kwargs["hidden_states"]
        self.outputs = output[0] if isinstance(output, tuple) else output


class TowerFeatures:
    """What the methods that select before the LLM read from the vision tower's feature layer (the one whose
    output the projector reads, `config.vision_feature_layer`): its input and output at the tower's last run, by a
    forward hook registered while `owner` lives, and its attention recomputed for the needed queries from the
    layer's own `layer_norm1`, `q_proj` and `k_proj` (so the tower keeps running with SDPA); and the model's own
    projector for the features a method keeps. `method` names the policy in every error."""

    def __init__(self, method: str, model, has_cls: bool, owner: object):
        self.method, self.model, self.has_cls = method, model, has_cls
        tower = model.model.vision_tower
        self.tower_name = type(tower).__name__
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise TypeError(f"{method} needs one vision feature layer; this model concatenates layers {layer}.")
        depth = len(tower.encoder.layers)
        feature_layer = layer % (depth + 1) - 1  # hidden_states[h] is the output of encoder layer h - 1
        if feature_layer < 0:
            raise ValueError(f"{method} needs the features of an encoder layer; this model reads the patch embeddings.")
        self.layer = tower.encoder.layers[feature_layer]
        self._capture = _TowerCapture()
        handle = self.layer.register_forward_hook(self._capture.record, with_kwargs=True)
        weakref.finalize(owner, handle.remove)

    def read(self, visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The feature layer's (input, output), [images, length, d] each, of the images of the prefill whose visual
        tokens are `visual_mask` [B, T] (None without visual tokens); refuses a prefill whose images the tower did
        not just encode."""
        inputs, outputs = self._capture.inputs, self._capture.outputs
        self._capture.inputs = self._capture.outputs = None
        n_visual = int(visual_mask.sum())
        if not n_visual:
            return None
        if outputs is None:
            raise ValueError(
                f"{self.method}: the vision tower did not run for this prefill's images (its features are read by a "
                "hook during the model's own image encoding); run it through engine(...), engine.prefill(...) or "
                "engine.generate(...) with the pixel values, after creating the policy."
            )
        patches = outputs.shape[1] - int(self.has_cls)
        if n_visual != outputs.shape[0] * patches:
            raise ValueError(
                f"{self.method}: the vision tower's last run encoded {outputs.shape[0]} images of {patches} patches, "
                f"but this prefill has {n_visual} visual tokens (images encoded elsewhere, or repeated for "
                f"num_return_sequences > 1, which {self.method} does not support)."
            )
        return inputs, outputs

    def attention(self, inputs: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature layer's attention probabilities [images, heads, queries, length] for the CLS query
        (`cls_only`) or every query, and its keys [images, heads, length, head_dim], from its input `inputs`."""
        attention = self.layer.self_attn
        normed = self.layer.layer_norm1(inputs)
        images, length, _ = normed.shape
        heads = attention.num_heads
        keys = attention.k_proj(normed).view(images, length, heads, attention.head_dim).transpose(1, 2)
        queries = normed[:, :1] if cls_only else normed
        queries = attention.q_proj(queries).view(images, queries.shape[1], heads, attention.head_dim).transpose(1, 2)
        return ((queries @ keys.transpose(-1, -2)) * attention.scale).softmax(dim=-1), keys

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's own projector on tower features [..., d_tower]: the LLM's input tokens [..., d]."""
        return self.model.model.multi_modal_projector(features)
