"""What every family adapter provides to the withdrawal engine."""

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

WITHDRAW_CHOICES = ("both", "images", "videos")
TEXT_SPANS = ("after_first_visual", "all_text")


@dataclass
class EmbeddedInputs:
    """Language-model inputs after the vision tower: `inputs_embeds` [B, T, d] and which positions withdraw.

    `visual_mask` marks the visual tokens that exit (all of them with `withdraw="both"`); visual tokens of a modality
    the adapter keeps are treated like text by the engine.
    """

    inputs_embeds: torch.Tensor
    visual_mask: torch.Tensor


class FamilyAdapter:
    """Access to the stock decoder of one MLLM family; subclasses implement `embed`.

    The defaults fit decoders laid out as transformers v5 Llama-style text models
    (`model.model.language_model.{embed_tokens, layers, norm, rotary_emb}` and `model.lm_head`) with 1-D positions.

    `withdraw` chooses which visual tokens exit: `"both"` (images and videos), `"images"` or `"videos"`; tokens of
    the other modality stay in every layer like text (and a warning says so when such tokens are in the input).
    """

    #: whether the family marks video tokens apart from image tokens (else `withdraw` must be "both")
    separate_video_tokens = True

    def __init__(self, model: nn.Module, withdraw: str = "both"):
        if withdraw not in WITHDRAW_CHOICES:
            raise ValueError(f"withdraw must be one of {', '.join(WITHDRAW_CHOICES)}; got {withdraw!r}.")
        if withdraw != "both" and not self.separate_video_tokens:
            raise ValueError(
                f"{model.config.model_type} feeds video frames through its image tokens, so images and videos cannot "
                f"be withdrawn separately: use withdraw='both' (got {withdraw!r})."
            )
        self.model = model
        self.withdraw = withdraw
        self.language_model = model.model.language_model
        self.text_config = model.config.get_text_config(decoder=True)
        if "sliding_attention" in (getattr(self.text_config, "layer_types", None) or []):
            raise ValueError(
                f"{model.config.model_type}: this checkpoint uses sliding-window attention in some layers, which the "
                "engine's masks do not reproduce; only full-attention decoders are supported."
            )
        # the keyword a decoder layer takes its KV cache by: `cache` from transformers 5.24, `past_key_values` before
        layer_parameters = inspect.signature(self.layers[0].forward).parameters
        self.layer_cache_kwarg = "cache" if "cache" in layer_parameters else "past_key_values"

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def norm(self) -> nn.Module:
        return self.language_model.norm

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def attn_implementation(self) -> str:
        return self.text_config._attn_implementation or "eager"

    # --- which tokens are visual -------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int | None:
        return getattr(self.model.config, "image_token_id", None)

    @property
    def video_token_id(self) -> int | None:
        """`None` for families without video placeholders (or whose videos use the image token)."""
        if not self.separate_video_tokens:
            return None
        return getattr(self.model.config, "video_token_id", None)

    def _token_mask(self, input_ids: torch.Tensor, token_id: int | None) -> torch.Tensor:
        if token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token_id

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Every visual placeholder token (images and videos), whatever `withdraw` says."""
        return self._token_mask(input_ids, self.image_token_id) | self._token_mask(input_ids, self.video_token_id)

    def withdrawn_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The visual tokens that exit under `self.withdraw`; warns when tokens of a kept modality are present."""
        images = self._token_mask(input_ids, self.image_token_id)
        videos = self._token_mask(input_ids, self.video_token_id)
        if self.withdraw == "both":
            return images | videos
        kept, name = (videos, "video") if self.withdraw == "images" else (images, "image")
        if kept.any():
            samples = kept.any(dim=1).nonzero().squeeze(1).tolist()
            warnings.warn(
                f"withdraw={self.withdraw!r}: the {name} tokens of sample(s) {samples} are kept in every layer "
                f"(they do not exit); use withdraw='both' to withdraw them too.",
                stacklevel=3,
            )
        return images if self.withdraw == "images" else videos

    def text_mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        span: str = "after_first_visual",
    ) -> torch.Tensor:
        """[B, T] bool: the real text tokens of each sample, from the token ids alone (no prompt-layout assumption).

        `span="all_text"`: every non-padding token that is not a visual placeholder. `span="after_first_visual"`:
        those after the sample's first visual token; a sample without visual tokens has no "after" and gets all its
        text (as the label pass's head features do). Markers around the visual tokens (e.g. `<|vision_start|>`,
        `<img>`) are text: they stay in the sequence after exit. `visual_mask` defaults to every image/video
        placeholder (`visual_token_mask`); pass the engine's `visual_mask` to count only the withdrawn ones.
        """
        if span not in TEXT_SPANS:
            raise ValueError(f"span must be one of {', '.join(TEXT_SPANS)}; got {span!r}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if visual_mask is None:
            visual_mask = self.visual_token_mask(input_ids)
        text = attention_mask.bool() & ~visual_mask
        if span == "all_text":
            return text
        after = visual_mask.long().cumsum(dim=1) > 0
        return torch.where(visual_mask.any(dim=1, keepdim=True), text & after, text)

    # --- embeddings and positions ------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary `(cos, sin)` of shape [B, T, head_dim], computed once for the full sequence and gathered later.

        `position_ids` is whatever `prefill_position_ids` / `next_position_ids` return (the sequence is the last dim).
        """
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def prefill_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **vision_inputs
    ) -> torch.Tensor:
        """Positions the stock forward uses when none are given: 0..T-1 for every sample."""
        batch, length = input_ids.shape
        return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)

    def generation_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision_inputs
    ) -> torch.Tensor:
        """Positions as `model.generate` forms them (real tokens counted, padding skipped), for a prompt possibly
        followed by teacher-forced answer tokens (what a label pass over prompt + answer needs)."""
        return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)

    def next_position_ids(self, position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position of the first generated token of each sample: one past its last real prompt token."""
        return position_ids.masked_fill(attention_mask == 0, -1).amax(dim=-1) + 1

    def embed(self, input_ids: torch.Tensor, **vision_inputs) -> EmbeddedInputs:
        raise NotImplementedError

    # --- helpers for subclasses --------------------------------------------------------------------------------
    def check_placeholders(self, input_ids: torch.Tensor, modality: str, token_id: int | None, has_features: bool):
        """Placeholders without pixels, or pixels without placeholders, fail naming the samples."""
        if token_id is None:
            return
        mask = input_ids == token_id
        if not has_features and mask.any():
            samples = mask.any(dim=1).nonzero().squeeze(1).tolist()
            pixels = "pixel_values" if modality == "image" else "pixel_values_videos"
            raise ValueError(
                f"sample(s) {samples} contain {modality} tokens (id {token_id}) but no {pixels} were given."
            )
        if has_features and not mask.any():
            raise ValueError(
                f"{modality} pixels were given but no sample contains the {modality} token (id {token_id}); build the "
                f"prompt with the processor so it inserts the {modality} tokens."
            )

    def scatter_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, modality: str, items: list[torch.Tensor],
        item: str | None = None,
    ) -> torch.Tensor:
        """`inputs_embeds` with the vision features of `items` (one [n_i, d] tensor per image, video or tile, in
        prompt order) in the positions of the `modality` ("image" or "video") placeholder token.

        The counts are checked first, naming the sample whose placeholders do not match its features; the
        positions come from the model's own `get_placeholder_mask`."""
        token_id = self.image_token_id if modality == "image" else self.video_token_id
        runs = image_token_runs(input_ids == token_id)
        check_feature_counts(runs, [f.shape[0] for f in items], item or modality, modality)
        features = torch.cat(list(items), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        masks = self.model.model.get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, **{f"{modality}_features": features}
        )
        if isinstance(masks, tuple):  # families with videos return (image mask, video mask)
            masks = masks[0 if modality == "image" else 1]
        return inputs_embeds.masked_scatter(masks, features)

    # --- what policies read from a decoder layer (recomputed from its own modules, so it keeps running with SDPA) --
    def layer_keys(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[b, n, kv_heads, head_dim] keys that decoder layer `layer` computes from its input `hidden` [b, n, d],
        before rotary (its own `input_layernorm` and `k_proj`)."""
        attention = layer.self_attn
        keys = attention.k_proj(layer.input_layernorm(hidden))
        return keys.view(*hidden.shape[:2], -1, attention.head_dim)

    def rotate(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries or keys [b, heads, n, head_dim] with the decoder's rotary applied at the slots' `cos`, `sin`
        [b, n, head_dim] (a sub-batch's, gathered from the whole prompt's positions)."""
        rotated, _ = apply_rotary_pos_emb(states, states, cos, sin)
        return rotated

    def last_query_attention(self, layer: nn.Module, sub, keys: torch.Tensor | None = None) -> torch.Tensor:
        """[b, n] attention of each row's last token over its slots in `layer`, averaged over heads (FastV's score)."""
        last = torch.zeros_like(sub.valid)
        last[:, -1] = True  # sub-batches are packed to the right: the last slot is the last real token
        return self.query_attention(layer, sub, last, keys)

    def query_attention(
        self, layer: nn.Module, sub, queries: torch.Tensor, keys: torch.Tensor | None = None, per_head: bool = False,
        projected_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[b, n] attention each slot receives in `layer` from the `queries` slots ([b, n] bool), averaged over
        heads and over each row's queries (0 for a row without queries); [b, heads, n] with `per_head`.

        Recomputed from the layer's own projections and rotary for those queries only, so the model keeps running
        with SDPA, which returns no attention weights. `keys` ([b, n] bool, default every real slot) limits the
        keys, as when the layer itself runs on fewer tokens than `sub` holds; attention is causal over slots.
        `projected_keys` ([b, n, kv_heads * head_dim]): the output of the layer's `k_proj` on `sub`, when the
        caller has it, so the keys are not projected again (see `query_probabilities`).
        """
        probabilities, _, used = self.query_probabilities(layer, sub, queries, keys, projected_keys)
        counts = used.sum(dim=1)
        per_head_mean = probabilities.sum(dim=2) / counts.clamp(min=1)[:, None, None].to(probabilities.dtype)
        return per_head_mean if per_head else per_head_mean.mean(dim=1)

    def query_probabilities(
        self, layer: nn.Module, sub, queries: torch.Tensor, keys: torch.Tensor | None = None,
        projected_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each query's attention in `layer`, per head: `(probabilities [b, heads, w, n], slot [b, w], used [b, w])`.

        Query `j` of a row is its `j`-th slot marked in `queries` ([b, n] bool), at slot `slot[:, j]`; `w` is the
        most queries of a row, and the filler queries of rows with fewer (`used` False) have all-zero rows. Each
        used row of `probabilities` sums to 1 over the allowed keys (`keys`, default every real slot, causal over
        slots). Recomputed from the layer's input `sub.hidden` with its own `input_layernorm`, `q_proj`, `k_proj`
        and rotary, as the layer's attention computes them (see `check_query_attention`); with `projected_keys`
        (the layer's own `k_proj` output on `sub`, [b, n, kv_heads * head_dim]) only the queries are projected.
        """
        attention = layer.self_attn
        keys = sub.valid if keys is None else keys & sub.valid
        batch, length, _ = sub.hidden.shape
        head_dim = attention.head_dim
        counts = queries.sum(dim=1)
        width = max(int(counts.max()), 1) if counts.numel() else 1
        # each row's query slots in order, then filler slots (masked out below) up to `width`
        slot = torch.sort((~queries).to(torch.int8), dim=1, stable=True).indices[:, :width]
        used = torch.arange(width, device=slot.device)[None] < counts[:, None]
        row = torch.arange(batch, device=slot.device)[:, None]
        query = attention.q_proj(layer.input_layernorm(sub.hidden[row, slot]))
        query = self.rotate(query.view(batch, width, -1, head_dim).transpose(1, 2), sub.cos[row, slot],
                            sub.sin[row, slot])
        if projected_keys is None:
            key = self.layer_keys(layer, sub.hidden)
        else:
            key = projected_keys.view(batch, length, -1, head_dim)
        key = self.rotate(key.transpose(1, 2), sub.cos, sub.sin)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = (query @ key.transpose(-1, -2)) * attention.scaling  # [b, heads, width, n]
        allowed = keys[:, None, :] & (torch.arange(length, device=slot.device)[None, None, :] <= slot[:, :, None])
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        probabilities = scores.softmax(dim=-1) * used[:, None, :, None]  # [b, heads, width, n]
        return probabilities, slot, used

    # --- what the methods that select before the LLM read from the vision tower ---------------------------------
    def patch_grid(self, method: str) -> tuple[int, bool]:
        """(side of one image's square grid of patch tokens, whether the vision tower has a CLS token), for a method
        that reads each image's visual tokens as the tower's patches, one to one (`method` names it in errors).
        Families whose visual tokens are not that (tiled, pooled or merged patches, newline tokens) refuse."""
        raise ValueError(no_patch_grid(method, self.model.config.model_type))

    def tower_features(self, method: str, owner: object):
        """The vision tower's feature layer as `method` reads it while `owner` lives (`TowerFeatures` of the
        families with one patch grid per image); the others refuse, as `patch_grid`."""
        raise ValueError(no_patch_grid(method, self.model.config.model_type))

    def check_query_attention(self, method: str) -> None:
        """Refuse, naming `method` and the reason, a decoder whose attention weights `query_probabilities` cannot
        recompute: it applies `input_layernorm`, `q_proj`, `k_proj`, rotary and `scaling` only, so a layer that
        also normalises queries or keys (`q_norm` / `k_norm`) or caps its logits computes other weights."""
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
            extra = [name for name in ("q_norm", "k_norm") if getattr(attention, name, None) is not None]
            if getattr(self.text_config, "attn_logit_softcapping", None):
                extra.append("attn_logit_softcapping")
            if missing or extra:
                found = (f"has no {', '.join(missing)}" if missing else f"also applies {', '.join(extra)}")
                raise ValueError(
                    f"{method} needs the decoder's attention weights, which dyvte recomputes from each layer's "
                    f"input_layernorm, q_proj, k_proj and rotary (adapter.query_attention, so SDPA stays on); "
                    f"{self.model.config.model_type}'s layer {index} attention ({type(attention).__name__}) {found}, "
                    f"so the recomputed weights would not be the model's and {method} cannot run on this model."
                )


def no_patch_grid(method: str, model_type: str) -> str:
    """Why `method`, which reads each image's visual tokens as the tower's patch grid, cannot run on `model_type`."""
    return (
        f"{method} needs each image's visual tokens to be the vision tower's patches, one square grid per image "
        f"(LLaVA-1.5, model_type 'llava'); {model_type!r} tiles, pools or merges patches or adds newline tokens "
        "before the LLM, which this method does not support."
    )


def image_token_runs(placeholders: torch.Tensor) -> list[tuple[int, int]]:
    """`(sample, length)` of every contiguous run of placeholder tokens [B, T], in batch order (one per image)."""
    runs = []
    for sample, row in enumerate(placeholders):
        positions = row.nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        breaks = ((positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
        runs.extend((sample, len(run)) for run in torch.tensor_split(positions, breaks))
    return runs


def check_feature_counts(runs: list[tuple[int, int]], feature_counts: list[int], item: str = "image",
                         modality: str = "image") -> None:
    """Name the sample whose `modality` placeholder tokens do not match the vision tower's features, before
    `masked_scatter` fails. `runs` come from `image_token_runs`; `feature_counts` holds one count per `item`
    (image, video or tile)."""
    if len(runs) == len(feature_counts):
        for index, ((sample, n_tokens), n_features) in enumerate(zip(runs, feature_counts)):
            if n_tokens != n_features:
                raise ValueError(
                    f"sample {sample}: {item} {index} has {n_tokens} {modality} tokens in the prompt but {n_features} "
                    f"features from the vision tower (prompt built for another image size or processor?)."
                )
        return
    n_tokens, n_features = sum(n for _, n in runs), sum(feature_counts)
    if n_tokens != n_features:  # adjacent images share one run, so only the totals can be compared then
        per_sample: dict[int, int] = {}
        for sample, n in runs:
            per_sample[sample] = per_sample.get(sample, 0) + n
        raise ValueError(
            f"{modality} tokens per sample {per_sample} (total {n_tokens}) do not match the {len(feature_counts)} "
            f"{item}(s) given, which have {n_features} features in total."
        )
