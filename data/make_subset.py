"""A seeded subset of LLaVA-1.5's instruction data (the DyVTE paper trains its heads on 1% of LLaVA-665k), with
every referenced image checked: it must exist and decode.

    python data/make_subset.py --json llava_v1_5_mix665k.json --image-dir /data/llava --fraction 0.01 --seed 0 \\
        --out data/llava665k_1pct.json

Writes `--out` (the kept records, unchanged, in their original order) and `<out stem>.dropped.json` (each dropped
record's index, id and reason). The records are chosen exactly as `train.py data=llava665k data.fraction=F
data.seed=S` chooses them from the full JSON, and read and checked by the label pass's own code (`dyvte.data`),
so a record dropped here is one the label pass would skip; train on the subset with `data.fraction=1.0`. Records
without an image (LLaVA-665k's text-only conversations) are dropped: dyvte's labels need an image.
"""

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="llava_v1_5_mix665k.json (or any LLaVA-format JSON)")
    parser.add_argument("--image-dir", required=True, type=Path, help="the folder holding coco/, gqa/, ocr_vqa/, ...")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the records to take, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="the subset JSON to write")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"--json {args.json} is not a file; download llava_v1_5_mix665k.json (data/README.md)")
    if not args.image_dir.is_dir():
        parser.error(f"--image-dir {args.image_dir} is not a folder; it holds coco/, gqa/, ... (data/README.md)")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from dyvte.data import BadSample, load_image, read_llava_json, subsample
    from dyvte.files import atomic_write_text

    records = json.loads(args.json.read_text())
    samples = read_llava_json(args.json, args.image_dir)  # one sample per record (its first turn), problems included
    if len(samples) != len(records):
        raise RuntimeError(f"{args.json}: {len(records)} records read as {len(samples)} samples; expected one each")
    chosen = subsample(list(range(len(records))), args.fraction, seed=args.seed)  # the indices train.py would take
    kept, dropped = [], []
    for index in chosen:
        sample = samples[index]
        try:
            if sample.problem:
                raise BadSample(sample.id, sample.problem)
            load_image(sample)  # exists and decodes (a truncated file fails here)
        except BadSample as bad:
            dropped.append({"index": index, "id": sample.id, "reason": bad.reason})
            continue
        kept.append(records[index])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dropped_path = args.out.with_name(f"{args.out.stem}.dropped.json")
    atomic_write_text(args.out, json.dumps(kept, indent=1, ensure_ascii=False))
    atomic_write_text(dropped_path, json.dumps(dropped, indent=1, ensure_ascii=False))
    summary = {"records": len(records), "chosen": len(chosen), "kept": len(kept), "dropped": len(dropped),
               "out": str(args.out), "dropped_list": str(dropped_path)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
