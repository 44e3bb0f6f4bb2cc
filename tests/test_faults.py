"""Fault injection on the label cache: kills at random points (during a shard write too), random bytes of random
cache files corrupted, files truncated or deleted. After each fault the rerun either gives the rows of an
uninterrupted run or stops with an error that names a file of the cache; never other rows without an error.

Seeded, on a tiny random testbed-shaped checkpoint in this process. A kill is modelled by an exception raised at
the n-th write (or model step) that every later write also hits, as a dead process writes nothing more; its
leftovers (a half-written shard folder) are written as a real kill would leave them. `test_real_kills` kills a
labelling subprocess with SIGKILL at random times. The `slow` variants inject many more faults.
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed

from dyvte.data import BadSample, Sample, read_llava_json
from dyvte.label_cache import main as cache_main
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR
from dyvte.training import label_store
from dyvte.training.dense_labels import LabelConfig
from dyvte.training.label_run import LabelModule, run_labels
from dyvte.training.label_store import CacheError, LabelStore

KEY = {"model": "tiny", "split": "train"}
CONFIG = LabelConfig(max_new_tokens=2)
DISCRETE = ("id", "family", "answer", "ground_truth", "n_text", "n_visual", "vision_flops", "labels", "match",
            "accurate")
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-faults")
    model, processor = save_tiny_testbed(path)
    samples = read_llava_json(TESTBED_DATA_DIR / "train.json", TESTBED_DATA_DIR / "images")[:7]
    samples.insert(3, Sample(id="bad", image=str(path / "no-such.png"), question="<image>\nq", answer="a"))
    reference = label(model, processor, samples, tmp_path_factory.mktemp("reference"))
    return model, processor, samples, path, reference


def label(model, processor, samples, root: Path) -> datasets.Dataset:
    """The labels stage and the read after it, as `train.py` runs them."""
    store = LabelStore(root, KEY)
    run_labels(model, processor, samples, CONFIG, store, batch_size=2, shard_size=2, trainer_kwargs=TRAINER)
    return store.load()


def same_rows(rows: datasets.Dataset, reference: datasets.Dataset) -> bool:
    """The discrete columns equal; the floats to fp16 precision (a relabelled shard may be batched differently)."""
    if any(rows[c] != reference[c] for c in DISCRETE):
        return False
    features = torch.tensor(rows["features"]).float(), torch.tensor(reference["features"]).float()
    ce = torch.tensor(rows["ce"]), torch.tensor(reference["ce"])
    return torch.allclose(*features, atol=2e-3) and torch.allclose(*ce, atol=1e-4, equal_nan=True)


def names_a_cache_file(error: Exception, store_dir: Path) -> bool:
    return str(store_dir) in str(error)


class Killed(BaseException):
    """The process died here (a BaseException, as a kill is not an error the code may handle)."""


class KillSwitch:
    """Counts writes and model steps; at the `at`-th one, and at every one after it, the process is dead."""

    def __init__(self, at: int, rng: random.Random):
        self.at, self.rng, self.count, self.point = at, rng, 0, None

    def tick(self, point: str) -> bool:
        """True if the process dies at this point (it is dead already: raise at once)."""
        if self.point is not None:
            raise Killed(point)
        self.count += 1
        if self.count == self.at:
            self.point = point
            return True
        return False


def run_with_kill(model, processor, samples, root: Path, switch: KillSwitch) -> None:
    real_save, real_replace, real_sha = datasets.Dataset.save_to_disk, os.replace, label_store.file_sha256
    real_step = LabelModule.predict_step

    def save_to_disk(self, path, *args, **kwargs):
        if switch.tick("shard write"):
            real_save(self, path, *args, **kwargs)
            files = sorted(p for p in Path(path).iterdir() if p.is_file())
            victim = switch.rng.choice(files)  # the kill came while this file was being written
            with open(victim, "r+b") as file:
                file.truncate(switch.rng.randrange(victim.stat().st_size + 1))
            raise Killed("shard write")
        return real_save(self, path, *args, **kwargs)

    def replace(src, dst):
        if switch.tick("rename"):
            raise Killed("rename")
        return real_replace(src, dst)

    def file_sha256(path):
        if switch.tick("checksum"):
            raise Killed("checksum")
        return real_sha(path)

    def predict_step(self, batch, batch_idx):
        if switch.tick("model step"):
            raise Killed("model step")
        return real_step(self, batch, batch_idx)

    with mock.patch.object(datasets.Dataset, "save_to_disk", save_to_disk), mock.patch("os.replace", replace), \
            mock.patch.object(label_store, "file_sha256", file_sha256), \
            mock.patch.object(LabelModule, "predict_step", predict_step):
        try:
            run_labels(model, processor, samples, CONFIG, LabelStore(root, KEY), batch_size=2, shard_size=2,
                       trainer_kwargs=TRAINER)
        except Killed:
            pass


def corrupt(store_dir: Path, rng: random.Random) -> str:
    """One random fault on a random file (or shard) of a finished store; returns what was done."""
    files = sorted(p for p in store_dir.rglob("*") if p.is_file() and not p.name.startswith(".lock"))
    victim = rng.choice(files)
    kind = rng.choice(["flip bytes", "truncate", "delete file", "delete shard", "append"])
    if victim.stat().st_size == 0 and kind in ("flip bytes", "truncate"):
        kind = "delete file"
    name = victim.relative_to(store_dir)
    if kind == "delete shard":
        shard = rng.choice(sorted(store_dir.glob("shard-*")))
        shutil.rmtree(shard)
        return f"deleted {shard.name}"
    if kind == "delete file":
        victim.unlink()
    elif kind == "truncate":
        with open(victim, "r+b") as file:
            file.truncate(rng.randrange(victim.stat().st_size))
    elif kind == "append":
        with open(victim, "ab") as file:
            file.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
    else:
        data = bytearray(victim.read_bytes())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        victim.write_bytes(bytes(data))
    return f"{kind} {name}"


def check_rerun(outcome: Counter, rows_or_error, reference, store_dir: Path, fault: str, relabelled: str = "") -> None:
    if isinstance(rows_or_error, Exception):
        assert names_a_cache_file(rows_or_error, store_dir), f"{fault}: the error names no cache file: {rows_or_error}"
        outcome["stopped, naming the file"] += 1
    else:
        assert same_rows(rows_or_error, reference), f"{fault}: the rerun read other rows without an error"
        outcome[relabelled or "identical"] += 1


def load_or_error(store: LabelStore):
    try:
        return store.load()
    except CacheError as error:
        return error


def label_or_error(model, processor, samples, root):
    try:
        return label(model, processor, samples, root)
    except CacheError as error:
        return error


def inject_kills(tiny, tmp_path, n: int, seed: int) -> Counter:
    model, processor, samples, _, reference = tiny
    rng, outcome = random.Random(seed), Counter()
    switch = KillSwitch(10**9, rng)
    run_with_kill(model, processor, samples, tmp_path / "count", switch)  # counts the points of a whole run
    points = switch.count
    for fault in range(n):
        root = tmp_path / f"kill-{fault}"
        switch = KillSwitch(rng.randint(1, points), rng)
        run_with_kill(model, processor, samples, root, switch)
        assert switch.point is not None
        store = LabelStore(root, KEY)
        check_rerun(outcome, load_or_error(store), reference, store.dir, f"kill at {switch.point}")
        check_rerun(outcome, label_or_error(model, processor, samples, root), reference, store.dir,
                    f"kill at {switch.point}", "resumed, identical")
    return outcome


def inject_damage(tiny, tmp_path, n: int, seed: int) -> Counter:
    model, processor, samples, _, reference = tiny
    rng, outcome = random.Random(seed), Counter()
    finished = tmp_path / "finished"
    label(model, processor, samples, finished)
    for fault in range(n):
        root = tmp_path / f"damage-{fault}"
        shutil.copytree(finished, root)
        store = LabelStore(root, KEY)
        what = corrupt(store.dir, rng)
        check_rerun(outcome, load_or_error(LabelStore(root, KEY)), reference, store.dir, what)
        check_rerun(outcome, label_or_error(model, processor, samples, root), reference, store.dir, what,
                    "repaired and relabelled, identical")
    return outcome


def report(name: str, n: int, outcome: Counter) -> None:
    print(f"\n{name}: {n} faults injected, {sum(outcome.values())} reruns: {dict(outcome)}")


def test_kills_at_random_points(tiny, tmp_path):
    outcome = inject_kills(tiny, tmp_path, n=4, seed=0)
    report("kills", 4, outcome)
    # a killed label pass never leaves a store that reads as complete; the labels stage resumes it to the same rows
    assert outcome == {"stopped, naming the file": 4, "resumed, identical": 4}


def test_random_damage_to_a_finished_cache(tiny, tmp_path):
    outcome = inject_damage(tiny, tmp_path, n=8, seed=0)
    report("damage", 8, outcome)
    assert outcome["repaired and relabelled, identical"] == 8  # the labels stage always recovers


@pytest.mark.slow
def test_kills_at_random_points_long(tiny, tmp_path):
    outcome = inject_kills(tiny, tmp_path, n=16, seed=1)
    report("kills (long)", 16, outcome)
    assert outcome == {"stopped, naming the file": 16, "resumed, identical": 16}


@pytest.mark.slow
def test_random_damage_to_a_finished_cache_long(tiny, tmp_path):
    outcome = inject_damage(tiny, tmp_path, n=40, seed=1)
    report("damage (long)", 40, outcome)
    assert outcome["repaired and relabelled, identical"] == 40


LABEL_SCRIPT = textwrap.dedent("""
    import sys
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from dyvte.data import read_llava_json
    from dyvte.testbed import DATA_DIR
    from dyvte.training.dense_labels import LabelConfig
    from dyvte.training.label_run import run_labels
    from dyvte.training.label_store import LabelStore

    checkpoint, root = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    samples = read_llava_json(DATA_DIR / "train.json", DATA_DIR / "images")[:12]
    run_labels(model, processor, samples, LabelConfig(max_new_tokens=2), LabelStore(root, {"model": "tiny"}),
               batch_size=2, shard_size=2, trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    print("labelled")
""")


@pytest.mark.slow
def test_real_kills(tiny, tmp_path):
    """SIGKILL a labelling process at random times; the rerun resumes to the rows of an uninterrupted run."""
    _, _, _, checkpoint, _ = tiny
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", LABEL_SCRIPT, str(checkpoint)]
    start = time.perf_counter()
    subprocess.run([*command, str(tmp_path / "fresh")], env=env, check=True, capture_output=True)
    whole = time.perf_counter() - start
    fresh = LabelStore(tmp_path / "fresh", {"model": "tiny"}).load()
    rng, outcome = random.Random(2), Counter()
    for fault in range(2):
        root = tmp_path / f"killed-{fault}"
        process = subprocess.Popen([*command, str(root)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * whole)
        process.send_signal(signal.SIGKILL)
        process.wait()
        subprocess.run([*command, str(root)], env=env, check=True, capture_output=True)
        store = LabelStore(root, {"model": "tiny"})
        check_rerun(outcome, load_or_error(store), fresh, store.dir, f"SIGKILL {fault}", "resumed, identical")
    report("real SIGKILLs", 2, outcome)
    assert outcome["resumed, identical"] == 2


def test_manifest_counts_every_shard(tiny, tmp_path):
    """The issue's first fault: a finished cache missing one shard is refused by name, never read short."""
    model, processor, samples, _, reference = tiny
    label(model, processor, samples, tmp_path)
    store = LabelStore(tmp_path, KEY)
    store.load()
    assert not list(store.dir.rglob("cache-*")), "a read wrote a sort index next to the shards (read unverified)"
    manifest = json.loads((store.dir / "complete.json").read_text())
    rows = sum(record["rows"] for record in manifest["shards"].values())
    assert manifest["samples"] == len(samples) and rows == len(reference) == len(samples) - 1
    shard = sorted(store.dir.glob("shard-*"))[2]
    shutil.rmtree(shard)
    repair = f"python -m dyvte.label_cache repair {store.dir}"
    with pytest.raises(CacheError, match=rf"{re.escape(str(shard))} is missing.*{re.escape(repair)}"):
        LabelStore(tmp_path, KEY).load()


def test_raise_on_a_bad_sample_keeps_the_rows_labelled_before_it(tiny, tmp_path, caplog):
    """on_bad_sample=raise: the run stops at the bad sample, after flushing the rows of the batches before it (a
    shard of 8 was still filling); the rerun in skip mode labels only the rest."""
    model, processor, samples, _, reference = tiny
    store = LabelStore(tmp_path, KEY)
    with pytest.raises(BadSample, match="sample 'bad': image not found"):
        run_labels(model, processor, samples, CONFIG, store, batch_size=2, shard_size=8, on_bad_sample="raise",
                   trainer_kwargs=TRAINER)
    assert store.done_ids() == {s.id for s in samples[:2]}  # the batch before the bad sample's
    assert "after saving its 2 labelled samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        label(model, processor, samples, tmp_path)
    assert f"resuming {store.dir}: 2 of 8 samples done, 3 of 4 batches left" in caplog.text
    assert same_rows(store.load(), reference)


def test_cache_command_verifies_and_repairs_one_shard(tiny, tmp_path, caplog, capsys):
    model, processor, samples, _, reference = tiny
    label(model, processor, samples, tmp_path)
    store = LabelStore(tmp_path, KEY)
    assert cache_main(["verify", str(tmp_path)]) == 0
    assert f"{store.dir}: complete, verified (8 samples)" in capsys.readouterr().out
    shard = sorted(store.dir.glob("shard-*"))[1]
    rows_in_shard = json.loads((shard / "shard.json").read_text())["rows"]
    arrow = next(shard.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-100])
    assert cache_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{shard} has {arrow.name} of" in out and f"repair: python -m dyvte.label_cache repair {store.dir}" in out
    assert cache_main(["repair", str(store.dir)]) == 0
    assert f"removed {shard}" in capsys.readouterr().out and not shard.exists()
    with caplog.at_level(logging.INFO):
        rows = label(model, processor, samples, tmp_path)
    left = f"{8 - rows_in_shard} of 8 samples done, {-(-rows_in_shard // 2)} of 4 batches left"
    assert f"labels: resuming {store.dir}: {left}" in caplog.text
    assert same_rows(rows, reference)


