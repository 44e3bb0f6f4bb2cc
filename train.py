"""Train exit heads: labels -> heads -> validate (`python train.py [overrides]`).

The repository's entry point over `dyvte.train` (installed: `dyvte-train` or `python -m dyvte.train`),
whose docstring lists the usual commands; the configs are `conf/` (= `dyvte/conf/`).
"""

from dyvte.train import cli_main

if __name__ == "__main__":
    cli_main()
