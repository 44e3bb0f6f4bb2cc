"""Pre-train the testbed LLaVA from scratch on procedurally generated scenes, then write the committed splits and
checkpoint.

    python -m dyvte.testbed.pretrain --overwrite

Training data is generated on the fly from its own seed stream, excluding every val/test scene. The mix adds
the dense `describe` task (every object's size, colour, shape and glyph, top to bottom) to the evaluated
families: without it the model learns the language prior and ignores the image. How the 12-layer model gets off
that plateau at all is in `TrainingData` and `pretrain` (curricula, frozen vision side, learning rate).
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

from dyvte.testbed.model import ModelConfig, build_model, build_processor, pixel_values, prompt_text
from dyvte.testbed.scenes import (
    AUX_FAMILIES,
    FAMILIES,
    SceneConfig,
    SplitSizes,
    generate_dataset,
    held_out_hashes,
    load_split,
    make_question,
    render,
    scene_stream,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "testbed"


class Encoder:
    """Turns (image, question, answer) into training tensors with the exact prompt the processor produces:
    the chat template's text, `<image>` expanded to one token per patch, answer + `</s>` as the only targets."""

    def __init__(self, processor, scene_config: SceneConfig):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.scene_config = scene_config
        self.image_tokens = scene_config.grid**2
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            text = prompt_text(self.processor, question).replace("<image>", "<image>" * self.image_tokens)
            self._prompts[question] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            self._answers[answer] = ids + [self.tokenizer.eos_token_id]
        return self._answers[answer]

    def batch(self, images, questions, answers, hidden=None) -> dict[str, torch.Tensor]:
        """`hidden[i]` lists visual tokens (row-major patch indices) that sample i's attention may not see."""
        rows = [(self.prompt_ids(q), self.answer_ids(a)) for q, a in zip(questions, answers)]
        length = max(len(p) + len(a) for p, a in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), -100)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (prompt, answer) in enumerate(rows):
            n = len(prompt) + len(answer)
            input_ids[i, :n] = torch.tensor(prompt + answer)
            labels[i, len(prompt) : n] = torch.tensor(answer)
            attention_mask[i, :n] = 1
            if hidden is not None and hidden[i]:
                image_start = prompt.index(self.image_token_id)
                attention_mask[i, [image_start + cell for cell in hidden[i]]] = 0
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values(images, self.scene_config),
            "labels": labels,
        }


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on answer tokens, averaged per sample first so long `describe` answers do not drown out
    the one-word families."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = labels != -100
    return ((token_loss * mask).sum(1) / mask.sum(1)).mean()


@torch.no_grad()
def teacher_forced_accuracy(model, encoder: Encoder, records: list[dict], images_dir: Path, batch_size: int = 64):
    """Per-family exact match of the full model with the answer teacher-forced: the argmax is right at every
    answer position iff greedy generation reproduces the answer."""
    model.eval()
    hits = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.open(images_dir / r["image"]).convert("RGB") for r in chunk]
        questions = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in chunk]
        answers = [r["conversations"][1]["value"] for r in chunk]
        batch = encoder.batch(images, questions, answers)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        correct = ((logits.argmax(-1) == target) | (target == -100)).all(1)
        for record, ok in zip(chunk, correct.tolist()):
            hits.setdefault(record["family"], []).append(ok)
    model.train()
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}


def family_weights(describe_weight: float) -> dict[str, float]:
    weights = {family: 1.0 for family in FAMILIES}
    weights.update({family: describe_weight for family in AUX_FAMILIES})
    return weights


