"""Prompts with images for the label pass: LLaVA instruction JSON or a Hugging Face `datasets` source.

A sample is one question about one image with its reference answer. Bad samples (missing or corrupt image, no
`<image>` in the prompt, empty answer, too long for the model) are found here, before any model time is spent on
them, and either skipped (counted, their ids written next to the label cache) or raised with the id and reason.
"""

import hashlib
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .images import check_image_processor, image_size_problem
from .prompts import IMAGE_PLACEHOLDER, assistant_message, chat_completion, chat_prompt, user_message


def normalize_answer(text: str) -> str:
    """What exact-match scoring compares: the answer stripped and lower-cased."""
    return text.strip().lower()


class BadSample(ValueError):
    """A sample that cannot be used, with the reason."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id, self.reason = sample_id, reason


@dataclass
class Sample:
    id: str
    image: str | Image.Image | None  # a path, or an already loaded image (datasets sources)
    question: str  # the user turn, with the image placeholder removed
    answer: str  # the reference answer of the dataset ("" if unknown)
    family: str = ""  # question family / task name, for per-family reports
    history: list = field(default_factory=list)  # earlier turns, as HF chat messages (multi-turn only)
    problem: str = ""  # why the record cannot be a sample (found while reading it); reported as a bad sample


def conversation_problem(turns: list[dict]) -> str:
    """What makes a LLaVA conversation unusable ("" if nothing): it must alternate human and gpt turns, starting
    with a human one, and hold at least one gpt answer (a trailing unanswered human turn is ignored)."""
    roles = [turn.get("from") for turn in turns]
    if not roles:
        return "the record has no conversation"
    for index, role in enumerate(roles):
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            return f"turn {index} of the conversation is from {role!r}, expected {expected!r} (human and gpt alternate)"
    if "gpt" not in roles:
        return "the conversation has no gpt turn, so there is no answer to label"
    return ""


class DataFileError(ValueError):
    """A data file that cannot be read at all (invalid JSON, not a list of records): names the file and where."""


def read_json_records(json_path: str | Path) -> list:
    """The records of a LLaVA instruction JSON; DataFileError naming the file (and line and column of invalid
    JSON) if it is missing, not a file, not JSON or not a list."""
    path = Path(json_path)
    if not path.is_file():
        raise DataFileError(f"{path}: {'is a folder, not a JSON file' if path.is_dir() else 'no such file'}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataFileError(f"{path}: invalid JSON at line {error.lineno} column {error.colno} (character "
                            f"{error.pos}): {error.msg}") from None
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path}: not UTF-8 text at byte {error.start}: {error.reason}") from None
    if not isinstance(records, list):
        raise DataFileError(f"{path}: the top level is a JSON {type(records).__name__}, not a list of records")
    return records


def record_problem(record) -> str:
    """What makes a LLaVA record's shape unusable ("" if nothing): a JSON object whose `conversations` is a list of
    turns with string `from` and `value`, and whose `image`, if given, is a string path."""
    if not isinstance(record, dict):
        return f"the record is a JSON {type(record).__name__}, not an object"
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return f"conversations is {'missing' if turns is None else 'a ' + type(turns).__name__}, not a list of turns"
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"turn {index} of the conversation is a {type(turn).__name__}, not an object"
        for key in ("from", "value"):
            if not isinstance(turn.get(key), str):
                return f"turn {index} of the conversation has no string {key!r}"
    if record.get("image") is not None and not isinstance(record["image"], str):
        return f"image must be a path, got the {type(record['image']).__name__} {record['image']!r}"
    return ""


def read_llava_json(json_path: str | Path, image_dir: str | Path, multi_turn: bool = False) -> list[Sample]:
    """LLaVA instruction records -> samples; each human/gpt pair is a sample when `multi_turn`, else only the first.

    A record that cannot be a sample (`record_problem`, `conversation_problem`) becomes a sample with its `problem`
    set, so that the label run skips and lists it (or stops on it) with the other bad samples; a file that cannot be
    read at all raises `DataFileError` naming it."""
    records = read_json_records(json_path)
    samples = []
    for record_index, record in enumerate(records):
        record_id = str(record.get("id", f"record {record_index}")) if isinstance(record, dict) else \
            f"record {record_index}"
        problem = record_problem(record)
        if problem:
            samples.append(Sample(id=record_id, image=None, question="", answer="",
                                  problem=f"{problem} (record {record_index} of {json_path})"))
            continue
        turns = record["conversations"]
        image = str(Path(image_dir) / record["image"]) if record.get("image") else None
        problem = conversation_problem(turns)
        if problem:
            samples.append(Sample(id=record_id, image=image, question="", answer="", problem=problem))
            continue
        history: list = []
        for turn_index in range(0, len(turns) - 1, 2):
            human, gpt = turns[turn_index], turns[turn_index + 1]
            sample_id = record_id if turn_index == 0 else f"{record_id}#{turn_index // 2}"
            samples.append(
                Sample(
                    id=sample_id,
                    image=image,
                    question=human["value"],
                    answer=gpt["value"],
                    family=record.get("family", ""),
                    history=list(history),
                )
            )
            if not multi_turn:
                break
            history += [user_message(human["value"], images=int(turn_index == 0)), assistant_message(gpt["value"])]
    return samples


def read_hf_dataset(
    path: str, split: str, image_column: str, question_column: str, answer_column: str,
    id_column: str | None = None, family_column: str | None = None, name: str | None = None,
) -> list[Sample]:
    """Samples from a Hugging Face `datasets` source (a hub id or a local dataset script/folder)."""
    from datasets import load_dataset

    dataset = load_dataset(path, name, split=split)
    return [
        Sample(
            id=str(row[id_column]) if id_column else str(i),
            image=row[image_column],
            question=row[question_column],
            answer=str(row[answer_column]) if answer_column and row.get(answer_column) is not None else "",
            family=str(row[family_column]) if family_column else "",
        )
        for i, row in enumerate(dataset)
    ]


def subsample(samples: list[Sample], fraction: float = 1.0, limit: int | None = None, seed: int = 0) -> list[Sample]:
    """A seeded random `fraction` (as the paper's 1% of LLaVA-665k), optionally capped at `limit`, order kept."""
    if not 0 < fraction <= 1:
        raise ValueError(f"data.fraction must be in (0, 1], got {fraction}.")
    count = round(len(samples) * fraction)
    if limit is not None:
        count = min(count, limit)
    chosen = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in chosen]


