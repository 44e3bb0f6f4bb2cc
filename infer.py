"""Generate with visual-token exit, or compare exit policies on a split (`python infer.py [overrides]`).

The repository's entry point over `dyvte.infer` (installed: `dyvte-infer` or `python -m dyvte.infer`),
whose docstring lists the usual commands; the configs are `conf/` (= `dyvte/conf/`).
"""

from dyvte.infer import cli_main

if __name__ == "__main__":
    cli_main()
