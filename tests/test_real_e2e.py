"""train.py and infer.py end to end on the llava-hf-format folder and LLaVA-665k-format data.

The JSON has what llava_v1_5_mix665k.json has: multi-turn conversations, `<image>` before and after the question,
image paths under sub-folders (coco/train2017/..., gqa/images/...), a text-only record, a record whose image is
missing, and one with no gpt turn; the bad ones must be skipped and listed with their reasons.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.real_format import fixture
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 200, 200), (20, 20, 20)]


def llava_665k(folder: Path) -> tuple[Path, Path]:
    """A small llava_v1_5_mix665k.json and its image folder."""
    image_dir = folder / "images"
    records = []
    for i in range(12):
        source = ["coco/train2017", "gqa/images", "textvqa/train_images"][i % 3]
        name = f"{source}/{100000 + i:012d}.jpg"
        (image_dir / source).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (320 + 16 * i, 240), COLORS[i % len(COLORS)]).save(image_dir / name)
        if i % 3 == 0:  # multi-turn, <image> first (LLaVA-Instruct style)
            turns = [{"from": "human", "value": "<image>\nWhat is the main color of the picture?"},
                     {"from": "gpt", "value": "The picture is mostly one color."},
                     {"from": "human", "value": "Is there any text in it?"}, {"from": "gpt", "value": "No."}]
        elif i % 3 == 1:  # <image> after the question (VQA style, the short-answer prompt)
            turns = [{"from": "human",
                      "value": "Is it bright?\nAnswer the question using a single word or phrase.\n<image>"},
                     {"from": "gpt", "value": "Yes" if i % 2 else "No"}]
        else:
            turns = [{"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": "2"}]
        records.append({"id": f"{100000 + i:012d}", "image": name, "conversations": turns})
    records += [
        {"id": "sharegpt_text_only", "conversations": [{"from": "human", "value": "Write a haiku."},
                                                       {"from": "gpt", "value": "Leaves fall."}]},
        {"id": "ocr_missing_image", "image": "ocr_vqa/images/0000000001.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWho wrote this book?"},
                           {"from": "gpt", "value": "Nobody."}]},
        {"id": "no_gpt_turn", "image": "coco/train2017/000000100000.jpg",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the image."}]},
    ]
    json_path = folder / "llava_v1_5_mix665k.json"
    json_path.write_text(json.dumps(records))
    return json_path, image_dir


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_train_and_infer_on_a_llava_hf_folder(tmp_path):
    folder = fixture("llava-1.5")
    json_path, image_dir = llava_665k(tmp_path)
    data = ["data=llava665k", f"data.json_path={json_path}", f"data.image_dir={image_dir}", "data.fraction=1.0",
            "data.val_fraction=0.3"]
    run("train.py", f"model.name_or_path={folder}", *data, "head_training.epochs=2", "head_training.hidden=16",
        "labels.batch_size=8", "labels.max_new_tokens=4", f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'train'}")
    report = json.loads((tmp_path / "train" / "validate.json").read_text())
    assert report["split"] == "val" and len(report["static_sweep"]) == 5  # 4 layers: k = 0..4
    assert report["static_sweep"][4]["agreement"] == 1.0
    skipped = {}
    for path in (tmp_path / "cache").rglob("skipped.jsonl"):
        skipped.update({row["id"]: row["reason"] for row in map(json.loads, path.read_text().splitlines())})
    expected = {
        "sharegpt_text_only": "the prompt has no <image> placeholder",
        "ocr_missing_image": f"image not found: {image_dir / 'ocr_vqa/images/0000000001.jpg'}",
        "no_gpt_turn": "the conversation has no gpt turn, so there is no answer to label",
    }
    assert {k: v for k, v in skipped.items() if k in expected} == expected  # each in the split it was drawn into
    assert set(skipped) == set(expected)
    heads = tmp_path / "train" / "heads"

    image = image_dir / "coco/train2017/000000100000.jpg"
    sample = run("infer.py", f"model.name_or_path={folder}", f"image={image}", "question=What color is it?",
                 f"heads={heads}", "max_new_tokens=4", f"hydra.run.dir={tmp_path / 'one'}")
    answer = json.loads(sample.stdout[sample.stdout.index("{") : sample.stdout.rindex("}") + 1])
    assert 1 <= answer["exit_layer"] <= 4 and answer["num_layers"] == 4
    assert 0 <= answer["flops_saved"] < 1

    run("infer.py", "task=eval", f"model.name_or_path={folder}", *data, "split=val", f"heads={heads}",
        "policies=[none,vtw,fastv,dynamic]", "vtw.layer=2", "max_new_tokens=4", "sweeps=false",
        f"hydra.run.dir={tmp_path / 'eval'}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["settings"]["model"] == str(folder)
    assert (tmp_path / "eval" / "results.md").exists()