def test_labels_stage_relabels_only_a_damaged_shard_and_says_so(tiny, tmp_path, caplog):
    model, processor, samples, _, reference = tiny
    label(model, processor, samples, tmp_path)
    store = LabelStore(tmp_path, KEY)
    shards = sorted(store.dir.glob("shard-*"))
    rows_in_shard = json.loads((shards[0] / "shard.json").read_text())["rows"]
    shutil.rmtree(shards[0])
    with caplog.at_level(logging.INFO):
        rows = label(model, processor, samples, tmp_path)
    assert f"{shards[0]} is missing; removed, its samples are labelled again" in caplog.text
    assert f"{8 - rows_in_shard} of 8 samples done, {-(-rows_in_shard // 2)} of 4 batches left" in caplog.text
    assert same_rows(rows, reference)
    assert set(p.name for p in shards[1:]) <= {p.name for p in store.dir.glob("shard-*")}  # the others kept


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from dyvte.training.label_store import LabelStore
    with LabelStore(sys.argv[1], {"model": "tiny", "split": "train"}).locked():
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_a_run_waiting_for_the_lock_names_its_holder(tmp_path, caplog):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "3"], env=env, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    with caplog.at_level(logging.INFO), LabelStore(tmp_path, KEY).locked():
        pass
    holder.wait()
    assert f"held by PID {holder.pid}" in caplog.text and "waiting for the cache lock" in caplog.text
