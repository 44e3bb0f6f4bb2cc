"""How long the model identity of a large local checkpoint takes per `train.py` run, before and after streaming.

    python -m benchmarks.model_identity --build /path/to/folder --gib 14   # write 3 shards of random bytes first
    python -m benchmarks.model_identity /path/to/folder                     # time an existing checkpoint folder

Before (dyvte at eb43ddd): `model_identity` read every `*.safetensors` file whole into memory (`read_bytes`), and a
run called it three times (label caches, the heads' config, `check_fits`). After: `loading.weights_sha256` streams
the files in 16 MiB chunks into one digest, once per process; the other calls find it by (path, size, mtime).
Both digests are the same for a safetensors-only folder. Writes benchmarks/results/model_identity.json.
"""

import argparse
import hashlib
import json
import os
import resource
import time
from pathlib import Path

from dyvte.loading import model_identity

CALLS_PER_RUN = 3  # label_stores, train_heads (ExitHeadsConfig), check_fits
RESULT = Path(__file__).resolve().parent / "results" / "model_identity.json"


def identity_before(folder: Path) -> str:
    """`model_identity` of eb43ddd: each safetensors file read whole."""
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def build(folder: Path, gib: float, shards: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    size, chunk = int(gib * 2**30) // shards, 2**24
    for index in range(shards):
        with open(folder / f"model-{index + 1:05d}-of-{shards:05d}.safetensors", "wb") as file:
            for _ in range(size // chunk):
                file.write(os.urandom(chunk))


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--build", action="store_true", help="write random shards into the folder first")
    parser.add_argument("--gib", type=float, default=14.0)
    args = parser.parse_args()
    if args.build:
        build(args.folder, args.gib)
    load_at_start = os.getloadavg()
    size = sum(p.stat().st_size for p in args.folder.glob("*.safetensors"))
    # after first: it starts with the colder page cache, so the comparison does not flatter it
    after = [timed(model_identity, str(args.folder), None) for _ in range(CALLS_PER_RUN)]
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    before = [timed(identity_before, args.folder) for _ in range(CALLS_PER_RUN)]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert {digest for digest, _ in before} == {identity["weights_sha256"] for identity, _ in after}
    result = {
        "folder_gib": size / 2**30,
        "before_seconds_per_call": [round(t, 2) for _, t in before],
        "before_seconds_per_run": round(sum(t for _, t in before), 2),
        "before_peak_rss_gib": round(peak_before, 2),
        "after_seconds_per_call": [round(t, 4) for _, t in after],
        "after_peak_rss_gib": round(peak_after, 2),
        "after_seconds_per_run": round(sum(t for _, t in after), 2),
        "run_speedup": round(sum(t for _, t in before) / sum(t for _, t in after), 2),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "order": "after's three calls first (colder page cache), then before's three",
        "command": f"python -m benchmarks.model_identity {args.folder}"
                   + (f" --build --gib {args.gib:g}" if args.build else ""),
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
