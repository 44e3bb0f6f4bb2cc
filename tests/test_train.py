"""train.py end to end on a tiny random testbed-shaped checkpoint: labels cache, resume, sweeps, heads, validate."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from fixtures.tiny_testbed import save_tiny_testbed
from PIL import Image
from reference import llava_image_flops

from dyvte.data import BadSample, PromptCollator, read_llava_json
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.testbed import DATA_DIR as TESTBED_DATA_DIR
from dyvte.testbed.model import ModelConfig, build_model, build_processor
from dyvte.training.heads_module import head_labels, head_stat_scores, layer_metrics
from dyvte.training.pipeline import fit_heads, out_of_fold_probabilities
from dyvte.training.settings import HeadTrainingSettings
from dyvte.training.simulate import (
    choose_layer_thresholds,
    choose_threshold,
    exit_probabilities,
    family_static_exits,
    first_exit,
    first_safe_exit,
    score_exits,
    score_family_static,
)

ROOT = Path(__file__).resolve().parent.parent
TESTBED = TESTBED_DATA_DIR


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-testbed")
    save_tiny_testbed(path)
    return path


# The run that test_train_writes_heads_and_validate_json, test_heads_do_not_depend_on_whether_this_run_labelled and
# test_validate_stage_alone_validates_given_heads_quietly each read: trained once (`trained_run`).
TRAINED = ("data.limit=16", "data.eval_limit=8", "head_training.epochs=2", "head_training.hidden=16",
           "validate.thresholds=[0.5,0.9]")


@pytest.fixture(scope="module")
def trained_run(checkpoint, tmp_path_factory) -> tuple[tuple[str, ...], Path, Path, subprocess.CompletedProcess]:
    """One train.py run of all three stages with `TRAINED`: (its overrides but the run dir and the cache, its run
    dir, its label cache, the finished process). Tests read it; one that changes its cache works on a copy."""
    root = tmp_path_factory.mktemp("trained")
    common = (f"model.name_or_path={checkpoint}", *TRAINED)
    result = train(*common, f"cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}")
    return common, root / "run", root / "cache", result


def train(*overrides: str, cwd: Path = ROOT, wait: bool = True, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_shards(cache_dir: Path) -> datasets.Dataset:
    """Every shard of one label cache, by id (read directly, not through the `LabelStore` under test)."""
    shards = sorted(cache_dir.glob("shard-*"))
    return datasets.concatenate_datasets([datasets.load_from_disk(str(s)) for s in shards]).sort("id")


@pytest.mark.install_matrix
def test_train_writes_heads_and_validate_json(trained_run):
    _, run, _, _ = trained_run
    report = json.loads((run / "validate.json").read_text())
    for key in ("agreement", "accuracy", "flops_saved", "mean_exit_layer", "threshold", "heads", "families",
                "label_oracle", "family_static"):
        assert key in report
    assert len(report["heads"]) == 3 and len(report["static_sweep"]) == 4
    # every testbed sample has one 96 px image: 64 patches + CLS through one CLIP layer (16 wide, MLP 32), projector
    # 16 -> 32 -> 32, whatever the exit
    vision = llava_image_flops(96, 12, 1, 16, 32, 1, 32)
    for scored in (report, report["label_oracle"], *report["static_sweep"]):
        assert scored["vision_tflops"] * 1e12 == pytest.approx(vision, rel=1e-12)
        assert scored["total_tflops"] == pytest.approx(scored["lm_tflops"] + scored["vision_tflops"], rel=1e-12)
    assert report["static_sweep"][3]["lm_tflops"] == pytest.approx(report["full_lm_tflops"], rel=1e-12)
    assert report["static_sweep"][3]["agreement"] == 1.0 and report["static_sweep"][3]["flops_saved"] == 0.0
    heads = ExitHeads.from_pretrained(run / "heads")
    decided = list(heads.config.thresholds) if heads.config.thresholds else heads.threshold  # per head, or one
    assert heads.num_layers == 3 and decided == report["threshold"]
    assert (run / "logs").is_dir()  # the CSV logger


def test_multirun_sweep_reuses_labels(checkpoint, tmp_path):
    train("-m", f"model.name_or_path={checkpoint}", "data.limit=8", "data.eval_limit=4",
                   "trainer.fast_dev_run=true", "head_training.hidden=16,32", f"cache_dir={tmp_path / 'cache'}",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}")
    for job, hidden in ((0, 16), (1, 32)):
        assert ExitHeads.from_pretrained(tmp_path / "multirun" / str(job) / "heads").head_hidden == hidden
    assert len(list((tmp_path / "cache").iterdir())) == 3  # train, val, test caches, labelled once
    first, second = ((tmp_path / "multirun" / str(job) / "train.log").read_text() for job in (0, 1))
    assert "labels for train: labelling 8 samples" in first
    assert "labels for train: reusing the complete cache" in second


def test_heads_do_not_depend_on_whether_this_run_labelled(trained_run, tmp_path):
    """A fresh run (labels computed) and a rerun on its cache train the same heads: the label pass's random
    draws must not shift the heads' initialisation, or README numbers would not reproduce from a clean clone."""
    common, fresh_run, cache, _ = trained_run
    assert "labels for train: labelling" in (fresh_run / "train.log").read_text()
    train(*common, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'rerun'}")
    assert "labels for train: reusing" in (tmp_path / "rerun" / "train.log").read_text()
    fresh, rerun = (ExitHeads.from_pretrained(run / "heads").state_dict() for run in (fresh_run, tmp_path / "rerun"))
    assert all(torch.equal(fresh[name], rerun[name]) for name in fresh)


