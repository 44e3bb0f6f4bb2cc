"""Running dyvte wrongly for its install: an optional extra missing, or an unsupported Python, fails naming the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dyvte import cli
from dyvte.loading import quantization_config
from dyvte.policies import search

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_logger_without_its_package_names_the_extra(logger, monkeypatch):
    monkeypatch.setitem(sys.modules, logger, None)  # as if not installed
    config = OmegaConf.load(ROOT / "dyvte" / "conf" / "logger" / f"{logger}.yaml")
    with pytest.raises(ImportError, match=rf'logger={logger} needs {logger}, .*pip install "dyvte\[{logger}\]"'):
        cli.check_logger_installed(config)


def test_default_logger_needs_no_extra(monkeypatch):
    for module in ("wandb", "tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)
    cli.check_logger_installed(OmegaConf.load(ROOT / "dyvte" / "conf" / "logger" / "csv.yaml"))


def test_searches_without_optuna_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r'g_search .* needs optuna, .*pip install "dyvte\[search\]"'):
        search._optuna("g_search (G-Search's keep rates)")


def test_quantization_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r'bitsandbytes is not installed: pip install "dyvte\[quant\]"'):
        quantization_config("4bit")


def test_unsupported_python_is_refused_naming_the_versions():
    code = "import sys; sys.version_info = (3, 9, 18, 'final', 0); import dyvte"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert "ImportError: dyvte needs Python 3.10 or newer (3.10 to 3.13 are tested)" in result.stderr
    assert "torch" not in result.stderr  # refused before anything heavy is imported


def test_server_without_its_extra_names_it():
    """`python serve.py` where litserve is not installed (`None` in sys.modules: what the import system reports for a
    module that is absent) stops naming the `serve` extra, not with litserve's ModuleNotFoundError."""
    code = ("import runpy, sys; sys.modules['litserve'] = None; sys.argv = ['serve.py']; "
            "runpy.run_path('serve.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert 'needs litserve, which is not installed: pip install "dyvte[serve]"' in result.stderr
    assert "ModuleNotFoundError" not in result.stderr
