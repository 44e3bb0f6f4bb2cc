"""data/make_subset.py on a small folder in LLaVA-665k's layout: the seeded subset, and every bad record dropped with
its reason."""

import json
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# LLaVA-1.5's image folders, as llava_v1_5_mix665k.json refers to them
FOLDERS = ["coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K", "vg/VG_100K_2"]


def conversation(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def llava_folder(root: Path, count: int = 60) -> tuple[Path, list[dict], dict[int, str]]:
    """`count` records over the six image folders; some are bad. Returns the JSON path, the records and, per bad
    record index, a word its drop reason must contain."""
    records, bad = [], {}
    for index in range(count):
        folder = FOLDERS[index % len(FOLDERS)]
        image = f"{folder}/{index:012d}.jpg"
        record = {"id": f"{index:012d}", "image": image, "conversations": conversation(f"question {index}?", "yes")}
        path = root / image
        path.parent.mkdir(parents=True, exist_ok=True)
        if index % 10 == 3:
            bad[index] = "not found"  # referenced, never written
        elif index % 10 == 5:
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            bad[index] = "cannot be read"
        elif index % 10 == 7:
            del record["image"]  # a text-only conversation
            bad[index] = "no image"
        elif index % 10 == 9:
            record["conversations"] = record["conversations"][:1]
            bad[index] = "no gpt turn"
        if index % 10 not in (3, 5):
            Image.new("RGB", (24 + index, 16), (index * 4 % 256, 90, 160)).save(path)
        records.append(record)
    json_path = root / "llava_v1_5_mix665k.json"
    json_path.write_text(json.dumps(records))
    return json_path, records, bad


def make_subset(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data" / "make_subset.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_subset_is_seeded_and_drops_bad_records_with_reasons(tmp_path):
    json_path, records, bad = llava_folder(tmp_path / "llava")
    out = tmp_path / "subset" / "llava665k_half.json"
    result = make_subset("--json", json_path, "--image-dir", tmp_path / "llava", "--fraction", 0.5, "--seed", 3,
                         "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    chosen = sorted(random.Random(3).sample(range(len(records)), round(len(records) * 0.5)))  # the paper's draw
    kept = json.loads(out.read_text())
    dropped = json.loads((tmp_path / "subset" / "llava665k_half.dropped.json").read_text())
    assert kept == [records[i] for i in chosen if i not in bad]
    assert [d["index"] for d in dropped] == [i for i in chosen if i in bad]
    assert dropped, "the draw should hit some bad records"
    for entry in dropped:
        assert entry["id"] == records[entry["index"]]["id"] and bad[entry["index"]] in entry["reason"]
    assert json.loads(result.stdout.splitlines()[-1])["kept"] == len(kept)


def test_missing_inputs_are_named():
    result = make_subset("--json", "/nonexistent/llava_v1_5_mix665k.json", "--image-dir", ROOT, "--out", "x.json")
    assert result.returncode == 2 and "--json /nonexistent/llava_v1_5_mix665k.json is not a file" in result.stderr