#: The default of `data.max_image_pixels`: PIL's own limit (`Image.MAX_IMAGE_PIXELS`, about 89 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


def load_image(sample: Sample, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
               image_processor=None) -> Image.Image:
    """The sample's image as RGB; BadSample if it is missing, unreadable, larger than `max_image_pixels` (None: no
    limit) or, given the model's `image_processor`, larger than that after the processor's resize or more elongated
    than `dyvte.images.MAX_ASPECT_RATIO`. The limits are checked on the header, before decoding: they replace PIL's
    decompression-bomb check."""
    if isinstance(sample.image, Image.Image):
        image = sample.image
    elif not sample.image:
        raise BadSample(sample.id, "has no image")
    elif Path(sample.image).is_dir():
        raise BadSample(sample.id, f"image is a folder, not an image file: {sample.image}")
    else:
        try:
            with _pil_pixel_limit(None), Image.open(sample.image) as opened:
                _check_pixels(sample, opened, max_image_pixels, image_processor)
                return opened.convert("RGB")
        except FileNotFoundError:
            raise BadSample(sample.id, f"image not found: {sample.image}") from None
        except OSError as error:
            raise BadSample(sample.id, f"image cannot be read ({error}): {sample.image}") from None
    _check_pixels(sample, image, max_image_pixels, image_processor)
    return image.convert("RGB")


def _check_pixels(sample: Sample, image: Image.Image, max_image_pixels: int | None, image_processor) -> None:
    width, height = image.size
    problem = image_size_problem(image_processor, width, height, max_image_pixels, "data.max_image_pixels",
                                 "raise it if the image is genuine")
    if problem:
        raise BadSample(sample.id, f"image {problem}: "
                                   f"{sample.image if isinstance(sample.image, str) else 'an in-memory image'}")


