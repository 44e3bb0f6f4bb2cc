"""A non-editable install (`pip install .`) finds the shipped testbed from any working directory."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_package_loads_the_testbed_from_elsewhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import dyvte; from dyvte.heads import ExitHeads; from dyvte.testbed import HEADS_DIR; "
            "model, processor = dyvte.load_mllm('testbed'); ExitHeads.from_pretrained(HEADS_DIR).check_fits(model); "
            "print(dyvte.__file__); print(model.config.model_type)")
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    location, model_type = result.stdout.split()[-2:]
    assert location.startswith(str(venv)), f"imported {location}, not the installed copy"
    assert model_type == "llava"
