"""Prompt, image and scoring functions for the `testbed_vqa` lmms-eval task (the testbed's LLaVA-format json)."""

from PIL import Image

from dyvte.testbed import DATA_DIR

IMAGE_DIR = DATA_DIR / "images"  # the shipped testbed's images, whatever the cwd


def doc_to_visual(doc: dict) -> list:
    return [Image.open(IMAGE_DIR / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question without the `<image>` placeholder: the plug-in places the image through the chat template."""
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(results[0].strip().lower() == doc_to_target(doc).strip().lower())}


CHOICES = {
    "colour": ["blue", "green", "orange", "purple", "red", "yellow"],
    "relation": ["blue", "green", "orange", "purple", "red", "yellow"],
    "glyph_colour": ["blue", "green", "orange", "purple", "red", "yellow"],
    "presence": ["no", "yes"],
    "count": ["2", "3", "4", "5", "6"],
    "shape": ["circle", "diamond", "square", "triangle"],
    "glyph": ["1", "2", "3", "4", "5", "6", "7", "8", "9"],
}


def mc_process_docs(dataset):
    """`list_colours` answers are free-form sequences, not one of a few choices."""
    return dataset.filter(lambda doc: doc["family"] in CHOICES)


def doc_to_choice(doc: dict) -> list[str]:
    return CHOICES[doc["family"]]
