"""Pre-train the testbed LLaVA from scratch on procedurally generated scenes, then write the committed splits and
checkpoint.

    python -m dyvte.testbed.pretrain --overwrite

Two stages, as a real MLLM is built: `pretrain_vision` teaches the vision tower and projector to describe each
cell in its visual token (a stand-in for a pre-trained CLIP), then the decoder learns the questions on top.
Training data is generated on the fly from its own seed stream, excluding every val/test scene; each image
carries several questions, each trained as the single-turn sample it is evaluated as. The mix adds the dense
`describe` task (every object's size, colour, shape and glyph, top to bottom) to the evaluated families: without
it the model learns the language prior and ignores the image. How the 12-layer model gets off that plateau is
in `TrainingData` and `pretrain`.
"""

import argparse
import json
import random
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers.models.llama.modeling_llama import rotate_half

from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR as DEFAULT_DATA_DIR
from dyvte.testbed.model import ModelConfig, build_model, build_processor, pixel_values
from dyvte.testbed.scenes import (
    AUX_FAMILIES,
    COLOURS,
    DIGITS,
    FAMILIES,
    SHAPES,
    SIZES,
    Scene,
    SceneConfig,
    SplitSizes,
    generate_dataset,
    held_out_hashes,
    load_split,
    make_question,
    render,
    scene_stream,
)


def referent(question: str, scene: Scene) -> tuple[str, int] | None:
    """The word of `question` that names the one object it asks about, and that object's index in `scene`; None
    when the question names no object (count, list, describe) or one that is not there (presence "no").

    The object is the one matching every colour, shape and digit word of the question, and the word is the last of
    them: "what colour is the object above the red circle ?" refers to the red circle through "circle"."""
    words = question.split()
    named = [(i, w) for i, w in enumerate(words) if w in COLOURS or w in SHAPES or w in DIGITS]
    if not named:
        return None
    matches = [
        index
        for index, obj in enumerate(scene)
        if all(w in (obj.colour, obj.shape, obj.glyph) for _, w in named)
    ]
    return (named[-1][1], matches[0]) if len(matches) == 1 else None


def answer_object(question: str, scene: Scene) -> int | None:
    """The index in `scene` of the object whose attribute answers `question`: the referent, or for a relation the
    object above or below it; None when no one object answers (count, list, describe, presence "no")."""
    found = referent(question, scene)
    if found is None:
        return None
    index = found[1]
    if " above " in question:
        return index - 1
    if " below " in question:
        return index + 1
    return index