@contextmanager
def _pil_pixel_limit(limit: int | None):
    """PIL's process-wide decompression-bomb limit, set for the block (`load_image` checks its own)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


class PromptCollator:
    """Turns samples into a left-padded processor batch; bad samples are dropped and reported in the batch."""

    def __init__(self, processor, max_length: int | None = None, on_bad_sample: str = "skip",
                 require_answer: bool = True, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"data.on_bad_sample must be 'skip' or 'raise', got {on_bad_sample!r}.")
        self.processor = processor
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.require_answer = require_answer
        self.max_image_pixels = max_image_pixels
        check_image_processor(processor.image_processor)  # images are bounded by its resize rule (dyvte.images)
        processor.tokenizer.padding_side = "left"

    def prompt(self, sample: Sample) -> str:
        return chat_prompt(self.processor, sample.question, images=int(not sample.history), history=sample.history)

    def completion(self, sample: Sample, answer: str) -> str:
        """The prompt continued by `answer` as the chat template writes the assistant's turn."""
        return chat_completion(self.processor, sample.question, answer, images=int(not sample.history),
                               history=sample.history)

    def check(self, sample: Sample) -> tuple[str, Image.Image]:
        if sample.problem:
            raise BadSample(sample.id, sample.problem)
        if IMAGE_PLACEHOLDER not in sample.question and not sample.history:
            raise BadSample(sample.id, f"the prompt has no {IMAGE_PLACEHOLDER} placeholder")
        if self.require_answer and not sample.answer.strip():
            raise BadSample(sample.id, "the answer is empty")
        return self.prompt(sample), load_image(sample, self.max_image_pixels, self.processor.image_processor)

    def checked(self, sample: Sample) -> tuple[str, Image.Image]:
        """`check`, with any other exception from reading, decoding or shaping this one sample (a malformed
        field, a decoder's error) turned into a BadSample that names it: one bad record never stops a batch."""
        try:
            return self.check(sample)
        except BadSample:
            raise
        except Exception as error:  # noqa: BLE001 (whatever one record raises, it is that record's problem)
            raise BadSample(sample.id, f"cannot be read ({type(error).__name__}: {error})") from error

    def __call__(self, samples: list[Sample]) -> dict:
        prompts, images, kept, skipped = [], [], [], []
        for sample in samples:
            try:
                prompt, image = self.checked(sample)
            except BadSample as bad:
                if self.on_bad_sample == "raise":
                    raise
                skipped.append({"id": bad.sample_id, "reason": bad.reason})
                continue
            prompts.append(prompt), images.append(image), kept.append(sample)
        batch = {"samples": kept, "skipped": skipped}
        if not kept:
            return batch
        try:
            inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as error:
            rejected = self.rejected_images(prompts, images, kept)
            if not rejected:
                raise
            if self.on_bad_sample == "raise":
                raise rejected[0] from error
            skipped += [{"id": bad.sample_id, "reason": bad.reason} for bad in rejected]
            rejected_ids = {bad.sample_id for bad in rejected}
            return self._without(kept, rejected_ids, skipped)
        lengths = inputs["attention_mask"].sum(dim=1)
        too_long = [i for i, n in enumerate(lengths.tolist()) if self.max_length and n > self.max_length]
        if too_long:
            if self.on_bad_sample == "raise":
                i = too_long[0]
                raise BadSample(kept[i].id, f"prompt has {int(lengths[i])} tokens, over the limit {self.max_length}")
            skipped += [{"id": kept[i].id, "reason": f"prompt over {self.max_length} tokens"} for i in too_long]
            return self._without(kept, {kept[i].id for i in too_long}, skipped)
        batch.update(inputs)
        return batch


    def _without(self, samples: list[Sample], dropped_ids: set[str], skipped: list[dict]) -> dict:
        """The batch of `samples` less `dropped_ids`, with `skipped` listed before what it skips itself."""
        batch = self([s for s in samples if s.id not in dropped_ids])
        return batch | {"skipped": skipped + batch["skipped"]}

    def rejected_images(self, prompts: list[str], images: list[Image.Image], samples: list[Sample]) -> list[BadSample]:
        """The samples whose image the processor rejects on its own (a batch the processor refused, one by one)."""
        rejected = []
        for prompt, image, sample in zip(prompts, images, samples):
            try:
                self.processor(images=[image], text=[prompt], return_tensors="pt")
            except (ValueError, TypeError, RuntimeError) as error:
                size = "x".join(map(str, image.size))
                rejected.append(BadSample(sample.id, f"the processor rejects its image {sample.image} ({size} px): "
                                                     f"{error}"))
        return rejected


class SampleDataset(Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]


class PromptDataModule(L.LightningDataModule):
    """Batches of processor inputs over a list of samples, for the label pass (`predict`)."""

    def __init__(self, samples: list[Sample], collator: PromptCollator, batch_size: int = 8, num_workers: int = 0):
        super().__init__()
        self.samples, self.collator = samples, collator
        self.batch_size, self.num_workers = batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            SampleDataset(self.samples), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=self.collator,
        )


