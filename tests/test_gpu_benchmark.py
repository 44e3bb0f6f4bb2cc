"""`python -m benchmarks.gpu --smoke`: the GPU benchmark end to end on the CPU at tiny shapes, importing nothing the
bare CUDA image lacks (Hydra, OmegaConf, datasets, Optuna), and its time budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root holds `benchmarks/`

from benchmarks.gpu import FILES, main  # noqa: E402

MISSING_ON_THE_GPU_IMAGE = ("hydra", "omegaconf", "datasets", "optuna")
# Runs the smoke benchmark in a fresh interpreter in which the packages above cannot be imported (as if absent:
# ModuleNotFoundError, which is what optional-import checks such as Lightning's expect), then checks none loaded.
SMOKE_WITHOUT_TRAINING_STACK = f"""
import importlib.abc, sys
MISSING = {MISSING_ON_THE_GPU_IMAGE!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
from benchmarks.gpu import main
main(["--smoke", "--out", sys.argv[1]])
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(MISSING))
assert not loaded, f"imported {{loaded}}"
"""
ENV_KEYS = {"gpu", "torch", "transformers", "device", "time_utc"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-smoke")
    result = subprocess.run([sys.executable, "-c", SMOKE_WITHOUT_TRAINING_STACK, str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_smoke_writes_every_measurement(smoke):
    files = {name: json.loads((smoke / f"{name}.json").read_text()) for name in (*FILES, "run")}
    for name, payload in files.items():
        assert ENV_KEYS <= payload["env"].keys() and payload["env"]["device"] == "cpu", name
    run = files["run"]
    assert run["finished"] and run["settings"]["smoke"] and not run["settings"]["not_run"]
    assert set(files["prefill"]["results"]) == {"smoke llava", "smoke llava, second model", "smoke qwen2-vl"}
    for model, entry in files["prefill"]["results"].items():
        assert set(entry["results"]) == {"batch_1", "batch_4"}
        for res in entry["results"].values():
            assert [row["exit_layer"] for row in res["exits"]] == [0, 1, 2, 3, 4]  # k = 0, L/4, L/2, 3L/4, L
            assert res["exits"][-1]["realized_over_ideal"] == 1.0
            for row in res["exits"]:
                assert row["kv_cache_bytes"] == row["kv_cache_bytes_formula"], (model, row["exit_layer"])
                assert row["median_s"] > 0 and row["n"] == 2 and row["ideal_speedup"] >= 1
        assert "mixed" not in entry["results"]["batch_1"]
        assert entry["results"]["batch_4"]["mixed"]["exit_layers"] == [0, 1, 2, 3]
    assert set(files["decode"]["results"]) == {"smoke llava", "smoke llava, second model", "smoke qwen2-vl"}
    for res in files["decode"]["results"]["smoke llava"]["results"].values():
        # after 7 generated tokens the cache holds the prompt (16 text + 36 visual) and 6 fed-back tokens:
        # layers before k keep 58 keys, later layers 22
        for row in res["by_exit"]:
            k = row["exit_layer"]
            assert row["kv_ratio_vs_full"] == pytest.approx((k * 58 + (4 - k) * 22) / (4 * 58), rel=1e-12)
    (labels,) = files["labelling"]["results"]["smoke llava"]["results"].values()
    assert labels["labels"] == 2 * 5  # 2 samples x exit layers 0..4
    assert labels["dense"]["labels_per_s"] > 0 and labels["paper_scheme"]["labels_per_s"] > 0
    for res in files["head_overhead"]["results"]["smoke llava"]["results"].values():
        assert res["heads_evaluated"] == 3 and res["heads"]["median_s"] > 0
    summary = (smoke / "summary.md").read_text()
    for heading in ("## Prefill", "## Decode", "## Dense labels", "## Exit-head overhead", "## Targets"):
        assert heading in summary


def test_budget_stops_new_steps_and_still_writes_the_files(tmp_path):
    main(["--smoke", "--budget-minutes", "0", "--out", str(tmp_path)])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["finished"] and len(run["settings"]["not_run"]) == len(run["settings"]["plan"])
    assert all(not json.loads((tmp_path / f"{name}.json").read_text())["results"] for name in FILES)
