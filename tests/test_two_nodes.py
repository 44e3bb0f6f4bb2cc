"""`train.py trainer.num_nodes=2` as two processes on this machine, each a "node" with one CPU rank, joined through
Lightning's own cluster variables (MASTER_ADDR, MASTER_PORT, NODE_RANK, WORLD_SIZE, LOCAL_RANK) over gloo, with one
shared cache_dir as a shared filesystem would be. Checked against a one-process run: every sample labelled exactly
once, the label cache equal bit for bit, heads and validate.json equal within float rounding; and a rank killed
mid-run: the rerun resumes and still labels every sample once.

The label cache is read directly with `datasets` here (not through dyvte's `LabelStore`). Labels are computed one
prompt per batch (`labels.batch_size=1`), so that a rank's batches are the one-process run's batches. The train
split has an even number of rows, within one head-training batch, so that two ranks' averaged gradients are the
one-process gradient (up to float rounding); val and test have an odd number, which the ranks split unevenly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.limit=8", "data.eval_limit=5", "labels.batch_size=1", "head_training.epochs=3",
          "head_training.hidden=8", "head_training.batch_size=64", "validate.folds=2"]
TWO_NODES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"]
# heads trained by two ranks (gloo all-reduce of the two half-batch gradients) vs one process (one full batch)
HEAD_ATOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-testbed")
    save_tiny_testbed(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nodes(*overrides: str, run_dir: Path) -> list[subprocess.Popen]:
    """Both nodes of one run, as a cluster's scheduler starts them: the same command, each with its NODE_RANK."""
    port = free_port()
    nodes = []
    for node in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
        log = (run_dir.parent / f"{run_dir.name}-node{node}.log").open("w")
        nodes.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *TWO_NODES, *overrides, f"hydra.run.dir={run_dir}",
             f"hydra.job.name=train_node{node}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return nodes


def wait_all(nodes: list[subprocess.Popen], run_dir: Path, timeout: float = 600) -> None:
    for node, process in enumerate(nodes):
        assert process.wait(timeout=timeout) == 0, (run_dir.parent / f"{run_dir.name}-node{node}.log").read_text()[-3000:]


def one_process(*overrides: str, run_dir: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def caches(root: Path) -> dict[str, Path]:
    """Each label cache folder under `root`, by its split."""
    return {json.loads((meta).read_text())["split"]: meta.parent for meta in root.glob("*/meta.json")}


def rows(cache: Path) -> list[dict]:
    shards = sorted(cache.glob("shard-*"))
    table = datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards])
    return sorted(table.with_format("numpy"), key=lambda row: row["id"])


def assert_labelled_once_and_identical(two: Path, one: Path, both_ranks: bool = True) -> None:
    assert caches(two).keys() == caches(one).keys() == {"train", "val", "test"}
    for split, one_cache in caches(one).items():
        two_cache = caches(two)[split]
        assert two_cache.name == one_cache.name  # the same cache key: same model, samples and settings
        assert (two_cache / "complete.json").exists()
        if both_ranks:
            assert {s.name.split("-")[1] for s in two_cache.glob("shard-*")} == {"r0", "r1"}
        two_rows, one_rows = rows(two_cache), rows(one_cache)
        ids = [row["id"] for row in two_rows]
        assert len(ids) == len(set(ids)), f"{split}: a sample labelled twice"
        assert ids == [row["id"] for row in one_rows], f"{split}: samples missing or extra"
        for a, b in zip(two_rows, one_rows):
            assert a.keys() == b.keys()
            for column in a:  # bit for bit: strings, labels, CE, the float16 features
                assert (a[column] == b[column]) if isinstance(a[column], str) else (
                    a[column].dtype == b[column].dtype and a[column].tobytes() == b[column].tobytes()), column


def test_two_nodes_equal_one_process(checkpoint, tmp_path):
    model = f"model.name_or_path={checkpoint}"
    one_process(model, *COMMON, f"cache_dir={tmp_path / 'one'}", run_dir=tmp_path / "one-run")
    wait_all(start_nodes(model, *COMMON, f"cache_dir={tmp_path / 'two'}", run_dir=tmp_path / "two-run"),
             tmp_path / "two-run")

    assert_labelled_once_and_identical(tmp_path / "two", tmp_path / "one")
    one_weights = load_file(tmp_path / "one-run" / "heads" / "model.safetensors")
    two_weights = load_file(tmp_path / "two-run" / "heads" / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        assert torch.allclose(two_weights[name], one_weights[name], atol=HEAD_ATOL, rtol=0), name
    one_report = json.loads((tmp_path / "one-run" / "validate.json").read_text())
    two_report = json.loads((tmp_path / "two-run" / "validate.json").read_text())
    for key in ("samples", "threshold", "agreement", "accuracy", "full_accuracy", "flops_saved", "mean_exit_layer"):
        assert two_report[key] == pytest.approx(one_report[key], abs=1e-9), key
    # node 1 labelled and trained, but only rank 0 validated and wrote
    assert "validate (test split)" in (tmp_path / "two-run" / "train_node0.log").read_text()
    assert "validate (test split)" not in (tmp_path / "two-run" / "train_node1.log").read_text()


def test_killed_rank_resumes_and_labels_each_sample_once(checkpoint, tmp_path):
    labels_only = [f"model.name_or_path={checkpoint}", "stages=[labels]", "data.limit=12", "data.eval_limit=3",
                   "labels.batch_size=1", "labels.shard_size=1"]
    cache = tmp_path / "two"
    nodes = start_nodes(*labels_only, f"cache_dir={cache}", run_dir=tmp_path / "killed-run")
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache.glob("*/shard-r1-*")) and nodes[1].poll() is None:
        time.sleep(0.2)
    nodes[1].send_signal(signal.SIGKILL)  # node 1 dies mid-run ...
    nodes[1].wait()
    assert list(cache.glob("*/shard-r1-*")), "node 1 was killed before its first shard"
    nodes[0].send_signal(signal.SIGKILL)  # ... and the scheduler ends the job's other node
    nodes[0].wait()
    assert len(list(cache.glob("*/complete.json"))) < 3, "the run finished before it could be killed"

    wait_all(start_nodes(*labels_only, f"cache_dir={cache}", run_dir=tmp_path / "rerun"), tmp_path / "rerun")
    one_process(*labels_only, f"cache_dir={tmp_path / 'one'}", run_dir=tmp_path / "one-run")
    assert_labelled_once_and_identical(cache, tmp_path / "one", both_ranks=False)