class Encoder:
    """Turns (image, questions) into training tensors with the exact tokens the chat template produces: the prompt
    carries `<image>` expanded to one token per patch, every answer + `</s>` is a target.

    Several questions about one image are packed behind one shared prefix (the prompt up to its last visual
    token): each question-and-answer segment attends to the prefix and to itself only, and its positions continue
    from the prefix, so every segment is exactly the single-turn sample the model is evaluated on. As a plain
    multi-turn conversation, later questions could copy earlier answers (a `describe` answer names every object)
    and the decoder learned to look things up in text rather than in the visual tokens.
    """

    def __init__(self, processor, scene_config: SceneConfig):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.scene_config = scene_config
        self.image_tokens = scene_config.grid**2
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}
        self.image_start = self.prompt_ids("?").index(self.image_token_id)

    def prompt_ids(self, question: str) -> list[int]:
        """The processor's prompt for one image and `question`."""
        if question not in self._prompts:
            text = chat_prompt(self.processor, question).replace("<image>", "<image>" * self.image_tokens)
            self._prompts[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[answer]

    def packed_ids(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[tuple]]:
        """Token ids of the shared prefix and one segment per (question, answer); each token's segment (-1 for
        the prefix) and position id; the (start, end) span of every answer."""
        first = self.prompt_ids(turns[0][0])
        prefix_length = len(first) - first[::-1].index(self.image_token_id)
        ids, segments, positions = first[:prefix_length], [-1] * prefix_length, list(range(prefix_length))
        spans = []
        for index, (question, answer) in enumerate(turns):
            segment = self.prompt_ids(question)[prefix_length:] + self.answer_ids(answer)
            ids += segment
            segments += [index] * len(segment)
            positions += range(prefix_length, prefix_length + len(segment))
            spans.append((len(ids) - len(self.answer_ids(answer)), len(ids)))
        return ids, segments, positions, spans

    def grounding_pairs(self, turns: list[tuple[str, str]], scene: Scene, at: str = "referent"
                        ) -> list[tuple[int, int]]:
        """(query, key) token positions in the packed row of `turns` about `scene`. `at="referent"`: each
        question's word naming an object (`referent`) and that object's visual token; `at="answer"`: each
        question's last prompt token (where the answer is predicted) and the visual token of the object that
        answers it (`answer_object`)."""
        first = self.prompt_ids(turns[0][0])
        image_start = first.index(self.image_token_id)
        prefix_length = image_start + self.image_tokens
        pairs, segment_start = [], prefix_length
        for question, answer in turns:
            question_ids = self.prompt_ids(question)[prefix_length:]
            if at == "referent":
                found = referent(question, scene)
                index = found[1] if found else None
                query = segment_start + question_ids.index(self.tokenizer.convert_tokens_to_ids(found[0])) if found else 0
            else:
                index = answer_object(question, scene)
                query = segment_start + len(question_ids) - 1
            if index is not None:
                obj = scene[index]
                pairs.append((query, image_start + obj.row * self.scene_config.grid + obj.col))
            segment_start += len(question_ids) + len(self.answer_ids(answer))
        return pairs

    def batch(self, images, conversations, hidden=None) -> dict[str, torch.Tensor]:
        """`conversations[i]` lists (question, answer) pairs about image i; `hidden[i]` lists visual tokens
        (row-major patch indices) that sample i's attention may not see. Rows are right-padded; the attention
        mask is 4-D (batch, 1, query, key) and passed to the model as is. `label_weights` give every answer the
        same total weight, so long `describe` answers do not drown out the one-word ones."""
        rows = [self.packed_ids(turns) for turns in conversations]
        length = max(len(ids) for ids, *_ in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        label_weights = torch.zeros((len(rows), length))
        segments = torch.full((len(rows), length), -2)  # -2: padding
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        visible = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (ids, row_segments, positions, spans) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            segments[i, : len(ids)] = torch.tensor(row_segments)
            position_ids[i, : len(ids)] = torch.tensor(positions)
            visible[i, : len(ids)] = True
            for start, end in spans:
                labels[i, start:end] = input_ids[i, start:end]
                label_weights[i, start:end] = 1.0 / (end - start)
            if hidden is not None and hidden[i]:
                image_start = ids.index(self.image_token_id)
                visible[i, [image_start + cell for cell in hidden[i]]] = False
        same_segment = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == -1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        # The diagonal keeps every row attending somewhere, so padding rows cannot produce NaNs.
        attention_mask = (same_segment & causal & visible[:, None, :]) | torch.eye(length, dtype=torch.bool)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask[:, None],
            "position_ids": position_ids,
            "pixel_values": pixel_values(images, self.scene_config),
            "labels": labels,
            "label_weights": label_weights,
        }


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on answer tokens, averaged per answer, then over all answers of the batch."""
    logits, labels, label_weights = logits[:, :-1], labels[:, 1:], label_weights[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (token_loss * label_weights).sum() / label_weights.sum()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def teacher_forced_accuracy(model, encoder: Encoder, records: list[dict], images_dir: Path, batch_size: int = 64):
    """Per-family exact match of the full model with the answer teacher-forced: the argmax is right at every
    answer position iff greedy generation reproduces the answer."""
    device = next(model.parameters()).device
    model.eval()
    hits = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.open(images_dir / r["image"]).convert("RGB") for r in chunk]
        questions = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in chunk]
        answers = [r["conversations"][1]["value"] for r in chunk]
        batch = to_device(encoder.batch(images, [[(q, a)] for q, a in zip(questions, answers)]), device)
        labels = batch.pop("labels")
        batch.pop("label_weights")
        logits = model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        correct = ((logits.argmax(-1) == target) | (target == -100)).all(1)
        for record, ok in zip(chunk, correct.tolist()):
            hits.setdefault(record["family"], []).append(ok)
    model.train()
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}


# Sampling weights of the question families that differ from 1: the dense grounding task, the families that
# select an object by a conjunction of attributes (the slowest to learn) up, the ones learned first down.
FAMILY_WEIGHTS = "describe=2,presence=2,glyph=2,colour=1.5,count=0.5,list_colours=0.5"


def family_weights(spec: str) -> dict[str, float]:
    """Parse `family=weight,...` over every family (evaluated and auxiliary); unnamed families weigh 1."""
    weights = {family: 1.0 for family in FAMILIES + AUX_FAMILIES}
    for item in filter(None, spec.split(",")):
        family, _, weight = item.partition("=")
        family = family.strip()
        if family not in weights:
            raise ValueError(f"unknown question family {family!r} in {spec!r}; known: {tuple(weights)}")
        weights[family] = float(weight)
    return weights


class TrainingData:
    """Endless training conversations, one fresh scene each, never a val/test scene.

    Each image carries `turns` questions, packed behind the shared image prefix (see `Encoder`): the image
    tokens dominate the sequence, so more questions per image are nearly free supervision.

    A fresh model attends uniformly, so one object among 64 visual tokens is a 1/64 signal and training sits on
    the language-prior plateau. Two curricula remove it: until `hold` (a fraction of training) scenes have a single
    object and the empty cells' visual tokens are hidden from attention, so whatever the model attends to is the
    object; from `hold` to `ramp` objects are added and hiding fades out.
    """

    def __init__(
        self,
        seed: int,
        scene_config: SceneConfig,
        exclude: set[str],
        weights: dict[str, float],
        hold: float,
        ramp: float,
        turns: int = 1,
    ):
        self.scene_config = scene_config
        self.turns = turns
        self.hold, self.ramp = hold, ramp
        self.rng = random.Random(f"{seed}/pretrain/questions")
        self.names, self.probs = list(weights), list(weights.values())
        self.streams = {
            m: scene_stream(seed, f"pretrain/{m}", replace(scene_config, min_objects=1, max_objects=m), exclude)
            for m in range(1, scene_config.max_objects + 1)
        }

    def max_objects(self, progress: float) -> int:
        return 1 + int((self.scene_config.max_objects - 1) * self._fade_in(progress))

    def hide_probability(self, progress: float) -> float:
        return 1.0 - self._fade_in(progress)

    def _fade_in(self, progress: float) -> float:
        return min(1.0, max(0.0, (progress - self.hold) / (self.ramp - self.hold)))

    def sample(self, progress: float) -> tuple:
        """(image, [(question, answer), ...], indices of the visual tokens to hide, the scene)."""
        scene, _ = next(self.streams[self.max_objects(progress)])
        turns = []
        for _ in range(100 * self.turns):  # bounded: some families cannot ask about some scenes (one object)
            if len(turns) == self.turns:
                break
            qa = make_question(self.rng.choices(self.names, self.probs)[0], scene, self.rng)
            if qa is not None:
                turns.append(qa)
        if len(turns) < self.turns:
            raise ValueError(
                f"the families {self.names} cannot ask {self.turns} questions about a scene of {len(scene)} "
                "object(s); add a family every scene can pose (count, list_colours, describe)"
            )
        hidden = []
        if self.rng.random() < self.hide_probability(progress):
            grid = self.scene_config.grid
            occupied = {obj.row * grid + obj.col for obj in scene}
            hidden = [cell for cell in range(grid * grid) if cell not in occupied]
        return render(scene, self.scene_config), turns, hidden, scene


class GroundingLoss:
    """Cross-entropy that teaches one attention head to find the object a question names: the attention of each
    question's referent word (`referent`: "circle" in "what colour is the circle ?") over the visual tokens, at
    decoder layer `layer`, head `head`, against that object's visual token.

    Every wrong look-up answer of the shipped checkpoint is another object's attribute: the decoder reads the
    visual tokens but does not select one by content; this loss supervises that selection directly (the pilots in
    docs/testbed.md: on the CPU budget it did not raise accuracy). The scores are recomputed from the layer's own
    input, projections and rotary embedding for the supervised queries only, so the model's attention stays SDPA.
    """

    def __init__(self, model, layer: int, head: int):
        self.attention = model.model.language_model.layers[layer].self_attn
        self.head = head
        self.inputs = None
        self.attention.register_forward_pre_hook(self._keep_inputs, with_kwargs=True)

    def _keep_inputs(self, module, args, kwargs):
        self.inputs = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])

    def __call__(self, pairs: list[list[tuple[int, int]]], image_start: int, image_tokens: int) -> torch.Tensor:
        """`pairs[i]` lists (query, key) positions of row i from the model call just made; mean cross-entropy."""
        hidden, (cos, sin) = self.inputs
        device = hidden.device
        rows = torch.tensor([i for i, row in enumerate(pairs) for _ in row], device=device)
        if len(rows) == 0:
            return torch.zeros((), device=device)
        queries = torch.tensor([q for row in pairs for q, _ in row], device=device)
        targets = torch.tensor([k for row in pairs for _, k in row], device=device) - image_start
        attention, head_dim = self.attention, self.attention.head_dim
        head = slice(self.head * head_dim, (self.head + 1) * head_dim)

        def rotate(x, positions):
            return x * cos[rows[:, None], positions] + rotate_half(x) * sin[rows[:, None], positions]

        keys = torch.arange(image_start, image_start + image_tokens, device=device).expand(len(rows), -1)
        q = rotate(F.linear(hidden[rows, queries], attention.q_proj.weight[head])[:, None], queries[:, None])
        k = rotate(F.linear(hidden[rows[:, None], keys], attention.k_proj.weight[head]), keys)
        scores = (q * k).sum(-1) * attention.scaling
        self.inputs = None
        return F.cross_entropy(scores, targets)


class TrainingBatches(torch.utils.data.IterableDataset):
    """Stage 2's encoded batches, one per step, with the grounding pairs of each `site` ("referent", "answer").

    In the training process (`workers=0`) one `TrainingData` stream makes every batch. With `workers > 0`, a
    `DataLoader` runs this in worker processes: worker `w` of `n` makes the batches of steps `w, w + n, ...` from
    its own scene and question streams (seed `"{seed}/worker{w}"`), which keeps a GPU fed but draws other data than
    the one-process build.
    """

    def __init__(self, args, scene_config: SceneConfig, exclude: set[str], processor, sites: tuple[str, ...]):
        super().__init__()
        self.args, self.scene_config, self.exclude, self.processor, self.sites = args, scene_config, exclude, \
            processor, sites

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        args = self.args
        data = TrainingData(
            args.seed if workers == 1 else f"{args.seed}/worker{worker}", self.scene_config, self.exclude,
            family_weights(args.family_weights), hold=args.hold, ramp=args.ramp, turns=args.turns,
        )
        encoder = Encoder(self.processor, self.scene_config)
        for step in range(worker, args.steps, workers):
            images, conversations, hidden, scenes = zip(*(data.sample(step / args.steps) for _ in range(args.batch_size)))
            pairs = {site: [encoder.grounding_pairs(turns, scene, site) for turns, scene in zip(conversations, scenes)]
                     for site in self.sites}
            yield encoder.batch(images, conversations, hidden), pairs


def vision_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "vision_tower" in name or "multi_modal_projector" in name]


class CellCodes:
    """What each visual token should say after vision pre-training: the sum of the unit-norm input embeddings of
    its object's words (size, colour, shape, digit or `blank`), or a fixed `empty` code for an empty cell.

    A linear probe read every attribute perfectly, yet the decoder never learned to read shape: a probe is happy
    with an attribute in a low-variance direction, which the decoder's small updates do not find. Equal-norm codes
    make every attribute equally salient, and codes built from the vocabulary's own embeddings put the visual
    tokens in the word-embedding space, as a real MLLM's projector does. Used only in stage 1 (a stand-in for a
    pre-trained CLIP); the decoder learns in stage 2.
    """

    ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "glyph": ("blank",) + tuple(DIGITS)}

    def __init__(self, embeddings: torch.Tensor, tokenizer, seed: int):
        def unit(vectors):
            return vectors / vectors.norm(dim=-1, keepdim=True)

        self.codes = {
            name: unit(embeddings[tokenizer.convert_tokens_to_ids(list(words))].detach().clone())
            for name, words in self.ATTRIBUTES.items()
        }
        generator = torch.Generator().manual_seed(seed)
        self.empty = unit(torch.randn(embeddings.shape[-1], generator=generator))

    @staticmethod
    def indices(scenes, grid: int) -> dict[str, torch.Tensor]:
        """Per-cell index into each attribute's words; -100 for empty cells."""
        indices = {name: torch.full((len(scenes), grid * grid), -100) for name in CellCodes.ATTRIBUTES}
        for i, scene in enumerate(scenes):
            for obj in scene:
                cell = obj.row * grid + obj.col
                values = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "glyph": obj.glyph or "blank"}
                for name, value in values.items():
                    indices[name][i, cell] = CellCodes.ATTRIBUTES[name].index(value)
        return indices

    def targets(self, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        occupied = indices["colour"] != -100
        target = self.empty.expand(*occupied.shape, -1).clone()
        target[occupied] = sum(self.codes[name][index[occupied]] for name, index in indices.items())
        return target

    def accuracy(self, features: torch.Tensor, indices: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per attribute, how often the nearest code (by dot product) is the right one, on occupied cells; and
        how often `empty` is recognised."""
        occupied = indices["colour"] != -100
        scores = {"empty": ((features @ self.empty > 0.5) == ~occupied).float().mean().item()}
        for name, index in indices.items():
            nearest = (features[occupied] @ self.codes[name].T).argmax(-1)
            scores[name] = (nearest == index[occupied]).float().mean().item()
        return scores


def image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected visual tokens the language model receives, [B, N, d]."""
    return torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)


def pretrain_vision(model, tokenizer, scene_config: SceneConfig, scenes, args, progress) -> list[dict]:
    """Stage 1: train the vision tower and projector so every visual token is its cell's `CellCodes` code.

    Trained jointly with the decoder from random init, the vision side collapsed every token onto one large
    common vector and the decoder never left the language-prior plateau. With attributes already in the visual
    tokens, stage 2 only has to teach the decoder to find and relate them. The projector's output layer is then
    rescaled so visual tokens have the norm of text embeddings and do not swamp the residual stream.
    """
    device = next(model.parameters()).device
    codes = CellCodes(model.get_input_embeddings().weight.detach().cpu(), tokenizer, args.seed)
    optimizer = torch.optim.AdamW(vision_parameters(model), lr=args.vision_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / args.vision_steps)
    task = progress.add_task("vision pre-training", total=args.vision_steps, status="")
    log = []
    for step in range(args.vision_steps):
        batch = [next(scenes)[0] for _ in range(args.batch_size)]
        pixels = pixel_values([render(s, scene_config) for s in batch], scene_config).to(device)
        features = image_features(model, pixels)
        indices = CellCodes.indices(batch, scene_config.grid)
        targets = codes.targets(indices).to(device)
        loss = F.mse_loss(features, targets, reduction="sum") / (features.shape[0] * features.shape[1])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.vision_steps:
            accuracy = codes.accuracy(features.detach().cpu(), indices)
            log.append({"step": step + 1, "loss": loss.item(), "cell_accuracy": accuracy})
            progress.console.print(f"vision step {step + 1} loss {loss.item():.3f} " +
                                   " ".join(f"{k}={v:.3f}" for k, v in accuracy.items()))
        progress.update(task, advance=1, status=f"loss {loss.item():.3f}")
    with torch.no_grad():
        pixels = pixel_values([render(next(scenes)[0], scene_config) for _ in range(64)], scene_config).to(device)
        visual_norm = image_features(model, pixels).norm(dim=-1).mean()
        text_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
        output = model.model.multi_modal_projector.linear_2
        output.weight.mul_(text_norm / visual_norm)
        output.bias.mul_(text_norm / visual_norm)
    return log


def ema(average: float | None, value: float) -> float:
    """Running mean of a training loss, for the log."""
    return value if average is None else 0.95 * average + 0.05 * value


def pretrain(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir, out_dir = Path(args.data_dir), Path(args.out)
    scene_config = SceneConfig()
    generate_dataset(data_dir, seed=args.seed, config=scene_config, sizes=SplitSizes(), overwrite=args.overwrite)

    model_config = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
    processor = build_processor(scene_config)
    device = torch.device(args.device)
    model = build_model(processor, model_config, scene_config).to(device)
    model.train()
    encoder = Encoder(processor, scene_config)
    val = load_split(data_dir, "val")

    held_out = held_out_hashes(data_dir)
    family_weights(args.family_weights)  # an unknown family stops the build here, not in a worker
    groundings = {site: (weight, GroundingLoss(model, layer, args.grounding_head))
                  for site, weight, layer in (("referent", args.grounding_weight, args.grounding_layer),
                                              ("answer", args.answer_grounding_weight, args.answer_grounding_layer))
                  if weight}
    batches = TrainingBatches(args, scene_config, held_out, processor, tuple(groundings))
    if args.workers:
        batches = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers, prefetch_factor=4)
    vision = vision_parameters(model)
    vision_ids = {id(p) for p in vision}
    if args.freeze_embeddings:  # the visual codes are sums of these embeddings: keep the two spaces aligned
        model.get_input_embeddings().weight.requires_grad_(False)
    decoder = [p for p in model.parameters() if id(p) not in vision_ids and p.requires_grad]
    groups = [{"params": decoder, "lr": args.lr}, {"params": vision, "lr": args.lr * args.vision_lr_scale}]
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    unfreeze_step = int(args.freeze_vision * args.steps)
    warmup = max(1, args.steps // 20)

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    log = []
    start = time.time()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns) as progress:
        vision_scenes = scene_stream(args.seed, "pretrain/vision", scene_config, held_out)
        vision_log = pretrain_vision(model, processor.tokenizer, scene_config, vision_scenes, args, progress)
        # Stage 2: the decoder learns the questions on top of the pre-trained vision side, which stays frozen
        # for the first `freeze_vision` of the steps and is then fine-tuned at a lower learning rate.
        for p in vision:
            p.requires_grad_(unfreeze_step == 0)
        task = progress.add_task("pre-training", total=args.steps, status="")
        running = grounding_running = None
        for step, (batch, pairs) in enumerate(batches):
            if step == unfreeze_step:
                for p in vision:
                    p.requires_grad_(True)
            batch = to_device(batch, device)
            labels, label_weights = batch.pop("labels"), batch.pop("label_weights")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = answer_loss(model(**batch).logits.float(), labels, label_weights)
                for site, (weight, grounding) in groundings.items():
                    grounding_loss = grounding(pairs[site], encoder.image_start, encoder.image_tokens)
                    grounding_running = ema(grounding_running, grounding_loss.item())
                    loss = loss + weight * grounding_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running = ema(running, loss.item())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                accuracy = teacher_forced_accuracy(model, encoder, val, data_dir / "images")
                mean = sum(accuracy.values()) / len(accuracy)
                log.append({"step": step + 1, "loss": running, "grounding_loss": grounding_running,
                            "minutes": (time.time() - start) / 60, "val_accuracy": accuracy})
                grounded = "" if grounding_running is None else f"grounding {grounding_running:.3f} "
                progress.console.print(f"step {step + 1} loss {running:.3f} {grounded}val {mean:.3f} " +
                                       " ".join(f"{k}={v:.2f}" for k, v in accuracy.items()))
            progress.update(task, advance=1, status=f"loss {running:.3f}")

    wall = time.time() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    summary = {"args": vars(args), "model_config": asdict(model_config), "device": where, "wall_seconds": wall,
               "vision_log": vision_log, "log": log}
    (out_dir / "training_log.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="where the splits and images go")
    parser.add_argument("--out", default=str(DEFAULT_DATA_DIR / "model"), help="checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace splits generated with another seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="2e-3 leaves 12 layers on the plateau")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--turns", type=int, default=6, help="questions per training image (packed)")
    parser.add_argument("--family-weights", default=FAMILY_WEIGHTS, help="sampling weights, family=weight,...")
    parser.add_argument("--hold", type=float, default=0.1, help="fraction of training on lone objects")
    parser.add_argument("--ramp", type=float, default=0.3, help="fraction of training to reach the full scenes")
    parser.add_argument("--freeze-vision", type=float, default=0.5, help="frozen-vision fraction")
    parser.add_argument("--vision-lr-scale", type=float, default=0.3, help="learning-rate factor of the vision side")
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage 1: vision-side pre-training steps")
    parser.add_argument("--vision-lr", type=float, default=2e-3, help="stage 1 learning rate")
    parser.add_argument("--freeze-embeddings", action="store_true", help="keep the (tied) word embeddings fixed")
    parser.add_argument("--grounding-weight", type=float, default=0.0, help="weight of `GroundingLoss` (0: off)")
    parser.add_argument("--grounding-layer", type=int, default=2, help="decoder layer whose attention is grounded")
    parser.add_argument("--grounding-head", type=int, default=0, help="attention head that is grounded")
    parser.add_argument("--answer-grounding-weight", type=float, default=0.0,
                        help="weight of `GroundingLoss` from each question's answer position (0: off)")
    parser.add_argument("--answer-grounding-layer", type=int, default=4, help="its decoder layer")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU build: see docs/testbed.md)")
    parser.add_argument("--workers", type=int, default=0, help="data worker processes (0: the training process)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (GPU)")
    for f in fields(ModelConfig):
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    return parser.parse_args(argv)


if __name__ == "__main__":
    pretrain(parse_args())
