"""How large an image becomes inside a model's image processor, known from its header before any pixel is decoded.

A small file can hold a large image (a decompression bomb), and a small image can become a large one: CLIP's
processor (LLaVA-1.5) scales the *shortest* edge to 336, so a 16000 x 1 PNG of 131 bytes is resized to 5,376,000 x 336
pixels. `image_size_problem` names what is wrong with an image of a given size for a given image processor: more
pixels than a limit before or after the processor's resize, or an aspect ratio over `MAX_ASPECT_RATIO`. The server
(`dyvte.serve`, a 413) and the data path (`dyvte.data.load_image`, a listed bad sample) both ask it.

Each supported family's rule is its processor's own: the shortest-edge (or fixed-size) resize of the generic
backends (CLIP for LLaVA-1.5, LLaVA's pad-to-square first), `get_number_of_image_patches` (Qwen2-VL's smart_resize,
InternVL's tiles) and LLaVA-NeXT's / OneVision's best grid resolution (`select_best_resolution`). An image
processor without a rule here fails loudly, naming the ones that have one.
"""

import numpy as np
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

#: The most elongated image (long edge / short edge) accepted: Qwen2-VL's smart_resize refuses more than 200, the
#: only limit a supported processor states; past it, an image is a line, not a picture.
MAX_ASPECT_RATIO = 200


def _family(image_processor) -> str:
    """The processor's class name without its backend suffix (`CLIPImageProcessorPil`, `...Fast` -> `CLIPImage...`)."""
    for cls in type(image_processor).__mro__:
        name = cls.__name__.removesuffix("Pil").removesuffix("Fast")
        if name in _RULES:
            return name
    raise ValueError(f"dyvte has no resize rule for the image processor {type(image_processor).__name__}, so it cannot "
                     f"bound an image's memory before the processor runs; it knows {', '.join(sorted(_RULES))}.")


def _resize_rule(size, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the generic backends' `resize` with the `size` dict (shortest edge, shortest and
    longest edge, or a fixed height and width): transformers' own arithmetic, on a zero-stride stand-in image."""
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    stand_in = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, height, width))  # no pixel is allocated
    return get_resize_output_image_size(stand_in, size["shortest_edge"], default_to_square=False,
                                        max_size=size.get("longest_edge"), input_data_format=ChannelDimension.FIRST)


def _generic(image_processor, height: int, width: int) -> int:
    """CLIP (LLaVA-1.5) and LLaVA's own processor: the resize of `size`, after LLaVA's pad to a square."""
    canvas = 0
    if _family(image_processor) == "LlavaImageProcessor" and image_processor.do_pad:
        height = width = max(height, width)
        canvas = height * width
    if image_processor.do_resize:
        height, width = _resize_rule(image_processor.size, height, width)
    return max(canvas, height * width)


def _smart_resize(image_processor, height: int, width: int) -> int:
    """Qwen2-VL and Qwen2.5-VL: patch_size x patch_size patches of the image after smart_resize."""
    return image_processor.get_number_of_image_patches(height, width, {}) * image_processor.patch_size ** 2


def _tiles(image_processor, height: int, width: int) -> int:
    """InternVL: the image is resized to a grid of `size` tiles (cut apart afterwards; with more than one tile, a
    thumbnail of one tile is added)."""
    count = image_processor.get_number_of_image_patches(height, width, {})
    grid = count - 1 if count > 1 else 1
    return grid * image_processor.size["height"] * image_processor.size["width"]


def _any_resolution(image_processor, height: int, width: int) -> int:
    """LLaVA-NeXT and OneVision: the image is resized into (and padded to) the best grid resolution, and a copy of it
    to the base size."""
    best_height, best_width = select_best_resolution((height, width), image_processor.image_grid_pinpoints)
    size = image_processor.size
    base = size["height"] * size["width"] if size.get("height") else size["shortest_edge"] ** 2
    return max(best_height * best_width, base)


_RULES = {
    "CLIPImageProcessor": _generic,
    "LlavaImageProcessor": _generic,
    "Qwen2VLImageProcessor": _smart_resize,
    "GotOcr2ImageProcessor": _tiles,
    "LlavaNextImageProcessor": _any_resolution,
    "LlavaOnevisionImageProcessor": _any_resolution,
}


def check_image_processor(image_processor) -> None:
    """Fail now, naming the supported ones, if images for this processor cannot be bounded (`_family` raises)."""
    _family(image_processor)


def resized_pixels(image_processor, width: int, height: int) -> int:
    """The pixels of the largest image the processor builds from a `width` x `height` image (its resize, or the
    canvas it pads to), from the processor's own rule. The aspect ratio must be at most `MAX_ASPECT_RATIO`."""
    return _RULES[_family(image_processor)](image_processor, height, width)


def image_size_problem(image_processor, width: int, height: int, max_pixels: int | None, limit: str, fix: str) -> str:
    """What makes a `width` x `height` image too large ("" if nothing): an aspect ratio over `MAX_ASPECT_RATIO`, or
    more than `max_pixels` pixels (None: no limit) as sent or, given the model's `image_processor` (None: not
    checked), after its resize. `limit` names `max_pixels` in the message and `fix` says what to do about it. Known
    from the image's header, before any pixel is decoded."""
    if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return (f"is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1, the most any image may have "
                "(dyvte.images.MAX_ASPECT_RATIO)")
    if max_pixels is None:
        return ""
    if width * height > max_pixels:
        return f"is {width}x{height} = {width * height} pixels, over {limit}={max_pixels} ({fix})"
    try:
        resized = resized_pixels(image_processor, width, height) if image_processor is not None else 0
    except ValueError as error:  # the processor's own size rule refuses the image (Qwen2-VL's smart_resize)
        return f"is {width}x{height}, which the model's image processor refuses ({error})"
    if resized > max_pixels:
        return (f"is {width}x{height}, which the model's image processor resizes to {resized} pixels, over "
                f"{limit}={max_pixels} ({fix})")
    return ""