class TrainingData:
    """Endless training samples, one fresh scene each, never a val/test scene.

    A fresh model attends uniformly, so one object among 64 visual tokens is a 1/64 signal and training sits on
    the language-prior plateau. Two curricula remove it: until `hold` (a fraction of training) scenes have a single
    object and the empty cells' visual tokens are hidden from attention, so whatever the model attends to is the
    object; from `hold` to `ramp` objects are added and hiding fades out.
    """

    def __init__(
        self, seed: int, scene_config: SceneConfig, exclude: set[str], weights: dict[str, float], hold: float, ramp: float
    ):
        self.scene_config = scene_config
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
        """(image, question, answer, indices of the visual tokens to hide)."""
        stream = self.streams[self.max_objects(progress)]
        while True:
            scene, _ = next(stream)
            qa = make_question(self.rng.choices(self.names, self.probs)[0], scene, self.rng)
            if qa is not None:
                break
        hidden = []
        if self.rng.random() < self.hide_probability(progress):
            grid = self.scene_config.grid
            occupied = {obj.row * grid + obj.col for obj in scene}
            hidden = [cell for cell in range(grid * grid) if cell not in occupied]
        return render(scene, self.scene_config), qa[0], qa[1], hidden


def vision_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "vision_tower" in name or "multi_modal_projector" in name]


def pretrain(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data_dir, out_dir = Path(args.data_dir), Path(args.out)
    scene_config = SceneConfig()
    generate_dataset(data_dir, seed=args.seed, config=scene_config, sizes=SplitSizes(), overwrite=args.overwrite)

    model_config = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
    processor = build_processor(scene_config)
    model = build_model(processor, model_config, scene_config)
    model.train()
    encoder = Encoder(processor, scene_config)
    val = load_split(data_dir, "val")
    data = TrainingData(
        args.seed,
        scene_config,
        held_out_hashes(data_dir),
        family_weights(args.describe_weight),
        hold=args.hold,
        ramp=args.ramp,
    )

    # The vision tower and projector stay frozen at their random init for the first `freeze_vision` of training:
    # trained from the start, they were seen to blow every visual token up onto one large common vector (norm 0.3
    # -> 30 in 30 steps) in which the object's own features drown, and the model never left the prior plateau.
    # Random features of one object per patch are already distinct; once the decoder reads them, they are
    # fine-tuned at a lower learning rate.
    vision = vision_parameters(model)
    vision_ids = {id(p) for p in vision}
    decoder = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": decoder, "lr": args.lr}, {"params": vision, "lr": args.lr * args.vision_lr_scale}]
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    unfreeze_step = int(args.freeze_vision * args.steps)
    for p in vision:
        p.requires_grad_(unfreeze_step == 0)
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
        task = progress.add_task("pre-training", total=args.steps, status="")
        running = None
        for step in range(args.steps):
            if step == unfreeze_step:
                for p in vision:
                    p.requires_grad_(True)
            samples = [data.sample(step / args.steps) for _ in range(args.batch_size)]
            batch = encoder.batch(*zip(*samples))
            labels = batch.pop("labels")
            loss = sample_loss(model(**batch).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                accuracy = teacher_forced_accuracy(model, encoder, val, data_dir / "images")
                mean = sum(accuracy.values()) / len(accuracy)
                log.append({"step": step + 1, "loss": running, "minutes": (time.time() - start) / 60,
                            "val_accuracy": accuracy})
                progress.console.print(f"step {step + 1} loss {running:.3f} val {mean:.3f} " +
                                       " ".join(f"{k}={v:.2f}" for k, v in accuracy.items()))
            progress.update(task, advance=1, status=f"loss {running:.3f}")

    wall = time.time() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    summary = {"args": vars(args), "model_config": asdict(model_config), "wall_seconds": wall, "log": log}
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
    parser.add_argument("--describe-weight", type=float, default=2.0, help="sampling weight of the grounding task")
    parser.add_argument("--hold", type=float, default=0.2, help="fraction of training on lone objects")
    parser.add_argument("--ramp", type=float, default=0.5, help="fraction of training to reach the full scenes")
    parser.add_argument("--freeze-vision", type=float, default=0.5, help="frozen-vision fraction")
    parser.add_argument("--vision-lr-scale", type=float, default=0.3, help="learning-rate factor of the vision side")
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    for f in fields(ModelConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    return parser.parse_args(argv)


if __name__ == "__main__":
    pretrain(parse_args())
