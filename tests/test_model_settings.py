"""Every model setting of the command line reaches the loaded model, from each entry point.

`train.py`, `infer.py`, `analyze.py` and `serve.py` run their real `main` on their real config composition, with
the model's `from_pretrained` replaced by a recorder that stops the run where the weights would be read; what it
received is compared with what the command line said (written out by hand below). The server's model worker is
started in this process (LitServe's server replaced by one that only runs the worker's setup).
"""

import signal
import socket
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from dyvte import analyze, infer, loading, serve, train
from dyvte.configs import read_model_settings

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = ["model.dtype=bfloat16", "model.attn_implementation=eager", "model.quantization=8bit",
            "model.llm_int8_threshold=0", "model.revision=v0.1"]
# Hydra keeps the process's logging and writes no .hydra folder; the run dir is the test's.
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null"]


class WeightsRead(Exception):
    """Raised where the model's weights would be read."""


@pytest.fixture
def received(monkeypatch):
    """`(path, kwargs)` of every `from_pretrained` call of the model; the first one stops the run."""
    calls = []

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append((path, kwargs))
            raise WeightsRead

    monkeypatch.setattr(loading, "AutoModelForImageTextToText", Recorder)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the task's exception, not Hydra's report and exit
    yield calls
    GlobalHydra.instance().clear()


def run_main(module, monkeypatch, tmp_path, *overrides: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *SETTINGS, *overrides, *QUIET,
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(WeightsRead):
        module.main()


def assert_settings_reached(received) -> None:
    ((path, kwargs),) = received
    assert path == str(loading.TESTBED_MODEL_DIR)
    assert kwargs["dtype"] == "bfloat16" and kwargs["attn_implementation"] == "eager"
    assert kwargs["revision"] == "v0.1"
    quantization = kwargs["quantization_config"]
    assert quantization.load_in_8bit and not quantization.load_in_4bit
    assert quantization.llm_int8_threshold == 0.0


def test_train_loads_the_model_it_is_told(received, monkeypatch, tmp_path):
    run_main(train, monkeypatch, tmp_path, f"cache_dir={tmp_path / 'cache'}")
    assert_settings_reached(received)


def test_infer_loads_the_model_it_is_told(received, monkeypatch, tmp_path):
    run_main(infer, monkeypatch, tmp_path, "task=eval", "policies=[none]")
    assert_settings_reached(received)


def test_analyze_loads_the_model_it_is_told(received, monkeypatch, tmp_path):
    run_main(analyze, monkeypatch, tmp_path, "analysis.policy=none")
    assert_settings_reached(received)


def test_serve_loads_the_model_it_is_told(received, monkeypatch, tmp_path):
    class WorkerSetupOnly:
        """LitServe's server as far as the model worker's setup, in this process."""

        uvicorn_graceful_timeout = 1

        def __init__(self, api, **kwargs):
            self.api = api
            self.app = FastAPI()  # serve.main installs its error handlers on it

        def run(self, **kwargs):
            self.api.setup("cpu")

    monkeypatch.setattr(serve.ls, "LitServer", WorkerSetupOnly)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        run_main(serve, monkeypatch, tmp_path, f"port={port}", "policy=none", "policies=[none]")
    finally:
        for number, handler in handlers.items():  # serve's main and the worker's setup set their own
            signal.signal(number, handler)
    assert_settings_reached(received)


def test_a_users_model_config_gets_the_schemas_defaults_and_types(tmp_path):
    """A model config of the user's own (`hydra.searchpath`) that states only its checkpoint and dtype gets the
    other settings' defaults; a value of the wrong type is refused while the config is composed, naming the key."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name_or_path: org/mine\ndtype: bfloat16\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "model=mine"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        settings = read_model_settings(compose("infer", overrides=overrides))
        assert (settings.name_or_path, settings.dtype, settings.quantization) == ("org/mine", "bfloat16", None)
        assert (settings.attn_implementation, settings.llm_int8_threshold, settings.withdraw) == ("sdpa", 6.0, "both")
        assert settings.head_schedule.hidden == 2048
        with pytest.raises(ConfigCompositionException) as refused:
            compose("infer", overrides=[*overrides, "model.llm_int8_threshold=high"])
    assert "model.llm_int8_threshold" in str(refused.value.__cause__)
