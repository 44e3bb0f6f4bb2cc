"""The DyVTE paper's findings on a model: attention stages, withdrawal sweep, entropy (`python analyze.py [overrides]`).

The repository's entry point over `dyvte.analyze` (installed: `dyvte-analyze` or `python -m dyvte.analyze`),
whose docstring lists the usual commands; the configs are `conf/` (= `dyvte/conf/`).
"""

from dyvte.analyze import cli_main

if __name__ == "__main__":
    cli_main()
