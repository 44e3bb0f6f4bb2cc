"""Smoke test of `python -m benchmarks.run --quick`: it runs end to end and writes the documented JSON schema."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root holds `benchmarks/`

from benchmarks.run import FILES, main  # noqa: E402

ENV_KEYS = {"torch", "transformers", "cpu_model", "torch_threads", "machine_load_at_start", "time_utc"}
SHAPE_KEYS = {"hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "num_layers",
              "n_visual", "n_text", "dtype"}
STATS = {"median_s", "min_s", "max_s", "n"}


def test_quick_benchmark_writes_schema(tmp_path):
    out = main(["--quick", "--out", str(tmp_path)])
    files = {name: json.loads((out / f"{name}.json").read_text()) for name in FILES}
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["settings"]["quick"]
    assert "## Targets" in (out / "summary.md").read_text()
    for name, payload in files.items():
        assert ENV_KEYS <= payload["env"].keys(), name
        assert payload["results"], f"{name}.json holds no results"
        for model, entry in payload["results"].items():
            if name != "head_training":
                assert SHAPE_KEYS <= entry["shape"].keys(), (name, model)

    for entry in files["prefill"]["results"].values():
        assert {"batch_1", "batch_8"} <= entry.keys()
        for key in ("batch_1", "batch_8"):
            res = entry[key]
            assert STATS <= res["full"].keys() and res["full"]["n"] >= 3
            assert [e["exit_layer"] for e in res["exits"]] == [1, 2, 3]
            for e in res["exits"]:
                assert STATS <= e.keys() and e["ideal_speedup"] > 1
                assert {"realized_speedup", "realized_over_ideal", "target_0.9_holds"} <= e.keys()
                assert abs(e["kv_ratio_vs_full"] - e["kv_ratio_expected"]) < 1e-6  # padding-free: exact
    for entry in files["mixed_batch"]["results"].values():
        res = entry["batch_8"]
        assert len(res["exit_layers"]) == 8 and {"batched", "one_by_one", "realized_over_ideal"} <= res.keys()
    for entry in files["decode"]["results"].values():
        res = entry["batch_1"]
        assert res["target_kv_bytes_holds"]
        for r in res["by_exit"].values():
            assert r["generated_tokens"] == res["new_tokens"]  # min_new_tokens: EOS cannot stop early
            assert STATS <= r["ms_per_token"].keys()
    for entry in files["head_overhead"]["results"].values():
        assert entry["batch_1_hidden_2048"]["heads_evaluated_per_prefill"] == 3
    for entry in files["labelling"]["results"].values():
        res = entry["batch_1"]
        assert res["full_branch_reproduces_reference"]
        assert res["dense"]["s_per_label"] > 0 and res["naive"]["s_per_label"] > 0
    (fit,) = files["head_training"]["results"].values()
    assert fit["fit"]["samples_per_s"] > 0
    assert {t["target"] for t in run["targets"]} >= {"prefill realized/ideal >= 0.9",
                                                     "dense labelling >= 10x cheaper per label than naive"}
