"""Weak exit labels and head features from one teacher-forced pass over a frozen MLLM.

Exit at layer `k` is positive when greedy generation with exit at `k` reproduces the reference answer `A` and the
answer's mean cross-entropy with exit stays below `alpha` times the one without (DyVTE, Eq. 6). Greedy decoding
reproduces `A` exactly when, teacher-forced on `A`, the argmax at every answer position is `A`'s next token, so one
pass over prompt + `A` replaces one generation per layer.

When `A` is the model's own greedy answer (`match_full_model=True`), an exit is compared with the full model's
teacher-forced argmax instead of `A`'s tokens. In fp32 the two are the same tokens. In bf16 they can differ by
rounding: the full-sequence pass and token-by-token decoding multiply matrices of other shapes, and a full model
whose runner-up logit is within one or two bf16 steps of its maximum can predict another token teacher-forced
than it generated (measured at LLaVA-1.5-7B width: 4 of 24 positions, `benchmarks/llava7b.py --steps margins`).
Compared with `A`, even the full model would then fail to reproduce itself and every exit would be negative.

The pass is *dense*: the full sequence runs through the layers once, and at every candidate layer `k` its text
tokens branch off into a text-only continuation through layers `k..L-1`. All live branches of a layer run as one
batched call. Head features come from the full sequence's prompt tokens at each layer's output; causal attention
keeps the answer from leaking into them.
"""

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters.base import TEXT_SPANS
from ..engine import SubBatch, VisualExit, feature_tokens
from ..engine.features import FEATURE_GROUPS, HeadFeatures


@dataclass
class LabelConfig:
    alpha: float = 1.03
    reference: str = "model"  # "model": the frozen model's own greedy answer; "ground_truth": the dataset answer
    layers: str | list[int] = "all"  # "all", "random" (one per sample, as in the paper) or a list of exit layers
    max_new_tokens: int = 16
    feature_span: str = "after_first_visual"  # or "all_text"
    seed: int = 0
    feature_groups: tuple[str, ...] = ("text",)  # which head features are stored (`FEATURE_GROUPS`)

    def __post_init__(self):
        if self.reference not in ("model", "ground_truth"):
            raise ValueError(f"labels.reference must be 'model' or 'ground_truth', got {self.reference!r}.")
        if self.feature_span not in TEXT_SPANS:
            raise ValueError(f"features.span must be one of {TEXT_SPANS}, got {self.feature_span!r}.")
        self.feature_groups = tuple(self.feature_groups)
        if "text" not in self.feature_groups or set(self.feature_groups) - set(FEATURE_GROUPS):
            raise ValueError(f"features.groups must hold text and only {FEATURE_GROUPS}, got {self.feature_groups}.")
        if not self.alpha > 0:
            raise ValueError(f"labels.alpha must be positive, got {self.alpha}.")


def candidate_exits(config: LabelConfig, sample_ids: list[str], num_layers: int) -> torch.Tensor:
    """[B, L+1] bool: which exit layers to label per sample. Exit `L` (the full model) is always computed."""
    candidates = torch.zeros(len(sample_ids), num_layers + 1, dtype=torch.bool)
    candidates[:, num_layers] = True
    if config.layers == "all":
        candidates[:] = True
    elif config.layers == "random":
        for row, sample_id in enumerate(sample_ids):  # seeded per sample: the same layer on every rerun
            candidates[row, random.Random(f"{config.seed}:{sample_id}").randint(1, num_layers - 1)] = True
    else:
        layers = list(config.layers)
        bad = [k for k in layers if not 0 <= k <= num_layers]
        if bad:
            raise ValueError(f"labels.layers {bad} outside [0, {num_layers}].")
        candidates[:, layers] = True
    return candidates


