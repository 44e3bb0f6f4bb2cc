"""How large an image becomes inside each family's image processor (`dyvte.images`), against what the processors
really build (their resize, pad and patching outputs, watched), and the data path's use of it: an image that the
processor would resize into a huge one, or a line of pixels, is a listed bad sample before the processor runs."""

import json

from fixtures.real_format import fixture
from PIL import Image

from dyvte import load_mllm
from dyvte.data import PromptCollator, Sample, read_llava_json
from dyvte.images import image_size_problem, resized_pixels
from dyvte.loading import load_processor


def largest_array(image_processor, width: int, height: int) -> int:
    """The pixels of the largest image the processor makes (its resize, pad and patching outputs), watched."""
    seen = [width * height]
    for name in ("resize", "pad_to_square", "_pad_for_patching"):
        if hasattr(image_processor, name):
            method = getattr(image_processor, name)

            def watched(*args, _method=method, **kwargs):
                out = _method(*args, **kwargs)
                seen.append(out.shape[-2] * out.shape[-1])
                return out

            setattr(image_processor, name, watched)
    image_processor(images=[Image.new("RGB", (width, height))], return_tensors="np")
    return max(seen[1:])


def image_processors():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    found = {name: load_processor(str(fixture(name))).image_processor
             for name in ("llava-1.5", "qwen2-vl", "internvl3", "llava-onevision")}
    found["llava-next"] = LlavaNextImageProcessorPil(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]],
                                                     size={"shortest_edge": 336},
                                                     crop_size={"height": 336, "width": 336})
    found["llava (pad to square)"] = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336},
                                                            crop_size={"height": 336, "width": 336})
    found["testbed"] = load_mllm("testbed")[1].image_processor
    return found


def test_resized_size_is_what_each_family_processor_builds():
    for name, image_processor in image_processors().items():
        for width, height in [(300, 20), (20, 300), (1000, 999), (50, 400), (640, 480), (33, 33), (97, 3)]:
            assert resized_pixels(image_processor, width, height) == largest_array(image_processor, width, height), \
                (name, width, height)


def test_a_size_the_processor_refuses_is_a_problem_not_an_error(monkeypatch):
    qwen = load_processor(str(fixture("qwen2-vl"))).image_processor
    monkeypatch.setattr("dyvte.images.MAX_ASPECT_RATIO", 1000)  # past dyvte's limit, Qwen2-VL's own (200) refuses
    assert image_size_problem(qwen, 6000, 28, 10**8, "max_image_pixels", "fix") == (
        "is 6000x28, which the model's image processor refuses (absolute aspect ratio must be smaller than 200, got "
        "214.28571428571428)")


def test_thin_images_are_bad_samples_before_the_processor_runs(tmp_path):
    _, processor = load_mllm("testbed")  # CLIP's shortest-edge resize to 96
    Image.new("RGB", (16000, 1)).save(tmp_path / "line.png")  # the 131-byte image
    Image.new("RGB", (150, 1)).save(tmp_path / "thin.png")  # resized to 14400 x 96 = 1,382,400 pixels
    turn = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    (tmp_path / "data.json").write_text(json.dumps([{"id": n, "image": f"{n}.png", "conversations": turn}
                                                    for n in ("line", "thin")]))
    samples = read_llava_json(tmp_path / "data.json", tmp_path)
    processor.image_processor.resize = None  # any call of the processor's resize would fail the test
    batch = PromptCollator(processor, max_image_pixels=1_000_000)(samples)
    reasons = {row["id"]: row["reason"] for row in batch["skipped"]}
    assert reasons == {
        "line": "image is 16000x1, an aspect ratio over 200:1, the most any image may have "
                f"(dyvte.images.MAX_ASPECT_RATIO): {tmp_path / 'line.png'}",
        "thin": "image is 150x1, which the model's image processor resizes to 1382400 pixels, over "
                f"data.max_image_pixels=1000000 (raise it if the image is genuine): {tmp_path / 'thin.png'}"}
    in_memory = Sample(id="m", image=Image.new("RGB", (150, 1)), question="<image>\nq", answer="a")
    assert "resizes to 1382400 pixels" in PromptCollator(processor, max_image_pixels=10**6)([in_memory])["skipped"][0][
        "reason"]


