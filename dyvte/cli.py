"""What the Hydra entry points (`train.py`, `infer.py`, `analyze.py`) share: the `${dyvte_testbed:...}` resolver,
the `-v` flag and quiet library logging.

Quiet by default: one progress bar per stage and dyvte's own log lines. `-v` (or `verbose=true`) brings back
Lightning's device lines, tips and model summary.
"""

import logging
import sys
import warnings

import transformers
from omegaconf import OmegaConf

from .extras import check_installed
from .testbed import DATA_DIR

# Lightning loggers whose package is an extra (the default CSV logger needs nothing): the module and the extra.
LOGGER_EXTRAS = {
    "lightning.pytorch.loggers.WandbLogger": ("wandb", "wandb"),
    "lightning.pytorch.loggers.TensorBoardLogger": ("tensorboard", "tensorboard"),
}
NOISY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
# Library warnings about the libraries' own internals, which a user of dyvte cannot act on.
NOISY_WARNING_MODULES = (r"lightning\..*", r"pyarrow\..*")


def register_resolvers() -> None:
    """`${dyvte_testbed:train.json}` is a file of the shipped testbed (package data)."""
    if not OmegaConf.has_resolver("dyvte_testbed"):
        OmegaConf.register_new_resolver("dyvte_testbed", lambda relative: str(DATA_DIR / relative))


def check_logger_installed(logger) -> None:
    """`logger=wandb` without wandb (or `logger=tensorboard` without tensorboard) fails at start-up naming the extra,
    not after the labels when Lightning builds the logger."""
    target = logger.get("_target_") if logger else None
    if target in LOGGER_EXTRAS:
        module, extra = LOGGER_EXTRAS[target]
        check_installed(module, extra, f"logger={extra}")


def verbose_flag() -> None:
    """`-v` on the command line is the override `verbose=true` (Hydra itself knows no such flag)."""
    if "-v" in sys.argv[1:]:
        sys.argv = [arg for arg in sys.argv if arg != "-v"] + ["verbose=true"]


def quiet_libraries(verbose: bool) -> None:
    """Lightning's per-trainer info lines (devices, tips), its and pyarrow's warnings about their internals and
    transformers' weight-loading bar only when `verbose`."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # bitsandbytes warns on every 8-bit matmul of a CPU run that it casts the input to fp16
    logging.getLogger("bitsandbytes").setLevel(logging.INFO if verbose else logging.ERROR)
    if verbose:
        return
    transformers.utils.logging.disable_progress_bar()
    for module in NOISY_WARNING_MODULES:
        warnings.filterwarnings("ignore", module=module)
