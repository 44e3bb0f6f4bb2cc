"""The label/feature store: `datasets` Arrow shards keyed by everything that determines their content.

Shards are written to a temporary folder and renamed into place, so a crash never leaves a half shard; on rerun,
samples already in a shard are skipped. Each rank of a multi-GPU run writes its own shards.
"""

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets import Array2D, Dataset, Features, Sequence, Value
from filelock import FileLock

from ..engine.features import group_widths
from ..files import atomic_write_text

#: Bumped whenever the row schema changes, so a cache written before is relabelled instead of read wrongly
#: (2: the `vision_flops` column).
SCHEMA_VERSION = 2
META_NAME = "meta.json"
SKIPPED_NAME = "skipped.jsonl"
COMPLETE_NAME = "complete.json"


@contextmanager
def quiet_datasets():
    """No "Saving the dataset" / "Loading dataset shards" progress bar per shard: the label pass has its own."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def store_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The cache column of each head-feature group (`dyvte.engine.features.FEATURE_GROUPS`).
GROUP_COLUMNS = {"text": "features", "visual": "visual_features", "attention": "attention_features",
                 "lens": "lens_features"}


def row_features(num_layers: int, hidden_size: int, num_heads: int, groups: tuple[str, ...] = ("text",)) -> Features:
    """The cache schema: labels per exit layer 0..L and head features per layer [L, width] of each stored group."""
    widths = group_widths(hidden_size, num_heads)
    columns = {GROUP_COLUMNS[g]: Array2D(shape=(num_layers, widths[g]), dtype="float16") for g in groups}
    return Features(
        {
            "id": Value("string"),
            "family": Value("string"),
            "answer": Value("string"),  # the reference answer A (decoded)
            "ground_truth": Value("string"),
            "n_text": Value("int32"),
            "n_visual": Value("int32"),
            "vision_flops": Value("int64"),  # vision tower + projector of this sample (`dyvte.flops.vision_flops`)
            "labels": Sequence(Value("int8")),  # per exit layer 0..L: 1 safe, 0 not, -1 not labelled
            "match": Sequence(Value("bool")),  # greedy with exit reproduces A
            "ce": Sequence(Value("float32")),
            "accurate": Sequence(Value("bool")),  # the answer with exit equals the ground truth
            **columns,
        }
    )


class LabelStore:
    def __init__(self, root: str | Path, key_fields: dict):
        key_fields = {**key_fields, "schema": SCHEMA_VERSION}
        self.key_fields = key_fields
        self.dir = Path(root) / store_key(key_fields)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / META_NAME
        if not meta.exists():
            atomic_write_text(meta, json.dumps(key_fields, indent=2, sort_keys=True, default=str))

    def lock(self, rank: int = 0) -> FileLock:
        """Held while a process labels into this cache. A second run on the same cache waits for the first and then
        reuses its labels, instead of writing every sample a second time; each DDP rank has its own lock."""
        return FileLock(str(self.dir / f".lock-r{rank}"))

    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("shard-*") if p.is_dir())

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        with quiet_datasets():
            for shard in self.shards():
                done.update(datasets.load_from_disk(str(shard))["id"])
        return done

    def skipped(self) -> list[dict]:
        path = self.dir / SKIPPED_NAME
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def write_shard(self, rows: dict[str, list], features: Features, rank: int = 0) -> Path:
        name = f"shard-r{rank}-{uuid.uuid4().hex[:12]}"
        tmp = self.dir / f".tmp-{name}"
        with quiet_datasets():
            Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
        final = self.dir / name
        os.replace(tmp, final)
        return final

    def add_skipped(self, skipped: list[dict]) -> None:
        if not skipped:
            return
        path = self.dir / SKIPPED_NAME
        known = {s["id"] for s in self.skipped()}
        lines = [json.dumps(s) for s in skipped if s["id"] not in known]
        if lines:
            existing = path.read_text() if path.exists() else ""
            atomic_write_text(path, existing + "\n".join(lines) + "\n")

    def mark_complete(self, n_samples: int) -> None:
        atomic_write_text(self.dir / COMPLETE_NAME, json.dumps({"samples": n_samples, "skipped": len(self.skipped())}))

    @property
    def complete(self) -> bool:
        return (self.dir / COMPLETE_NAME).exists()

    def load(self) -> Dataset:
        shards = self.shards()
        if not shards:
            raise FileNotFoundError(f"the label store {self.dir} has no shards yet.")
        with quiet_datasets():
            return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards]).sort("id")
