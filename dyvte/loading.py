"""One entry point for the models dyvte runs on: the shipped testbed, a local checkpoint or a Hub id."""

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .testbed import MODEL_DIR as TESTBED_MODEL_DIR


def resolve_model_path(name_or_path: str) -> str:
    """`"testbed"` is the shipped checkpoint (package data, so any working directory works)."""
    if name_or_path == "testbed":
        if not (TESTBED_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"no testbed checkpoint at {TESTBED_MODEL_DIR}; run `python -m dyvte.testbed.pretrain` to build it"
            )
        return str(TESTBED_MODEL_DIR)
    return str(name_or_path)


def model_identity(name_or_path: str, revision: str | None) -> dict:
    """What makes labels from this model reusable: its name and revision, and for a local checkpoint its weights."""
    identity = {"model": name_or_path, "revision": revision}
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        digest = hashlib.sha256()
        for weights in sorted(path.glob("*.safetensors")):
            digest.update(weights.read_bytes())
        identity["weights_sha256"] = digest.hexdigest()
    return identity


QUANTIZATION_CHOICES = (None, "4bit", "8bit")


def quantization_config(quantization: str | None, dtype=torch.float16):
    """A bitsandbytes `BitsAndBytesConfig` for `"4bit"` / `"8bit"` (None for no quantization).

    Checked before anything is downloaded: bitsandbytes kernels need a CUDA GPU, and the package is the optional
    `quant` extra, imported only here.
    """
    if quantization in (None, "null", "none"):
        return None
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be null, '4bit' or '8bit'; got {quantization!r}.")
    if not torch.cuda.is_available():
        raise ValueError(
            f"quantization={quantization!r} loads the model through bitsandbytes, which needs a CUDA GPU, and no CUDA "
            "device is available here; use quantization=null (full precision) on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401  (optional extra; transformers needs it at load time)
    except ImportError as error:
        raise ImportError(
            f"quantization={quantization!r} needs bitsandbytes: pip install -e '.[quant]'"
        ) from error
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_mllm(
    name_or_path: str = "testbed",
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    **kwargs,
):
    """`(model, processor)` through the stock Auto classes; extra kwargs (e.g. `device_map`) go to the model.

    `quantization` ("4bit" | "8bit", GPU only) loads the frozen model through bitsandbytes; the engine runs its
    (quantized) layers unchanged.
    """
    bnb_config = quantization_config(quantization, dtype)  # fails before any download
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs.setdefault("device_map", "auto")
    path = resolve_model_path(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
