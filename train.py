"""Train DyVTE exit heads: weak labels from the frozen MLLM -> per-layer heads -> simulated dynamic exit.

    python train.py                                   # the shipped testbed, on a CPU, in minutes
    python train.py experiment=llava7b_paper data.json_path=... data.image_dir=...
    python train.py -m head_training.hidden=256,2048 head_training.lr=1e-4,4e-5   # sweeps reuse the label cache
    python train.py stages=[validate] heads=outputs/.../heads                     # validate trained heads
    python train.py -v                                # more log output (Lightning's model summary, tips)
"""

from dyvte.train import cli_main

if __name__ == "__main__":
    cli_main()
