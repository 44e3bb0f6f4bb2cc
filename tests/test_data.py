"""Data sources: a Hugging Face `datasets` source reads its own val and test splits."""

from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from dyvte.data import DataSettings, load_splits


def write_local_dataset(root):
    """A local `datasets` source with train / validation / test parquet files (what the Hub serves)."""
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string"),
                         "qid": Value("string")})
    for split, n in (("train", 6), ("validation", 3), ("test", 2)):
        rows = {"image": [PILImage.new("RGB", (8, 8), "red")] * n, "question": [f"{split} question {i}?" for i in range(n)],
                "answer": ["yes"] * n, "qid": [f"{split}-{i}" for i in range(n)]}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))


def hf_config(root, **overrides) -> DataSettings:
    return DataSettings(source="hf", path=str(root), id_column="qid", **overrides)


def test_hf_source_reads_its_val_and_test_splits(tmp_path):
    write_local_dataset(tmp_path)
    splits = load_splits(hf_config(tmp_path, val_split="validation", test_split="test"))
    assert [s.id for s in splits["train"]] == [f"train-{i}" for i in range(6)]
    assert [s.id for s in splits["val"]] == [f"validation-{i}" for i in range(3)]
    assert [s.id for s in splits["test"]] == ["test-0", "test-1"]
    assert splits["val"][0].question == "validation question 0?" and splits["test"][0].answer == "yes"


def test_hf_source_without_val_split_holds_out_a_fraction(tmp_path):
    write_local_dataset(tmp_path)
    splits = load_splits(hf_config(tmp_path, val_fraction=0.5))
    assert len(splits["val"]) == 3 and len(splits["train"]) == 3 and "test" not in splits
    assert {s.id for s in splits["val"]} | {s.id for s in splits["train"]} == {f"train-{i}" for i in range(6)}
