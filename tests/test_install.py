"""dyvte as a user installs it: a wheel in a fresh virtualenv, used from a folder that is not the checkout.

The wheel is built from a copy of the package's sources, installed without dependencies into a new venv that sees
this environment's packages (torch, transformers, ...) through a .pth file, so the test works from a system
Python, a venv or a CI venv alike, and never imports the checkout. `import dyvte` in a subprocess also shows what
the inference path pulls in.
"""

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fixtures.environments import venv_seeing_this_environment

try:
    import tomllib
except ImportError:  # Python 3.10 (pytest brings tomli there)
    import tomli as tomllib

from fixtures.tiny_testbed import save_tiny_testbed

ROOT = Path(__file__).resolve().parent.parent
# Packages the inference path (import dyvte, every policy, VisualExit / ExitHeads / DynamicExit) must not import.
TRAINING_STACK = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "datasets", "wandb", "matplotlib", "optuna",
                  "tensorboard", "torchmetrics")


# Imported by dyvte but installed on its own, as docs/design.md says (its declared dependencies would replace torch).
INSTALLED_SEPARATELY = {"lmms_eval"}


def clean_env() -> dict:
    """This environment without PYTHONPATH, so a subprocess imports dyvte from where it is installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(command: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                            **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the sources (the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "dyvte", source / "dyvte", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, source], cwd=source)
    (built,) = dist.glob("dyvte-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed (no dependencies) and this environment's site-packages on its path."""
    venv = tmp_path_factory.mktemp("venv")
    python = venv_seeing_this_environment(venv)
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=venv)
    return venv


@pytest.mark.install_matrix
def test_wheel_holds_the_configs_and_the_testbed(wheel):
    """Every config under dyvte/conf and every testbed file of the checkout is in the wheel."""
    package = ROOT / "dyvte"
    expected = {str(p.relative_to(ROOT)) for p in (package / "conf").rglob("*.yaml")}
    expected |= {str(p.relative_to(ROOT)) for p in (package / "testbed" / "data").rglob("*") if p.is_file()}
    assert any(name.endswith("train.yaml") for name in expected) and any("heads" in name for name in expected)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert expected <= names, sorted(expected - names)[:10]


@pytest.mark.slow
@pytest.mark.install_matrix
def test_installed_package_loads_the_testbed_from_elsewhere(venv, tmp_path):
    code = ("import dyvte; from dyvte.heads import ExitHeads; from dyvte.testbed import HEADS_DIR; "
            "model, processor = dyvte.load_mllm('testbed'); ExitHeads.from_pretrained(HEADS_DIR).check_fits(model); "
            "print(dyvte.__file__); print(model.config.model_type)")
    location, model_type = run([venv / "bin" / "python", "-c", code], cwd=tmp_path).stdout.split()[-2:]
    assert Path(location).is_relative_to(venv), f"imported {location}, not the installed copy"
    assert model_type == "llava"


@pytest.mark.slow
@pytest.mark.install_matrix
def test_installed_console_script_trains_in_an_empty_folder(venv, tmp_path):
    """`dyvte-train` from the wheel, in a folder with nothing in it: the packaged configs, all three stages."""
    checkpoint = tmp_path / "tiny-testbed"
    save_tiny_testbed(checkpoint)
    empty = tmp_path / "empty"
    empty.mkdir()
    run([venv / "bin" / "dyvte-train", f"model.name_or_path={checkpoint}", "data.limit=16", "data.eval_limit=8",
         "head_training.epochs=2", "head_training.hidden=16", "hydra.run.dir=run"], cwd=empty)
    report = json.loads((empty / "run" / "validate.json").read_text())
    assert report["split"] and len(report["heads"]) == 3
    assert (empty / "run" / "heads" / "config.json").is_file()


@pytest.mark.install_matrix
def test_inference_path_imports_no_training_stack():
    """`import dyvte`, every policy, and VisualExit / ExitHeads / DynamicExit built and generating load none of the
    training and logging stack (in a fresh interpreter from the checkout, so no other test's imports can hide one)."""
    code = f"""
import json, sys
from PIL import Image
import dyvte
from dyvte.policies import *
from dyvte import DynamicExit, ExitHeads, VisualExit, load_mllm
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR, HEADS_DIR
model, processor = load_mllm("testbed")
engine = VisualExit(model)
policy = DynamicExit(ExitHeads.from_pretrained(HEADS_DIR))
image = Image.open(DATA_DIR / "images" / "test_00000.png").convert("RGB")
inputs = processor(images=[image], text=[chat_prompt(processor, "what digit is on the purple diamond ?")],
                   return_tensors="pt")
engine.generate(**inputs, policy=policy, max_new_tokens=2)
print(json.dumps(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules)))
"""
    result = run([sys.executable, "-c", code], cwd=ROOT)
    assert json.loads(result.stdout.splitlines()[-1]) == []


@pytest.mark.install_matrix
def test_every_third_party_import_is_declared():
    """Each module dyvte imports (read from its source) belongs to a distribution pyproject.toml lists, as a
    dependency or in an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    modules = set()
    for path in (ROOT / "dyvte").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"dyvte"} - INSTALLED_SEPARATELY
    assert {"torch", "transformers", "packaging", "PIL"} <= third_party
    distributions = importlib.metadata.packages_distributions()
    undeclared = {m for m in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & declared}
    assert not undeclared, f"imported but not in pyproject.toml: {sorted(undeclared)}"
