"""The label/feature store: `datasets` Arrow shards keyed by everything that determines their content.

A store is a folder named by the hash of its key (model identity, split contents, label settings):

    meta.json        the key, for people
    shard-r0-<id>/   a `Dataset.save_to_disk` folder + shard.json: its rows, ids and every file's size and sha256
    skipped.jsonl    the bad samples, with their reason
    complete.json    the manifest, written last: the key, the sample count and each shard's record

Shards are written to a temporary folder and renamed into place, so a crash never leaves a half shard; on rerun,
samples already in a shard are skipped. Each rank of a multi-GPU run writes its own shards. A store proves its own
integrity: `load` hashes every file against the manifest and refuses a missing, truncated, corrupt or extra shard,
naming it and the command that repairs it (`python -m dyvte.label_cache repair DIR`); `repair` removes what is
damaged so that the labels stage relabels exactly those samples. A store is never read short.
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets import Array2D, Dataset, Features, Sequence, Value
from filelock import FileLock, Timeout

from ..engine.features import group_widths
from ..files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

#: Bumped whenever the row schema, the labels' meaning or the store's layout changes, so a cache written before is
#: relabelled instead of read wrongly (2: the `vision_flops` column; 3: shard records and the manifest with
#: checksums; 4: under labels.reference=model, exits match the full model's teacher-forced predictions).
SCHEMA_VERSION = 4
META_NAME = "meta.json"
SKIPPED_NAME = "skipped.jsonl"
COMPLETE_NAME = "complete.json"
SHARD_RECORD = "shard.json"


class CacheError(RuntimeError):
    """A label cache that cannot be used as it is: names the damaged file and the command that repairs it."""


#: Per store folder, the signature (every file's path, size and mtime) it last verified with in this process.
_VERIFIED: dict[str, tuple] = {}


def repair_command(store_dir: Path) -> str:
    return f"python -m dyvte.label_cache repair {store_dir}"


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
    """One label cache (see the module docstring). The folder is created by the first write, not by looking."""

    def __init__(self, root: str | Path, key_fields: dict):
        key_fields = {**key_fields, "schema": SCHEMA_VERSION}
        self.key_fields = json.loads(json.dumps(key_fields, sort_keys=True, default=str))  # as the manifest holds it
        self.dir = Path(root) / store_key(key_fields)

    @classmethod
    def open(cls, store_dir: str | Path) -> "LabelStore":
        """The store in an existing folder, keyed by its `meta.json` (for `python -m dyvte.label_cache`)."""
        store_dir = Path(store_dir)
        store = cls.__new__(cls)
        store.dir = store_dir
        try:
            store.key_fields = json.loads((store_dir / META_NAME).read_text())
        except (OSError, ValueError):
            manifest, _ = store._read_manifest()
            store.key_fields = manifest["identity"] if manifest else None
        return store

    def _create(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.key_fields is not None and not self._meta_ok():
            atomic_write_text(self.dir / META_NAME, json.dumps(self.key_fields, indent=2, sort_keys=True))

    def _meta_ok(self) -> bool:
        try:
            return json.loads((self.dir / META_NAME).read_text()) == self.key_fields
        except (OSError, ValueError):
            return False

    def lock(self, rank: int = 0) -> FileLock:
        """Held while a process labels into this cache. A second run on the same cache waits for the first and then
        reuses its labels, instead of writing every sample a second time; each DDP rank has its own lock."""
        self._create()
        return FileLock(str(self.dir / f".lock-r{rank}"))

    @contextmanager
    def locked(self, rank: int = 0):
        """`lock(rank)`, held for the block; a run that has to wait says so, with the holder's process id."""
        lock, owner = self.lock(rank), self.dir / f".lock-r{rank}.pid"
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = owner.read_text().strip() if owner.exists() else "unknown"
            log.info("waiting for the cache lock %s held by PID %s", lock.lock_file, holder or "unknown")
            lock.acquire()
        try:
            owner.write_text(str(os.getpid()))
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    def shards(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("shard-*") if p.is_dir())

    def shard_record(self, shard: Path) -> dict:
        """A shard's `shard.json`: {"rows": n, "ids_sha256": ..., "files": {name: {"bytes": n, "sha256": ...}}}."""
        return json.loads((shard / SHARD_RECORD).read_text())

    def shard_problem(self, shard: Path, expected: dict | None = None) -> str:
        """Why `shard` cannot be used ("" if it can): its record is missing or unreadable, differs from the
        manifest's, or a file it lists is missing, of another size, or of another sha256."""
        if not shard.is_dir():
            return "is missing"
        try:
            record = self.shard_record(shard)
            files = record["files"]
            int(record["rows"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"has no readable {SHARD_RECORD} ({type(error).__name__}: {error})"
        if expected is not None and record != expected:
            return f"its {SHARD_RECORD} differs from the manifest's record of it"
        for name, info in files.items():
            path = shard / name
            if not path.is_file():
                return f"lacks its file {name}"
            size = path.stat().st_size
            if size != info["bytes"]:
                return f"has {name} of {size} bytes, written with {info['bytes']} (truncated or overwritten)"
            if file_sha256(path) != info["sha256"]:
                return f"has a corrupt {name} (its sha256 differs from the one written with it)"
        return ""

    def done_ids(self) -> set[str]:
        """The ids in the shards that verify (a damaged shard's samples are not done)."""
        done: set[str] = set()
        with quiet_datasets():
            for shard in self.shards():
                if not self.shard_problem(shard):
                    done.update(datasets.load_from_disk(str(shard))["id"])
        return done

    def skipped(self) -> list[dict]:
        path = self.dir / SKIPPED_NAME
        if not path.exists():
            return []
        try:
            return [json.loads(line) for line in path.read_text().splitlines()]
        except ValueError as error:
            raise CacheError(f"{path} is corrupt ({error}); repair the cache: {repair_command(self.dir)}") from None

    def write_shard(self, rows: dict[str, list], features: Features, rank: int = 0) -> Path:
        """Rows as a new shard: saved to a temporary folder with its record, then renamed into place at once."""
        self._create()
        name = f"shard-r{rank}-{uuid.uuid4().hex[:12]}"
        tmp = self.dir / f".tmp-{name}"
        with quiet_datasets():
            Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        ids = hashlib.sha256("\n".join(rows["id"]).encode()).hexdigest()
        (tmp / SHARD_RECORD).write_text(json.dumps({"rows": len(rows["id"]), "ids_sha256": ids, "files": files}))
        final = self.dir / name
        os.replace(tmp, final)
        return final

    def add_skipped(self, skipped: list[dict]) -> None:
        if not skipped:
            return
        self._create()
        path = self.dir / SKIPPED_NAME
        known = {s["id"] for s in self.skipped()}
        lines = [json.dumps(s) for s in skipped if s["id"] not in known]
        if lines:
            existing = path.read_text() if path.exists() else ""
            atomic_write_text(path, existing + "\n".join(lines) + "\n")

    def mark_complete(self, n_samples: int) -> None:
        """Write the manifest: every shard's record, the skipped list's checksum and the sample count. Refused if
        the shards and the skipped list do not account for every sample exactly once."""
        self._create()
        shards = {shard.name: self.shard_record(shard) for shard in self.shards()}
        skipped = self.skipped()
        rows = sum(record["rows"] for record in shards.values())
        if rows + len(skipped) != n_samples:
            raise CacheError(f"the label cache {self.dir} holds {rows} rows and {len(skipped)} skipped samples, not "
                             f"the {n_samples} samples it labels; repair it: {repair_command(self.dir)}")
        skipped_path = self.dir / SKIPPED_NAME
        manifest = {
            "samples": n_samples, "identity": self.key_fields, "shards": shards,
            "skipped": {"count": len(skipped), "sha256": file_sha256(skipped_path) if skipped_path.exists() else None},
        }
        atomic_write_text(self.dir / COMPLETE_NAME, json.dumps(manifest, indent=1, sort_keys=True))

    @property
    def complete(self) -> bool:
        return (self.dir / COMPLETE_NAME).exists()

    def _read_manifest(self) -> tuple[dict | None, str]:
        """(the parsed `complete.json` or None, why it is unreadable or "")."""
        path = self.dir / COMPLETE_NAME
        if not path.exists():
            return None, ""
        try:
            manifest = json.loads(path.read_text())
            manifest["samples"], manifest["shards"].items(), manifest["skipped"]["count"]  # noqa: B018 (must exist)
            return manifest, ""
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return None, f"{type(error).__name__}: {error}"

    def manifest(self) -> dict | None:
        """The parsed `complete.json` (None without one); CacheError if it is unreadable."""
        manifest, error = self._read_manifest()
        if error:
            raise CacheError(f"{self.dir / COMPLETE_NAME} is unreadable ({error}); repair the cache: "
                             f"{repair_command(self.dir)}")
        return manifest

    def problems(self) -> list[tuple[Path, str]]:
        """Everything that keeps this store from being used as complete: (path, what is wrong), [] if nothing.

        Without a manifest only the shards and the skipped list are checked (an incomplete store resumes from the
        shards that verify)."""
        manifest, error = self._read_manifest()
        if error:
            return [(self.dir / COMPLETE_NAME, f"is unreadable ({error})")]
        shards = {shard.name: shard for shard in self.shards()}
        if manifest is None:
            found = [(path, problem) for path in shards.values() if (problem := self.shard_problem(path))]
            try:
                self.skipped()
            except CacheError:
                found.append((self.dir / SKIPPED_NAME, "is unreadable"))
            return found
        found = []
        if self.key_fields is not None and manifest["identity"] != self.key_fields:
            found.append((self.dir / COMPLETE_NAME, "was written for another model, data or label settings"))
        for name, record in manifest["shards"].items():
            problem = self.shard_problem(self.dir / name, record)
            if problem:
                found.append((self.dir / name, problem))
        for name in sorted(set(shards) - set(manifest["shards"])):
            found.append((shards[name], "is not in the manifest (complete.json): its rows would be read twice"))
        skipped_path = self.dir / SKIPPED_NAME
        written = manifest["skipped"]
        present = file_sha256(skipped_path) if skipped_path.exists() else None
        if present != written.get("sha256"):
            found.append((skipped_path, "is missing" if present is None else "differs from the manifest's checksum"))
        rows = sum(record["rows"] for record in manifest["shards"].values())
        if rows + written["count"] != manifest["samples"]:
            found.append((self.dir / COMPLETE_NAME, f"accounts for {rows} rows and {written['count']} skipped "
                                                    f"samples, not its {manifest['samples']} samples"))
        return found

    def _signature(self) -> tuple:
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(self.dir.rglob("*"))
                     if p.is_file() and not p.name.startswith(".lock"))

    def verify(self) -> None:
        """CacheError unless the store is complete and every file is as the manifest says (hashed once per
        process and store: again only when a file's size or mtime changes)."""
        if not self.complete:
            raise CacheError(f"the label cache {self.dir} is incomplete (no {COMPLETE_NAME}): run the labels stage")
        signature = self._signature()
        if _VERIFIED.get(str(self.dir.resolve())) == signature:
            return
        found = self.problems()
        if found:
            listed = "; ".join(f"{path} {problem}" for path, problem in found)
            raise CacheError(f"the label cache {self.dir} is damaged: {listed}. Repair it with "
                             f"`{repair_command(self.dir)}` and rerun with the labels stage, which relabels only "
                             "the samples of what the repair removed")
        _VERIFIED[str(self.dir.resolve())] = signature

    def repair(self, rank: int | None = None) -> list[tuple[Path, str]]:
        """Remove what is damaged, so that the labels stage relabels exactly those samples: unusable shards, an
        unreadable or stale manifest, a skipped list that does not verify, and the half-written shards of killed
        runs (of `rank` only, when given: other ranks may be writing theirs). Returns (path, why) for everything
        removed but those leftovers. A store whose files all verify is left as it is."""
        if not self.dir.exists():
            return []
        for tmp in self.dir.glob(".tmp-shard-*" if rank is None else f".tmp-shard-r{rank}-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        found = self.problems()
        for path, problem in found:
            if path.name.startswith("shard-"):
                shutil.rmtree(path, ignore_errors=True)  # ignore: another rank may be removing it too
            elif path.name == SKIPPED_NAME:
                path.unlink(missing_ok=True)
        if found:
            (self.dir / COMPLETE_NAME).unlink(missing_ok=True)
        if self.dir.exists() and not self._meta_ok() and self.key_fields is not None:
            atomic_write_text(self.dir / META_NAME, json.dumps(self.key_fields, indent=2, sort_keys=True))
        _VERIFIED.pop(str(self.dir.resolve()), None)
        return found

    def load(self) -> Dataset:
        """Every row, sorted by id, after `verify`: never a store that is short, damaged or incomplete."""
        self.verify()
        manifest = self.manifest()
        with quiet_datasets():
            parts = [datasets.load_from_disk(str(self.dir / name)) for name in sorted(manifest["shards"])]
            if not parts:
                raise CacheError(f"the label cache {self.dir} has no rows: every sample was skipped as bad "
                                 f"(see {self.dir / SKIPPED_NAME})")
            rows = datasets.concatenate_datasets(parts)
            ids = rows["id"]
            # sorted by id with the index in memory: `Dataset.sort` writes its index as a cache file next to the
            # shards and reads it back on the next run, unverified
            rows = rows.select(sorted(range(len(ids)), key=ids.__getitem__), keep_in_memory=True)
        expected = sum(record["rows"] for record in manifest["shards"].values())
        if len(rows) != expected or len(set(rows["id"])) != expected:
            raise CacheError(f"the label cache {self.dir} reads {len(rows)} rows ({len(set(rows['id']))} ids), its "
                             f"manifest says {expected}; repair it: {repair_command(self.dir)}")
        return rows
