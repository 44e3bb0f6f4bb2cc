"""Every value a user sets in train.py / infer.py is checked at start-up, with an error naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dyvte import cli
from dyvte.configs import ConfigError, check_infer_config, check_train_config

ROOT = Path(__file__).resolve().parent.parent
cli.register_resolvers()


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_shipped_configs_pass():
    check_train_config(compose_config("train"))
    check_train_config(compose_config("train", "experiment=llava7b_paper", "data.json_path=x.json", "data.image_dir=d"))
    check_infer_config(compose_config("infer", "question=is there a red circle ?"))
    check_infer_config(compose_config("infer", "task=eval"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["head_training.hidden=-5"], r"head_training.hidden=-5: must be an integer >= 1"),
        (["head_training.lr=0"], r"head_training.lr=0.0: must be in \(0.0, inf\]"),  # typed by its schema: a float
        (["head_training.class_weights=[1.0]"], r"head_training.class_weights=\[1.0\]: must be null or"),
        (["labels.alpha=-1"], r"labels.alpha=-1.0: must be in \(0.0, inf\]"),
        (["labels.reference=gold"], r"labels.reference='gold': must be one of model, ground_truth"),
        (["labels.layers=[1,-2]"], r"labels.layers=\[1, -2\]: must be all, random or a list"),
        (["labels.batch_size=0"], r"labels.batch_size=0: must be an integer >= 1"),
        (["features.span=everything"], r"features.span='everything': must be one of after_first_visual, all_text"),
        (["validate.threshold=1.5"], r"validate.threshold=1.5: must be in \[0.0, 1.0\]"),
        (["validate.min_agreement=0"], r"validate.min_agreement=0.0: must be in \(0.0, 1.0\]"),
        (["validate.thresholds=[0.5,2]"], r"validate.thresholds=\[0.5, 2.0\]: must be a non-empty list"),
        (["validate.calibration=train"], r"validate.calibration='train': must be one of val, crossfit"),
        (["validate.folds=1"], r"validate.folds=1: must be an integer >= 2"),
        (["validate.threshold=0.9"], r"validate.decision='per_layer': calibrates one threshold per head: give "
                                     r"validate.threshold=auto, or validate.decision=global"),
        (["stages=[label]"], r"stages=\['label'\]: must be a non-empty list of labels, heads, validate"),
        (["stages=[validate]"], r"stages without heads validate heads trained before: set heads=DIR"),
        (["model.dtype=float8"], r"model.dtype='float8': must be one of float32, float16, bfloat16"),
        (["model.withdraw=audio"], r"model.withdraw='audio': must be one of both, images, videos"),
        (["data.fraction=0"], r"data.fraction=0.0: must be in \(0.0, 1.0\]"),
        (["data.limit=0"], r"data.limit=0: must be an integer >= 1 \(or null\)"),
        (["data.on_bad_sample=ignore"], r"data.on_bad_sample='ignore': must be one of skip, raise"),
        (["data=llava665k"], r"data.json_path is not set: the LLaVA instruction JSON"),
        (["data=hf"], r"data.path is not set: a `datasets` source"),
    ],
)
def test_bad_train_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_config("train", *overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=train"], r"task='train': must be one of sample, eval"),
        (["threshold=1.5"], r"threshold=1.5: must be in \[0, 1\]; pass force=true"),
        (["fastv.layer=0"], r"fastv.layer=0: must be an integer >= 1"),
        (["fastv.keep_ratio=2"], r"fastv.keep_ratio=2: must be in \[0.0, 1.0\]"),
        (["gsearch.queries=first"], r"gsearch.queries='first': must be one of text, last"),
        (["psigmoid.budget=-0.1"], r"psigmoid.budget=-0.1: must be in \[0.0, 1.0\]"),
        (["batch_size=0"], r"batch_size=0: must be an integer >= 1"),
        (["budget=[64,700]"], r"budget=\[64, 700\]: must be null or a list of budgets in \(0, budget_unit=576\]"),
        (["budget_methods=[fastv,prumerge]"], r"budget_methods=\['fastv', 'prumerge'\]: must be a non-empty list"),
        (["budget_methods=[vtw+dynamic]"], r"budget_methods=\['vtw\+dynamic'\]: must be a non-empty list.*composed"),
        (["budget_by=watts"], r"budget_by='watts': must be one of tokens, flops, prefill_ms"),
        (["vispruner.step=0"], r"vispruner.step=0: must be an integer >= 1"),
        (["cdpruner.keep_ratio=0"], r"cdpruner.keep_ratio=0: must be in \(0.0, 1.0\]"),
        (["sparsevlm.layers=[2,1,6]"], r"sparsevlm.layers=\[2, 1, 6\]: must be null or 3 increasing layers"),
        (["sparsevlm.keep_ratios=[0.5,2]"], r"sparsevlm.keep_ratios=\[0.5, 2\]: must be a non-empty list of shares"),
        (["downsample.keep_ratio=0.25"], r"downsample.keep_ratio=0.25: set downsample.factor=null"),
        (["tome.r=0.6"], r"tome.r=0.6: must be in \[0.0, 0.5\]"),
        (["visionzip.keep_ratio=0"], r"visionzip.keep_ratio=0: must be in \(0.0, 1.0\]"),
        (["pdrop.layers=[8,4]"], r"pdrop.layers=\[8, 4\]: must be null or an increasing list of layers >= 1"),
        (["dart.keep_ratio=1.5"], r"dart.keep_ratio=1.5: must be in \[0.0, 1.0\]"),
        (["sweep_thresholds=[0.5,1.2]"], r"sweep_thresholds=\[0.5, 1.2\]: must be a list of numbers in \[0, 1\]"),
        ([], r"task=sample needs question="),
    ],
)
def test_bad_infer_values_name_the_key(overrides, message):
    task = [] if any(o.startswith("task=") for o in overrides) or not overrides else ["task=eval"]
    with pytest.raises(ConfigError, match=message):
        check_infer_config(compose_config("infer", *task, *overrides))


def test_an_experiment_overrides_the_defaults_of_train_yaml():
    paper = compose_config("train", "experiment=llava7b_paper")
    assert paper.labels.batch_size == 8 and paper.head_training.hidden == 2048 and paper.data.source == "llava_json"
    assert paper.validate.decision == "global" and paper.validate.calibration == "val"  # the paper's decision rule
    testbed = compose_config("train", "head_training=paper")
    assert testbed.head_training.hidden == 256 and testbed.head_training.epochs == 40  # the testbed's head_schedule
    assert list(compose_config("train", "experiment=ablation").features.groups) == ["text", "visual", "attention",
                                                                                    "lens"]


def test_hf_data_refuses_the_json_keys():
    """`data=hf` reads no val_json_path / test_json_path / multi_turn (and `llava_json` no `datasets` columns):
    setting them is an error, not ignored."""
    for key, value in (("val_json_path", "v.json"), ("test_json_path", "t.json"), ("multi_turn", "true")):
        with pytest.raises(ConfigError, match=rf"data.{key}=.*: data.source=hf does not read it"):
            check_train_config(compose_config("train", "data=hf", "data.path=d", f"data.{key}={value}"))
    with pytest.raises(ConfigError, match=r"data.image_column='img': data.source=llava_json does not read it"):
        check_train_config(compose_config("train", "data.image_column=img"))


def test_a_value_of_the_wrong_type_fails_while_the_config_is_composed():
    """The sections' schemas (`dyvte.configs.SCHEMAS`) type every key: Hydra names the key and the type."""
    with pytest.raises(Exception, match=r"override head_training.epochs=1.5") as refused:
        compose_config("train", "head_training.epochs=1.5")
    assert "Value '1.5' of type 'float' could not be converted to Integer" in str(refused.value.__cause__)


def test_bad_value_stops_train_py_before_any_model_time(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "head_training.hidden=-5", "model.name_or_path=/nonexistent",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "head_training.hidden=-5: must be an integer >= 1" in result.stderr
    assert "Traceback" in result.stderr and "load_mllm" not in result.stderr  # stopped before loading the model
