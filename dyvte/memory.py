"""Will the model fit? The bytes its weights need, counted from the config before any weight is read.

The model is built on the meta device (no memory, no weights) by the stock Auto class, so the count is exact for
every family transformers knows: each parameter and buffer at the load dtype, except under bitsandbytes
quantization, where the linear layers' weights (all but the output embedding, which bitsandbytes keeps) take
    4-bit (FP4 / NF4): half a byte per weight plus one fp32 absmax per block of 64 (0.5625 bytes),
    8-bit (LLM.int8):  one byte per weight plus one fp32 scale per output row.
(An upper bound for 4-bit: double quantization, dyvte's setting, stores the absmax in 8 bits, ~0.51 bytes.)
A run needs the weights, `BASE_WORKSPACE_BYTES` for the libraries and `WORKSPACE_FRACTION` of the weights for
activations, the KV cache and the label pass (the full-depth LLaVA-1.5-7B run of benchmarks/llava7b.py peaked 3.3
GiB above its 13.2 GiB of bf16 weights at batch 1; this gives 3.0 GiB); that is compared with the memory free on
the device the weights load onto.
"""

import math
from dataclasses import dataclass

import psutil
import torch

WORKSPACE_FRACTION = 0.15
BASE_WORKSPACE_BYTES = 2**30
GIB = 2**30


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"model.dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    return resolved


def quantized_bits(quantization: str | None) -> int | None:
    """4 or 8 for a bitsandbytes mode (`4bit`, `nf4`, `fp4`, `8bit`), None for none."""
    if quantization in (None, "null", "none"):
        return None
    return 8 if "8" in str(quantization) else 4


@dataclass
class MemoryEstimate:
    """What loading and running the model needs (bytes), against what the device has free."""

    weight_bytes: int
    workspace_bytes: int
    free_bytes: int
    device: str

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.free_bytes


def weight_bytes(config, dtype=torch.float32, quantization: str | None = None) -> int:
    """Bytes of the model's parameters and buffers once loaded with `dtype` (and `quantization`)."""
    from transformers import AutoModelForImageTextToText

    dtype, bits = _dtype(dtype), quantized_bits(quantization)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    output_embeddings = model.get_output_embeddings()
    quantized = set()
    if bits is not None:
        quantized = {id(m.weight) for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not output_embeddings}
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in quantized:
            total += tensor.numel() * tensor.element_size()
        elif bits == 4:
            total += math.ceil(tensor.numel() / 2) + 4 * math.ceil(tensor.numel() / 64)
        else:
            total += tensor.numel() + 4 * tensor.shape[0]
    return total


def free_bytes(device: str = "cpu") -> int:
    """Memory available for new allocations: the OS's `available` for the CPU, the driver's free for a GPU."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    return psutil.virtual_memory().available


def estimate(config, dtype=torch.float32, quantization: str | None = None, device: str = "cpu") -> MemoryEstimate:
    weights = weight_bytes(config, dtype, quantization)
    workspace = BASE_WORKSPACE_BYTES + int(WORKSPACE_FRACTION * weights)
    return MemoryEstimate(weights, workspace, free_bytes(device), device)


def check_fits(config, name_or_path: str, dtype=torch.float32, quantization: str | None = None,
               device: str = "cpu") -> MemoryEstimate:
    """The estimate, or a `MemoryError` saying how much is needed against how much is free, and what to do."""
    found = estimate(config, dtype, quantization, device)
    if found.fits:
        return found
    precision = f"{quantization} quantization" if quantized_bits(quantization) else f"dtype {_dtype(dtype)}"
    fixes = []
    if quantized_bits(quantization) is None:
        four_bit = weight_bytes(config, dtype, "4bit")
        fixes.append(f"model.quantization=4bit (weights {four_bit / GIB:.1f} GiB)")
        if _dtype(dtype).itemsize > 2:
            fixes.append(f"model.dtype=bfloat16 (weights {weight_bytes(config, torch.bfloat16) / GIB:.1f} GiB)")
    elif quantized_bits(quantization) == 8:
        fixes.append(f"model.quantization=4bit (weights {weight_bytes(config, dtype, '4bit') / GIB:.1f} GiB)")
    fixes += ["a smaller model", "a machine or GPU with more free memory (stop other jobs using it)"]
    raise MemoryError(
        f"{name_or_path} will not fit in memory: with {precision} its weights take "
        f"{found.weight_bytes / GIB:.1f} GiB, plus {found.workspace_bytes / GIB:.1f} GiB to run, "
        f"{found.needed_bytes / GIB:.1f} GiB in all, and {found.device} has {found.free_bytes / GIB:.1f} GiB free. "
        f"Use {', or '.join(fixes)}. Nothing was loaded."
    )