@pytest.mark.slow  # train.py killed mid-labelling and run twice more on 400 samples (test_faults kills in-process)
def test_interrupted_label_run_resumes_without_loss(checkpoint, tmp_path):
    # 200 batches: the signal lands while labelling goes on, however fast the machine
    args = [f"model.name_or_path={checkpoint}", "stages=[labels]", "data.limit=400", "data.eval_limit=2",
            "labels.batch_size=2", "labels.shard_size=2", f"hydra.run.dir={tmp_path / 'run'}"]
    cache = tmp_path / "cache"
    process = train(*args, f"cache_dir={cache}", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache.glob("*/shard-*")):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_with = {p.parent.name: len(list(p.parent.glob("shard-*"))) for p in cache.glob("*/shard-*")}
    assert killed_with, "the run was killed before its first shard"
    assert len(list(cache.glob("*/complete.json"))) < 3, "the run finished before it could be killed"

    train(*args, f"cache_dir={cache}")
    train(*args, f"cache_dir={tmp_path / 'fresh'}")
    for fresh_dir in (tmp_path / "fresh").iterdir():
        resumed_dir = cache / fresh_dir.name
        assert (resumed_dir / "complete.json").exists()
        resumed, fresh = load_shards(resumed_dir), load_shards(fresh_dir)
        assert resumed["id"] == fresh["id"]  # nothing lost, nothing twice
        assert resumed["labels"] == fresh["labels"]


@pytest.mark.slow  # train.py interrupted mid-labelling, then finishing 100 samples
def test_ctrl_c_says_what_was_saved(checkpoint, tmp_path):
    """Ctrl-C mid-labelling: one line says how many labelled samples are saved where; nothing is lost."""
    # 50 batches, so that the signal lands while labelling goes on
    args = [f"model.name_or_path={checkpoint}", "stages=[labels]", "data.limit=100", "data.eval_limit=2",
            "labels.batch_size=2", "labels.shard_size=4", f"hydra.run.dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}"]
    # a shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the run the default disposition, as a terminal's Ctrl-C finds it
    process = train(*args, wait=False, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "cache").glob("*/shard-*")):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait() != 0
    log = (tmp_path / "run" / "train.log").read_text()
    (line,) = [line for line in log.splitlines() if "interrupted (Ctrl-C)" in line]
    assert "saved in" in line and "rerun the same command to resume" in line
    train(*args[:-2], f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'rerun'}")
    rerun = (tmp_path / "rerun" / "train.log").read_text()
    assert "labels for train: resuming" in rerun or "labels for train: reusing the complete cache" in rerun