def answer_tokens(tokenizer, prompts: list[str], completions: list[str], eos_token_id: int) -> list[list[int]]:
    """Dataset answers as the tokens the model generates for them after its prompt, ending with `eos_token_id`.

    `prompts[i]` is the generation prompt and `completions[i]` the same conversation continued by the answer as the
    chat template writes an assistant turn (`prompts.chat_completion`: `"... ASSISTANT: Yes"` for llava-hf,
    `"...<|im_start|>assistant\nYes"` for Qwen). The answer's tokens are the completion's tokens after the
    prompt's: a model trained on whole conversations generates the tokens that the whole text encodes to. Encoding
    the answer alone (`tokenizer("Yes", add_special_tokens=False)`) is not the same rule: it agrees for the
    llava-hf and Qwen templates, but not where the template's separator and the answer meet inside one token, nor
    for a tokenizer that adds a prefix space to every encoded text where the template has none. BOS or other
    special tokens the tokenizer adds appear in both encodings and cancel; the turn ends with the EOS generation
    stops at (`generation_eos_ids(model)[0]`), not with the template's end-of-turn text.
    """
    tokens = []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids, completion_ids = tokenizer(prompt)["input_ids"], tokenizer(completion)["input_ids"]
        if not completion.startswith(prompt) or completion_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the chat template's generation prompt is not where its assistant turn starts, in text or tokens "
                f"(prompt ends {prompt[-40:]!r}, the turn with the answer reads {completion[len(prompt) - 40 :]!r}), "
                "so the tokens the model would generate for a ground-truth answer are not defined; use "
                "labels.reference=model, or a chat template whose generation prompt ends where answers start."
            )
        tokens.append(completion_ids[len(prompt_ids) :] + [eos_token_id])
    return tokens


@dataclass
class DenseLabels:
    """Per sample and exit layer `k = 0..L` (unlabelled entries: match False, ce NaN)."""

    match: torch.Tensor  # [B, L+1] greedy with exit at k reproduces the answer (or the full model's predictions)
    ce: torch.Tensor  # [B, L+1] mean cross-entropy of the answer with exit at k
    features: torch.Tensor  # [B, L, 2d] `text` head features after each layer
    candidates: torch.Tensor  # [B, L+1]
    n_text: torch.Tensor  # [B] real prompt tokens that are not visual
    n_visual: torch.Tensor  # [B]
    group_features: dict[str, torch.Tensor]  # the other feature groups asked for, [B, L, width] each
    reproduces: torch.Tensor  # [B] the full model, teacher-forced, predicts the answer at every position

    def labels(self, alpha: float) -> torch.Tensor:
        """[B, L+1] int8: 1 exit is safe, 0 not, -1 not labelled."""
        positive = self.match & (self.ce < alpha * self.ce[:, -1:])
        return torch.where(self.candidates, positive.to(torch.int8), torch.full_like(positive, -1, dtype=torch.int8))


