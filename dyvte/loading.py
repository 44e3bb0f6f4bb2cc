"""One entry point for the models dyvte runs on: the shipped testbed, a local checkpoint or a Hub id."""

import hashlib
import importlib.util
import logging
from importlib.resources import files
from pathlib import Path

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from .prompts import check_chat_template

log = logging.getLogger(__name__)
# The shipped testbed checkpoint, package data of `dyvte.testbed` (found without importing that sub-package,
# which comes after the small modules in the import order).
TESTBED_MODEL_DIR = Path(str(files("dyvte") / "testbed" / "data" / "model"))


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
            f"quantization={quantization!r} needs bitsandbytes: pip install \"dyvte[quant]\" "
            "(in a checkout: pip install -e \".[quant]\")"
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
    processor = load_processor(path)
    check_processor(processor, model.config, name_or_path)
    return model, processor


class _WithoutVideoProcessor:
    """Put in front of a stock processor class to build it with `video_processor=None`: the stock class checks
    every sub-processor's type, and without torchvision no video processor can be built or type-checked."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def _process_videos(self, *args, **kwargs):
        raise ImportError(
            f"this {type(self).__name__} was built without its video processor because torchvision is not "
            "installed; videos need torchvision (a build matching your torch)."
        )


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`; where the processor's video processor needs torchvision and torchvision
    is not installed (Qwen2-VL, Qwen2.5-VL, InternVL, LLaVA-OneVision on a CPU-only machine), the same processor
    class is built from the folder's image processor, tokenizer, processor settings and chat template instead,
    without a video processor: images work exactly as with the stock processor, videos raise."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError) as error:  # the video processor's "requires torchvision" (either type)
        if importlib.util.find_spec("torchvision") is not None or "torchvision" not in str(error).lower():
            raise
        stock_error = error
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    model_type = AutoConfig.from_pretrained(path).model_type
    processor_class = processor_class_from_name(PROCESSOR_MAPPING_NAMES.get(model_type) or "")
    if processor_class is None or "video_processor" not in processor_class.get_attributes():
        raise stock_error
    images_only = type(processor_class.__name__, (_WithoutVideoProcessor, processor_class), {})
    components = {"image_processor": AutoImageProcessor.from_pretrained(path),
                  "tokenizer": AutoTokenizer.from_pretrained(path), "video_processor": None}
    processor_dict, kwargs = images_only.get_processor_dict(path)
    processor = images_only.from_args_and_dict([components[name] for name in images_only.get_attributes()],
                                               processor_dict, **kwargs)
    log.warning("torchvision is not installed: %s built from %s's image processor and tokenizer, without its video "
                "processor (images work; videos need torchvision)", processor_class.__name__, path)
    return processor


def check_processor(processor, config, name_or_path: str) -> None:
    """The processor can build prompts for this model: it has a chat template, and its tokenizer has the model's
    image token under the id the model expects."""
    try:
        check_chat_template(processor)
    except ValueError as error:
        raise ValueError(f"{name_or_path}: {error}") from None
    image_token = getattr(processor, "image_token", None)
    expected = getattr(config, "image_token_id", None)
    if expected is None:
        expected = getattr(config, "image_token_index", None)
    if image_token is None or expected is None:
        return
    found = processor.tokenizer.convert_tokens_to_ids(image_token)
    if found != expected:
        raise ValueError(
            f"{name_or_path}: the tokenizer encodes the image token {image_token!r} as id {found}, but the model's "
            f"config expects image_token_id {expected}; the tokenizer lacks the model's image token (add it with "
            f"tokenizer.add_tokens(AddedToken({image_token!r}, special=True, normalized=False), special_tokens=True) "
            "so that it gets that id, and save the processor again)."
        )