@pytest.mark.slow  # train.py on two DDP ranks beside one process
def test_ddp_label_run_writes_per_rank_shards_equal_to_one_process(checkpoint, tmp_path):
    """Two CPU ranks (gloo) label disjoint halves into their own shards; together they equal a one-process run,
    and only rank 0 writes the heads and validate.json."""
    args = [f"model.name_or_path={checkpoint}", "data.limit=8", "data.eval_limit=4", "head_training.epochs=1",
            "head_training.hidden=8", "labels.batch_size=2"]
    train(*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"cache_dir={tmp_path / 'ddp'}",
          f"hydra.run.dir={tmp_path / 'ddp-run'}")
    train(*args, f"cache_dir={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'one-run'}")
    for one_dir in (tmp_path / "one").iterdir():
        ddp_dir = tmp_path / "ddp" / one_dir.name
        assert {s.name.split("-")[1] for s in ddp_dir.glob("shard-*")} == {"r0", "r1"}
        ddp, one = load_shards(ddp_dir), load_shards(one_dir)
        assert ddp["id"] == one["id"] and ddp["labels"] == one["labels"] and ddp["answer"] == one["answer"]
        assert torch.allclose(torch.tensor(ddp["features"]), torch.tensor(one["features"]), atol=2e-3)
    run = tmp_path / "ddp-run"
    assert (run / "train.log").read_text().count("validate (test split)") == 1
    assert "validate (test split)" not in (run / "train_ddp_process_1.log").read_text()
    assert (run / "validate.json").exists()
    ExitHeads.from_pretrained(run / "heads")