@torch.no_grad()
def dense_labels(
    engine: VisualExit, inputs: dict, answers: list[list[int]], candidates: torch.Tensor, feature_span: str,
    pad_token_id: int, feature_groups: tuple[str, ...] = ("text",), match_full_model: bool = False,
) -> DenseLabels:
    """One teacher-forced pass over prompt + answer with a text-only branch at every candidate exit layer; head
    features of `feature_groups` (see `dyvte.engine.features`) from the full sequence after every layer.

    `match[:, k]`: with `match_full_model=False`, the argmax with exit at `k` is `answers`' next token at every
    answer position; with `match_full_model=True` (the answers are the model's own greedy ones), it is the full
    model's teacher-forced argmax at every position, so `match[:, L]` is True (module docstring)."""
    prompt_ids, prompt_mask = inputs["input_ids"], inputs["attention_mask"]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch, prompt_length = prompt_ids.shape
    device = prompt_ids.device
    answer_length = max(len(a) for a in answers)
    answer_ids = torch.full((batch, answer_length), pad_token_id, dtype=torch.long, device=device)
    answer_mask = torch.zeros_like(answer_ids)
    for row, answer in enumerate(answers):
        answer_ids[row, : len(answer)] = torch.tensor(answer, device=device)
        answer_mask[row, : len(answer)] = 1
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    n_answer = answer_mask.sum(dim=1)
    candidates = candidates.to(device)

    positions = engine.adapter.generation_position_ids(prompt_ids, prompt_mask, **vision)
    full, visual_mask = engine.embed_batch(prompt_ids, prompt_mask, positions, answer_ids, answer_mask, **vision)
    tokens = feature_tokens(
        engine.adapter.text_mask(prompt_ids, prompt_mask, visual_mask[:, :prompt_length], feature_span)
    )
    head_features = HeadFeatures(engine.adapter, feature_groups, tokens, visual_mask, prompt_length)
    num_layers = engine.num_layers
    features = {group: [] for group in feature_groups}
    branches: SubBatch | None = None
    branch_exit = torch.zeros(0, dtype=torch.long, device=device)
    for layer_idx, layer in enumerate(engine.adapter.layers):
        starting = candidates[full.rows, layer_idx]
        if starting.any():
            new = full.compact(starting, ~full.slots_of(visual_mask))
            branches = new if branches is None else SubBatch.concat([branches, new])
            branch_exit = torch.cat([branch_exit, torch.full((len(new),), layer_idx, device=device)])
        head_features.observe(layer, full)
        engine.run_layer(layer, full)
        if branches is not None:
            engine.run_layer(layer, branches)
        for group, values in head_features.after_layer(full).items():  # `full` keeps every row, in batch order
            features[group].append(values)

    match = torch.zeros(batch, num_layers + 1, dtype=torch.bool, device=device)
    ce = torch.full((batch, num_layers + 1), float("nan"), device=device)
    targets = ids[:, 1:]  # [B, T-1]: the token each position is compared with
    for sub, exits in ((full, torch.full((batch,), num_layers, device=device)), (branches, branch_exit)):
        if sub is None:
            continue
        sub_match, sub_ce, predicted = _answer_scores(engine, sub, ids, targets, prompt_length, n_answer)
        match[sub.rows, exits] = sub_match
        ce[sub.rows, exits] = sub_ce
        if sub is full:
            reproduces = sub_match  # the full model's teacher-forced argmax is the answer at every position
            if match_full_model:
                targets = predicted
                match[:, num_layers] = True
    n_visual = (visual_mask[:, :prompt_length] & prompt_mask.bool()).sum(dim=1)
    stacked = {group: torch.stack(values, dim=1).half().cpu() for group, values in features.items()}
    return DenseLabels(
        match.cpu(), ce.cpu(), stacked.pop("text"), candidates.cpu(), (prompt_mask.sum(dim=1) - n_visual).cpu(),
        n_visual.cpu(), stacked, reproduces.cpu(),
    )


def _answer_scores(engine: VisualExit, sub: SubBatch, ids, targets, prompt_length: int, n_answer):
    """Per row of `sub`: does the argmax equal `targets` [B, T-1] (the token after each position) at every answer
    position, and the mean CE of the answer `ids`; also the argmax as `targets` holds it (others unchanged)."""
    start = prompt_length - 1  # the last prompt token predicts the first answer token
    offset = sub.index - start
    predicting = sub.valid & (offset >= 0) & (offset < n_answer[sub.rows][:, None])
    row, slot = predicting.nonzero(as_tuple=True)
    logits = engine.adapter.lm_head(engine.adapter.norm(sub.hidden[row, slot])).float()
    sample, position = sub.rows[row], sub.index[row, slot]
    token_ce = F.cross_entropy(logits, ids[sample, position + 1], reduction="none")
    argmax = logits.argmax(dim=-1)
    wrong = (argmax != targets[sample, position]).float()
    count = torch.zeros(len(sub), device=logits.device).index_add_(0, row, torch.ones_like(token_ce))
    ce = torch.zeros(len(sub), device=logits.device).index_add_(0, row, token_ce) / count
    errors = torch.zeros(len(sub), device=logits.device).index_add_(0, row, wrong)
    predicted = targets.clone()
    predicted[sample, position] = argmax
    return errors == 0, ce, predicted
