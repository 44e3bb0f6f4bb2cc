"""Check or repair label caches without training: `python -m dyvte.label_cache verify|repair DIR`.

    python -m dyvte.label_cache verify .cache/dyvte          # every store under the cache dir; exit 1 if one is damaged
    python -m dyvte.label_cache repair .cache/dyvte/3f2a...  # remove what is damaged; the labels stage relabels it

DIR is a cache dir (`cache_dir`, holding one folder per store) or one store's folder. `verify` hashes every file
against the store's manifest (`dyvte.training.label_store`). `repair` removes damaged shards, an unreadable
manifest, a skipped list that does not verify and half-written shards; the next `train.py` run with the labels
stage labels exactly the samples of what was removed, and nothing else.
"""

import argparse
import sys
from pathlib import Path

from .training.label_store import COMPLETE_NAME, META_NAME, LabelStore


def stores_under(directory: Path) -> list[LabelStore]:
    """The store in `directory`, or every store one level below it."""
    if (directory / META_NAME).exists() or (directory / COMPLETE_NAME).exists() or any(directory.glob("shard-*")):
        return [LabelStore.open(directory)]
    return [LabelStore.open(p) for p in sorted(directory.iterdir()) if p.is_dir()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyvte.label_cache", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("verify", "repair"))
    parser.add_argument("directory", type=Path, help="a cache dir (cache_dir) or one store's folder")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"{args.directory}: no such folder", file=sys.stderr)
        return 2
    stores = stores_under(args.directory)
    damaged = 0
    for store in stores:
        if args.command == "repair":
            removed = store.repair()
            for path, problem in removed:
                print(f"removed {path}: {problem}")
            state = "repaired: the labels stage relabels what was removed" if removed else (
                "complete, verified" if store.complete else "incomplete: the labels stage resumes it")
            print(f"{store.dir}: {state}")
            continue
        found = store.problems()
        for path, problem in found:
            print(f"{path} {problem}")
        damaged += bool(found)
        if found:
            print(f"{store.dir}: DAMAGED; repair: python -m dyvte.label_cache repair {store.dir}")
        elif store.complete:
            print(f"{store.dir}: complete, verified ({store.manifest()['samples']} samples)")
        else:
            print(f"{store.dir}: incomplete (no {COMPLETE_NAME}): the labels stage resumes it")
    if not stores:
        print(f"{args.directory}: no label caches")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