def test_bad_samples_are_skipped_or_raised(checkpoint, tmp_path):
    Image.new("RGB", (96, 96), "white").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    records = [
        {"id": "ok", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhow many objects ?"},
                                                          {"from": "gpt", "value": "0"}]},
        {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                 {"from": "gpt", "value": "a"}]},
        {"id": "corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                    {"from": "gpt", "value": "a"}]},
        {"id": "no-image-token", "image": "ok.png", "conversations": [{"from": "human", "value": "q"},
                                                                      {"from": "gpt", "value": "a"}]},
        {"id": "empty-answer", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                                    {"from": "gpt", "value": " "}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples = read_llava_json(tmp_path / "data.json", tmp_path)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    batch = PromptCollator(processor)(samples)
    assert [s.id for s in batch["samples"]] == ["ok"]
    reasons = {s["id"]: s["reason"] for s in batch["skipped"]}
    assert reasons["missing"].startswith("image not found") and "cannot be read" in reasons["corrupt"]
    assert "no <image> placeholder" in reasons["no-image-token"] and reasons["empty-answer"] == "the answer is empty"
    with pytest.raises(BadSample, match="sample 'missing': image not found"):
        PromptCollator(processor, on_bad_sample="raise")(samples)

    train(f"model.name_or_path={checkpoint}", "stages=[labels]", f"data.json_path={tmp_path / 'data.json'}",
          f"data.image_dir={tmp_path}", "data.val_json_path=null", "data.test_json_path=null",
          f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    (cache_dir,) = (tmp_path / "cache").iterdir()
    skipped = [json.loads(line)["id"] for line in (cache_dir / "skipped.jsonl").read_text().splitlines()]
    assert sorted(skipped) == ["corrupt", "empty-answer", "missing", "no-image-token"]
    assert datasets.load_from_disk(str(next(cache_dir.glob("shard-*"))))["id"] == ["ok"]


def test_heads_refuse_another_model(checkpoint):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    ExitHeads(ExitHeadsConfig(32, 3, 8, model="a", revision="r1")).check_fits(model, "a", "r1")
    with pytest.raises(ValueError, match="hidden size 64 vs the model's 32; 4 layers vs the model's 3"):
        ExitHeads(ExitHeadsConfig(64, 4, 8)).check_fits(model)
    with pytest.raises(ValueError, match="trained on revision 'r1', not 'r2'"):
        ExitHeads(ExitHeadsConfig(32, 3, 8, model="a", revision="r1")).check_fits(model, "a", "r2")


def test_heads_of_a_local_checkpoint_follow_its_weights(checkpoint, tmp_path):
    """Same weights under another path fit; retrained weights under the same name are refused."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(checkpoint).glob("*.safetensors"))))
    heads = ExitHeads(ExitHeadsConfig(32, 3, 8, model="testbed", weights_sha256=digest.hexdigest()))
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)
    heads.check_fits(model, str(copy))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    retrained = tmp_path / "retrained"
    model.save_pretrained(retrained)
    with pytest.raises(ValueError, match="sha256 .*train the heads again"):
        heads.check_fits(model, str(retrained))


def cache_rows(labels, match, accurate, families) -> datasets.Dataset:
    """A label-cache-shaped dataset (per exit layer 0..L) with the columns the simulation reads."""
    rows = {"labels": labels, "match": match, "accurate": accurate, "family": families,
            "n_text": [10] * len(labels), "n_visual": [64] * len(labels), "vision_flops": [1000] * len(labels)}
    bools = datasets.Sequence(datasets.Value("bool"))
    return datasets.Dataset.from_dict(rows).cast_column("match", bools).cast_column("accurate", bools)


def test_global_validation_of_reloaded_per_head_heads_saves_one_threshold(trained_run, tmp_path):
    """`stages=[validate] heads=DIR validate.decision=global` on heads that hold per-head thresholds: the heads
    saved must hold the one global threshold chosen, not the old per-head ones (which inference would use)."""
    common, run_dir, cache, _ = trained_run
    assert ExitHeads.from_pretrained(run_dir / "heads").config.thresholds is not None
    train(*common, f"cache_dir={cache}", "stages=[validate]", f"heads={run_dir / 'heads'}", "validate.decision=global",
          "validate.calibration=val", f"hydra.run.dir={tmp_path / 'global'}")
    heads = ExitHeads.from_pretrained(tmp_path / "global" / "heads")
    report = json.loads((tmp_path / "global" / "validate.json").read_text())
    assert heads.config.thresholds is None and heads.config.threshold == report["threshold"]


def test_exit_flips_by_hand():
    """Four samples, L = 2, each exiting at layer 1: the full model (k = 2) right / wrong against the exit right /
    wrong gives one of each flip; accuracy moves by wrong_to_correct - correct_to_wrong."""
    dataset = cache_rows(
        labels=[[0, 1, 1]] * 4,
        match=[[0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]],
        accurate=[[0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 0, 0]],
        families=["a"] * 4,
    )
    config = build_model(build_processor(), ModelConfig(num_layers=2)).config
    scores = score_exits(dataset, torch.tensor([1, 1, 1, 1]), config)
    assert scores["changed"] == 0.5  # samples 1 and 2 change their answer
    assert scores["correct_to_wrong"] == 0.25 and scores["wrong_to_correct"] == 0.25  # sample 1, sample 2
    assert scores["accuracy"] == pytest.approx(scores["full_accuracy"] - 0.25 + 0.25)


def test_label_oracle_exits_at_each_samples_first_safe_label():
    """Hand-made labels for L = 3: the oracle exit is the first safe exit layer >= 1 (exit 0 has no head)."""
    dataset = cache_rows(
        labels=[[1, 0, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]],
        match=[[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]],
        accurate=[[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]],
        families=["a", "a", "b"],
    )
    assert first_safe_exit(dataset).tolist() == [2, 1, 3]
    config = build_model(build_processor(), ModelConfig(num_layers=3)).config
    oracle = score_exits(dataset, first_safe_exit(dataset), config)
    assert oracle["agreement"] == 1.0 and oracle["mean_exit_layer"] == 2.0
    assert oracle["accuracy"] == pytest.approx(2 / 3) and 0.0 < oracle["flops_saved"] < 1.0


def test_family_static_exit_is_each_familys_earliest_layer_keeping_agreement():
    """Family a agrees on 2/2 from exit 1 on, b on 1/2 at exit 1 and 2/2 from exit 2; c is unseen in calibration."""
    always = [[1, 1, 1, 1]] * 2
    calibration = cache_rows(
        labels=always * 2,
        match=[[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]],
        accurate=always * 2,
        families=["a", "a", "b", "b"],
    )
    assert family_static_exits(calibration, min_agreement=1.0) == {"a": 1, "b": 2}
    assert family_static_exits(calibration, min_agreement=0.5) == {"a": 1, "b": 1}
    held_out = cache_rows(
        labels=always + [[1, 1, 1, 1]],
        match=[[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]],
        accurate=always + [[1, 1, 1, 1]],
        families=["a", "b", "c"],
    )
    config = build_model(build_processor(), ModelConfig(num_layers=3)).config
    report = score_family_static(calibration, held_out, config, min_agreement=1.0)
    assert report["mean_exit_layer"] == pytest.approx((1 + 2 + 3) / 3)
    assert report["agreement"] == pytest.approx(2 / 3)  # only b changes its answer (at exit 2); c runs in full


@pytest.mark.slow
def test_validate_stage_alone_validates_given_heads_quietly(trained_run, tmp_path):
    """`stages=[validate] heads=DIR` validates trained heads on the cached labels (it did nothing before), with
    the threshold grid from the config; and a run prints one progress bar per stage and dyvte's lines only."""
    trained, full_run, trained_cache, full = trained_run
    shutil.copytree(trained_cache, tmp_path / "cache")  # this test damages its cache
    common = (*trained, f"cache_dir={tmp_path / 'cache'}")
    alone = train(*common, "stages=[validate]", f"heads={full_run / 'heads'}", f"hydra.run.dir={tmp_path / 'alone'}")
    report = json.loads((full_run / "validate.json").read_text())
    assert [point["threshold"] for point in report["threshold_sweep_calibration"]] == [0.5, 0.9]
    assert (tmp_path / "alone" / "validate.json").read_text() == (full_run / "validate.json").read_text()
    assert "labelling" not in (tmp_path / "alone" / "train.log").read_text()
    output = full.stdout + full.stderr
    for noise in ("Saving the dataset", "Tip:", "Total FLOPs", "GPU available", "Loading weights", "Seed set"):
        assert noise not in output, noise
    assert "Loading weights" not in alone.stdout + alone.stderr

    # a finished cache that lost one test shard is refused by name before model time, never used short (it was:
    # exit 0 and a validate.json over half the test set); the labels stage relabels that shard alone
    (test_cache,) = [p.parent for p in (tmp_path / "cache").glob("*/meta.json")
                     if json.loads(p.read_text())["split"] == "test"]
    shard = sorted(test_cache.glob("shard-*"))[0]
    shutil.rmtree(shard)
    refused = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, "stages=[validate]",
                              f"heads={full_run / 'heads'}", f"hydra.run.dir={tmp_path / 'refused'}"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0
    assert f"{shard} is missing" in refused.stderr
    assert f"python -m dyvte.label_cache repair {test_cache}" in refused.stderr
    train(*common, "stages=[labels,validate]", f"heads={full_run / 'heads'}",
          f"hydra.run.dir={tmp_path / 'relabelled'}")
    log = (tmp_path / "relabelled" / "train.log").read_text()
    assert f"{shard} is missing; removed, its samples are labelled again" in log
    assert "labels for train: reusing the complete cache" in log
    assert (tmp_path / "relabelled" / "validate.json").read_text() == (full_run / "validate.json").read_text()


def test_head_metrics_by_hand():
    """Per head: accuracy, precision, recall and positive rate of the exit class, unlabelled (-1) entries left out."""
    predictions = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])  # p_exit > 0.5 per (sample, head)
    labels = torch.tensor([[1, -1], [0, 1], [1, 1], [0, 0]])
    stats = head_stat_scores(2, sync_on_compute=False)
    stats.update(predictions, labels)
    head0, head1 = layer_metrics(stats.compute())
    # head 0: tp 1 (sample 0), fp 1 (sample 1), fn 1 (sample 2), tn 1 (sample 3)
    assert head0 == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "positive_rate": 0.5}
    # head 1, samples 1-3: tp 2, tn 1
    assert head1 == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "positive_rate": pytest.approx(2 / 3)}


