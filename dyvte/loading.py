"""One entry point for the models dyvte runs on: the shipped testbed, a local checkpoint or a Hub id."""

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import CONFIG_NAME

from . import memory
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


#: The files `from_pretrained` reads weights from: safetensors and PyTorch pickles, single or sharded.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHTS_DIGESTS: dict[tuple, str] = {}


def weight_files(folder: Path) -> list[Path]:
    """Every weight file of a local checkpoint, sorted by name: the folder's `*.safetensors` / `*.bin` / `*.pt` /
    `*.pth` files and every shard a `*.index.json` names. A shard an index names but the folder lacks is an error
    (the model could not load either)."""
    files = {p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{index} is not a weight index (JSON with a weight_map): {error}") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise FileNotFoundError(f"{index} names weight shards that are not in {folder}: {', '.join(missing)}")
        files |= {folder / name for name in shards}
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def weights_sha256(folder: Path) -> str:
    """sha256 of the bytes of `weight_files(folder)`, one after the other in name order (for a folder of
    safetensors files the digest dyvte has always recorded). Streamed in chunks, never a whole file in memory, and
    computed once per process: remembered by each file's path, size and mtime."""
    files = weight_files(folder)
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)} or a *.index.json), so "
            "it is not a checkpoint: give model.name_or_path a checkpoint folder, a Hub id or `testbed`"
        )
    signature = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if signature not in _WEIGHTS_DIGESTS:
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as file:
                while chunk := file.read(1 << 24):
                    digest.update(chunk)
        _WEIGHTS_DIGESTS[signature] = digest.hexdigest()
    return _WEIGHTS_DIGESTS[signature]


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of `repo_id` at `revision` in the local Hub cache (None where it is not cached): a branch such as
    `main` moves, the commit it resolves to names the weights exactly. Reads the cache only, no network."""
    try:
        cached = try_to_load_from_cache(repo_id, CONFIG_NAME, revision=revision)
    except (HFValidationError, ValueError):
        return None
    if not isinstance(cached, str):
        return None
    return Path(cached).parent.name


def model_identity(name_or_path: str, revision: str | None) -> dict:
    """What makes labels and heads from this model reusable: its name and revision, and the weights themselves:
    for a local checkpoint `weights_sha256` over every weight file it loads from (`weights_sha256`), for a Hub id
    the commit its revision resolves to in the local Hub cache (`commit`, where cached)."""
    identity = {"model": name_or_path, "revision": revision}
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        identity["weights_sha256"] = weights_sha256(path)
    else:
        commit = hub_commit(name_or_path, revision)
        if commit is not None:
            identity["commit"] = commit
    return identity


#: The model settings' choices (`ModelSettings`, checked at start-up by `dyvte.configs.check_model`).
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")
#: `4bit` is NF4 (an alias kept from before `nf4` existed), `fp4` is bitsandbytes' plain 4-bit, `8bit` LLM.int8.
QUANTIZATION_CHOICES = (None, "4bit", "nf4", "fp4", "8bit")
#: bitsandbytes' LLM.int8 default: input columns with an entry above it run unquantized.
DEFAULT_INT8_THRESHOLD = 6.0


def quantization_config(quantization: str | None, dtype=torch.float16, llm_int8_threshold: float = DEFAULT_INT8_THRESHOLD):
    """A bitsandbytes `BitsAndBytesConfig` for `"4bit"` / `"nf4"` / `"fp4"` / `"8bit"` (None for no quantization).

    4-bit modes compute in `dtype` (the model's dtype) and quantize the quantization constants too (double quant).
    `llm_int8_threshold` (8-bit only): LLM.int8 picks the outlier input columns it runs unquantized from every row
    of a matmul, so above 0 a token's output depends on the other tokens in the batch and sequence, and withdrawing
    the visual tokens changes the text tokens' numbers (docs/precision.md); at 0 nothing is an outlier and exit at
    `k` equals the full model with visual keys masked from layer `k` on. Checked before anything is downloaded;
    bitsandbytes and accelerate are the optional `quant` extra, imported only here.
    """
    if quantization in (None, "null", "none"):
        return None
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be null, '4bit', 'nf4', 'fp4' or '8bit'; got {quantization!r}.")
    missing = [name for name in ("bitsandbytes", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"quantization={quantization!r} loads the model through bitsandbytes and accelerate, and "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            'pip install "dyvte[quant]" (in a checkout: pip install -e ".[quant]"), or use quantization=null.'
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(llm_int8_threshold))
    compute_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4" if quantization == "fp4" else "nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def prepare_quantized_layers(model, quantization: str) -> None:
    """Run every bitsandbytes linear of `model` once on a zero row where it lives, so that a mode the installed
    bitsandbytes cannot run on this device fails here, naming the layer and the fix, instead of inside the first
    label batch.

    On a CPU with AVX512-BF16, bitsandbytes' fused 4-bit kernel computes in bf16 whatever the compute dtype, and
    refuses layers whose widths do not fit its blocks (the testbed's 96-wide ones). There a layer runs bitsandbytes'
    generic 4-bit path instead (the weight dequantized to the compute dtype, then a matmul): always for a
    compute dtype other than bf16, so that fp32 means fp32 on every CPU, and for any layer the fused kernel refuses.
    """
    import bitsandbytes

    for name, module in model.named_modules():
        if not isinstance(module, (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)):
            continue
        fused_cpu = getattr(module, "support_avx512bf16_for_cpu", False) and module.weight.device.type == "cpu"
        if fused_cpu and module.compute_dtype != torch.bfloat16:
            module.support_avx512bf16_for_cpu = fused_cpu = False
        try:
            _run_once(module, model.dtype)
        except Exception as error:  # bitsandbytes raises RuntimeError, AssertionError, NotImplementedError, ...
            if fused_cpu:  # the fused kernel refused this layer's shape; the generic path may not
                module.support_avx512bf16_for_cpu = False
                try:
                    _run_once(module, model.dtype)
                    continue
                except Exception as generic_error:
                    error = generic_error
            raise ValueError(
                f"quantization={quantization!r}: the installed bitsandbytes {bitsandbytes.__version__} cannot run "
                f"{name} ({type(module).__name__}, {module.in_features} -> {module.out_features}) on "
                f"{module.weight.device}: {type(error).__name__}: {error}. Use another mode (quantization=8bit, nf4, "
                "fp4 or null), or a bitsandbytes that supports it on this device."
            ) from error


def _run_once(module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        module(torch.zeros(1, module.in_features, dtype=dtype, device=module.weight.device))


def load_frozen_model(
    name_or_path: str = "testbed",
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    llm_int8_threshold: float = DEFAULT_INT8_THRESHOLD,
    check_memory: bool = True,
    **kwargs,
):
    """The model of `load_mllm` alone, in eval mode (a checkpoint without a processor works too).

    `check_memory`: before any weight is read, the bytes the weights need are counted from the config
    (`dyvte.memory`) and a model that does not fit in the free memory is refused (`MemoryError`)."""
    bnb_config = quantization_config(quantization, dtype, llm_int8_threshold)  # fails before any download
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        kwargs.setdefault("device_map", "auto" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(name_or_path)
    if check_memory:
        device_map = kwargs.get("device_map")
        on_gpu = torch.cuda.is_available() and device_map is not None and "cpu" not in str(device_map)
        memory.check_fits(AutoConfig.from_pretrained(path, revision=kwargs.get("revision")), name_or_path, dtype,
                          quantization, "cuda" if on_gpu else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    if bnb_config is not None:
        prepare_quantized_layers(model, quantization)
    return model


def load_mllm(
    name_or_path: str = "testbed",
    dtype=torch.float32,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    llm_int8_threshold: float = DEFAULT_INT8_THRESHOLD,
    check_memory: bool = True,
    **kwargs,
):
    """`(model, processor)` through the stock Auto classes; extra kwargs (e.g. `device_map`) go to the model.

    `quantization` ("4bit" = "nf4" | "fp4" | "8bit", on a CUDA GPU or the CPU) loads the frozen model through
    bitsandbytes, every layer checked to run (`prepare_quantized_layers`); the engine runs its quantized layers
    unchanged. `llm_int8_threshold` is LLM.int8's outlier threshold (`quantization_config`). `check_memory`: refuse a
    model that will not fit before reading any weight (`load_frozen_model`).
    """
    model = load_frozen_model(name_or_path, dtype, attn_implementation, quantization, llm_int8_threshold,
                              check_memory, **kwargs)
    path = resolve_model_path(name_or_path)
    processor = load_processor(path)
    check_processor(processor, model.config, name_or_path)
    return model, processor


@dataclass
class HeadSchedule:
    """How exit heads are sized and trained on a model (`head_training=paper` takes all of it, the default `dyvte`
    heads its schedule); the defaults are the DyVTE paper's: h = 2048, LR 4e-5, one epoch, batches of 32."""

    hidden: int = 2048
    lr: float = 4e-5
    weight_decay: float = 0.0
    epochs: int = 1
    batch_size: int = 32


@dataclass
class ModelSettings:
    """A model config (`conf/model/*.yaml`, whose Hydra schema this is): the checkpoint, how it loads, which visual
    tokens exit and how heads are trained on it. `load()` is the one loader call of every entry point.

    `name_or_path`: a Hub id, a local checkpoint folder or `testbed`; `revision`: the Hub branch, tag or commit;
    `dtype`: one of `DTYPE_CHOICES`; `attn_implementation`: one of `ATTENTION_CHOICES`; `quantization`: one of
    `QUANTIZATION_CHOICES` (bitsandbytes, the `quant` extra); `llm_int8_threshold`: LLM.int8's outlier threshold,
    8-bit only (0 makes exit exact, docs/precision.md); `withdraw`: which visual tokens exit (both | images |
    videos); `head_schedule`: `HeadSchedule`. `dyvte.configs.check_model` checks the choices at start-up.
    """

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    quantization: str | None = None
    llm_int8_threshold: float = DEFAULT_INT8_THRESHOLD
    withdraw: str = "both"
    head_schedule: HeadSchedule = field(default_factory=HeadSchedule)

    def load(self, **kwargs):
        """`(model, processor)` as these settings say (`load_mllm`); extra kwargs (e.g. `device_map`) go to the
        model."""
        return load_mllm(self.name_or_path, dtype=self.dtype, attn_implementation=self.attn_implementation,
                         revision=self.revision, quantization=self.quantization,
                         llm_int8_threshold=self.llm_int8_threshold, **kwargs)

    def load_processor(self):
        """The processor `load()` returns, alone (no weights are read): what the server's HTTP process needs."""
        return load_processor(resolve_model_path(self.name_or_path))


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
