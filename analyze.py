"""The DyVTE paper's empirical findings on a model: attention stages, withdrawal sweep, attention entropy.

    python analyze.py                                             # the shipped testbed, its test split, on a CPU
    python analyze.py analysis.n=160 out_dir=reports/testbed/analysis
    python analyze.py analysis.policy=vtw analysis.vtw_layer=8    # entropy with and without exit at layer 8
    python analyze.py model=llava7b data=hf data.path=... analysis.withdrawal_layers=[0,8,16,24,32]

Writes `analysis.json`, `analysis.md`, `attention_stages.png` (and per family), `withdrawal.png` and `entropy.png`
(docs/design.md, "The paper's findings: analyze.py").
"""

from dyvte.analyze import cli_main

if __name__ == "__main__":
    cli_main()