@dataclass
class DataSettings:
    """A data config (`conf/data/*.yaml`, whose Hydra schema this is): where the prompts come from and how they are
    split and checked. `load_splits` reads them.

    `source=llava_json`: `json_path` and `image_dir` (records' image paths are relative to it), with
    `val_json_path`, `test_json_path`, `certification_json_path` for the other splits. `source=hf`: a `datasets`
    source `path` (and config `name`), its `split` and columns, with `val_split`, `test_split`,
    `certification_split`."""

    source: str = "llava_json"  # llava_json | hf
    json_path: str | None = None
    image_dir: str | None = None
    val_json_path: str | None = None
    test_json_path: str | None = None
    certification_json_path: str | None = None  # rows for certified thresholds (validate.target_agreement)
    path: str | None = None
    name: str | None = None
    split: str = "train"
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    id_column: str | None = None
    family_column: str | None = None
    val_split: str | None = None
    test_split: str | None = None
    certification_split: str | None = None
    val_fraction: float = 0.0  # held out of the training data when there is no val split
    certification_fraction: float = 0.0  # held out of the training data by image when there is no certification split
    multi_turn: bool = False  # true: every human/gpt pair of a conversation is a sample, with its history
    fraction: float = 1.0  # seeded subsample of the training prompts (the paper: 0.01 of LLaVA-665k)
    limit: int | None = None  # cap on training prompts after subsampling
    eval_limit: int | None = None  # cap on every other split
    seed: int = 0
    max_length: int = 4096  # prompts longer than this are bad samples
    on_bad_sample: str = "skip"  # skip (count, write ids next to the cache) | raise
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS  # larger images are bad samples (null: no limit)

    #: The keys only one source reads (`dyvte.configs.check_data` refuses the other source's, set)
    SOURCE_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "llava_json": ("json_path", "image_dir", "val_json_path", "test_json_path", "certification_json_path",
                       "multi_turn"),
        "hf": ("path", "name", "split", "image_column", "question_column", "answer_column", "id_column",
               "family_column", "val_split", "test_split", "certification_split"),
    }


def image_key(sample: Sample) -> str:
    """What identifies a sample's image across splits: its resolved path, or a hash of an in-memory image's pixels."""
    if isinstance(sample.image, Image.Image):
        return "sha1:" + hashlib.sha1(sample.image.tobytes()).hexdigest()
    return str(Path(sample.image).resolve()) if sample.image else ""


def hold_out_images(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): whole images drawn at random (seeded) until at least `fraction` of the samples are held
    out, so no image has samples on both sides. Order is kept on both sides."""
    images = list(dict.fromkeys(image_key(s) for s in samples))
    random.Random(seed).shuffle(images)
    per_image: dict[str, int] = {}
    for sample in samples:
        per_image[image_key(sample)] = per_image.get(image_key(sample), 0) + 1
    wanted, chosen, count = round(fraction * len(samples)), set(), 0
    for image in images:
        if count >= wanted:
            break
        chosen.add(image)
        count += per_image[image]
    return ([s for s in samples if image_key(s) not in chosen], [s for s in samples if image_key(s) in chosen])


def load_splits(data_config: DataSettings) -> dict[str, list[Sample]]:
    """`train`, `val` and (if configured) `test` and `certification` samples from a `conf/data/*.yaml` config.

    `llava_json`: `json_path`, with `val_json_path` / `test_json_path` / `certification_json_path` for the other
    splits. `hf`: the dataset's `split`, with `val_split` / `test_split` / `certification_split` naming its other
    splits. Without a val split, `val_fraction` of the training samples is held out; without a certification
    split, `certification_fraction` of them, by whole images (`hold_out_images`). `eval_limit` caps every split but
    train."""
    if data_config.source == "llava_json":
        samples = read_llava_json(data_config.json_path, data_config.image_dir, data_config.multi_turn)
        sources = (data_config.val_json_path, data_config.test_json_path,
                   data_config.certification_json_path)

        def read_split(path):
            return read_llava_json(path, data_config.image_dir, data_config.multi_turn) if path else None
    elif data_config.source == "hf":
        columns = (data_config.image_column, data_config.question_column, data_config.answer_column,
                   data_config.id_column, data_config.family_column, data_config.name)
        samples = read_hf_dataset(data_config.path, data_config.split, *columns)
        sources = (data_config.val_split, data_config.test_split, data_config.certification_split)

        def read_split(split):
            return read_hf_dataset(data_config.path, split, *columns) if split else None
    else:
        raise ValueError(f"data.source must be 'llava_json' or 'hf', got {data_config.source!r}.")
    val_source, test_source, certification_source = sources
    samples = subsample(samples, data_config.fraction, seed=data_config.seed)
    val = read_split(val_source)
    if val is None and data_config.val_fraction > 0:
        held_out = {s.id for s in subsample(samples, data_config.val_fraction, seed=data_config.seed + 1)}
        val = [s for s in samples if s.id in held_out]
        samples = [s for s in samples if s.id not in held_out]
    certification = read_split(certification_source)
    if certification is None and data_config.certification_fraction > 0:
        samples, certification = hold_out_images(samples, data_config.certification_fraction, data_config.seed + 2)
    splits = {"train": samples[: data_config.limit] if data_config.limit else samples, "val": val or []}
    test = read_split(test_source)
    if test is not None:
        splits["test"] = test
    if certification is not None:
        splits["certification"] = certification
    if data_config.eval_limit:
        splits.update({name: split[:data_config.eval_limit] for name, split in splits.items() if name != "train"})
    return splits