def test_monotone_labels_are_safe_from_here_on():
    """Head i is labelled by exit i + 1; monotone: that exit and every later one are safe."""
    dataset = cache_rows(
        labels=[[0, 1, 0, 1, 1], [1, 0, 1, 1, 1], [0, 0, 0, 0, 1]],
        match=[[1] * 5] * 3, accurate=[[1] * 5] * 3, families=["a"] * 3,
    )
    assert head_labels(dataset).tolist() == [[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    assert head_labels(dataset, "monotone").tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    # `match`: the answer kept, whatever the cross-entropy (sample 0 keeps it from exit 1 on, but its CE is within
    # the margin only at exits 1 and 4); unlabelled exits stay unlabelled
    kept = cache_rows(
        labels=[[0, 1, 0, 0, 1], [0, -1, 1, 1, 1]], match=[[0, 1, 1, 1, 1], [1, 0, 1, 1, 1]],
        accurate=[[1] * 5] * 2, families=["a"] * 2,
    )
    assert head_labels(kept, target="match").tolist() == [[1, 1, 1, 1], [-1, 1, 1, 1]]
    assert head_labels(kept.select([0]), "monotone", "safe").tolist() == [[0, 0, 0, 1]]
    assert head_labels(kept.select([0]), "monotone", "match").tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="every exit layer labelled"):
        head_labels(cache_rows(labels=[[0, -1, 1, 1, 1]], match=[[1] * 5], accurate=[[1] * 5], families=["a"]),
                    "monotone")


def test_per_layer_thresholds_by_hand():
    """Four samples, L = 3 (heads 0, 1, 2 -> exits 1, 2, 3), grid 0.5 / 0.7 / 0.9, every answer must be kept. One
    global threshold: 0.7 (at 0.5 head 0 would also send out sample 1, whose answer changes at exit 1). Per head,
    from 0.7: lowering head 0 to 0.5 sends sample 1 out too early; lowering head 1 to 0.5 sends sample 2 out at
    exit 2, where its answer holds, and saves FLOPs; nothing lower is left, so (0.7, 0.5, 0.7)."""
    p_exit = torch.tensor([[0.8, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 0.6]])
    dataset = cache_rows(
        labels=[[1] * 4] * 4,
        match=[[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]],
        accurate=[[1] * 4] * 4, families=["a"] * 4,
    )
    config = build_model(build_processor(), ModelConfig(num_layers=3)).config
    grid = [0.5, 0.7, 0.9]
    assert choose_threshold(p_exit, dataset, config, 1.0, grid)[0] == 0.7
    chosen = choose_layer_thresholds(p_exit, dataset, config, 1.0, grid, start=0.7)
    assert chosen == (0.7, 0.5, 0.7)
    assert first_exit(p_exit, torch.tensor(chosen)).tolist() == [1, 2, 2, 3]
    assert choose_layer_thresholds(p_exit, dataset, config, 0.75, grid, start=0.5) == (0.5, 0.5, 0.5)


def test_out_of_fold_scores_come_from_heads_that_did_not_see_the_row(tmp_path):
    """Noise labels on features unique to each row: heads memorise the rows they train on (their own scores fit
    the labels) but cannot predict a row they never saw, so the out-of-fold scores of `validate.calibration=crossfit`
    are at chance; a fold leaking into its own heads would fit here too."""
    n, num_layers, d = 96, 3, 4
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n, num_layers + 1), generator=generator)
    labels[:, -1] = 1  # exit L is the full model
    dataset = cache_rows(labels.tolist(), match=labels.tolist(), accurate=labels.tolist(), families=["a"] * n)
    dataset = dataset.add_column("features", torch.randn(n, num_layers, 2 * d, generator=generator).tolist())
    config = ExitHeadsConfig(d, num_layers, 128)
    training = HeadTrainingSettings(hidden=128, lr=1e-2, weight_decay=0.0, epochs=300, batch_size=n,
                                    inputs=["mean_text", "last_text"], architecture="per_layer",
                                    label_shape="per_layer", label_target="safe", decision="global",
                                    calibration="crossfit")
    trainer = {"accelerator": "cpu", "devices": 1}
    target = head_labels(dataset).float()[:, :-1]  # the last head's exit is the full model: always safe

    def accuracy(p_exit):
        return float(((p_exit[:, :-1] > 0.5).float() == target).float().mean())

    in_sample = exit_probabilities(fit_heads(training, config, dataset, None, tmp_path, seed=0, trainer=trainer,
                                             fold=True), dataset)
    out_of_fold = out_of_fold_probabilities(training, config, dataset, tmp_path, folds=3, seed=0, trainer=trainer)
    assert accuracy(in_sample) > 0.95
    assert 0.3 < accuracy(out_of_fold) < 0.7


def test_crossfit_with_too_few_train_rows_names_the_key(tmp_path):
    dataset = cache_rows([[0, 1, 1]] * 2, match=[[0, 1, 1]] * 2, accurate=[[0, 1, 1]] * 2, families=["a"] * 2)
    with pytest.raises(ValueError, match=r"validate.folds=3 needs at least 3 train rows to cross-fit, and the train "
                                         r"split has 2"):
        out_of_fold_probabilities(None, ExitHeadsConfig(4, 2, 8), dataset, tmp_path, folds=3, seed=0, trainer={})
