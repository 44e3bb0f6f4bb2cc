"""The shipped testbed: procedural visual QA, a tiny LLaVA trained on it, and exit heads trained on that model.

Its files are package data under `dyvte/testbed/data/` (`model/`, `heads/`, `{train,val,test}.json`, `images/`),
found through `importlib.resources`, so an installed dyvte finds them from any working directory.
"""

from importlib.resources import files
from pathlib import Path

DATA_DIR = Path(str(files(__name__) / "data"))
MODEL_DIR = DATA_DIR / "model"
HEADS_DIR = DATA_DIR / "heads"
