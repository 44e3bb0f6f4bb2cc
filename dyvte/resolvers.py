"""OmegaConf resolvers used by `conf/`: `${dyvte_data:testbed/train.json}` is a path inside the shipped data."""

from pathlib import Path

from omegaconf import OmegaConf

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def register() -> None:
    if not OmegaConf.has_resolver("dyvte_data"):
        OmegaConf.register_new_resolver("dyvte_data", lambda relative: str(DATA_DIR / relative))
