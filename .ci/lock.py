"""Write a lock file for one CI environment: the exact versions pip resolves for `.[dev]` on one interpreter.

    python .ci/lock.py ~/.pyenv/versions/3.12.1/bin/python constraints/ci-py312.txt torch==2.13.0 transformers==5.23.0

The arguments after the output file are extra pip requirements (the pins of the run); each lock file's first line
is the command that wrote it.

pip resolves in a dry run (metadata only, nothing installed) in a scratch venv of that interpreter. On Pythons
whose only torch wheels are CUDA builds, the resolution includes CUDA libraries (nvidia-*, triton, cuda-*): they
are left out of the lock, because .ci/run installs torch without them and loads the CUDA libraries from this
machine's wheel folders instead (constraints/cuda-libs.txt); a CPU-only test never calls into them.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CUDA_PREFIXES = ("nvidia-", "triton", "cuda-")


def main(python: str, out: str, *pip_args: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        venv = Path(scratch) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        report = Path(scratch) / "report.json"
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--dry-run", "--report",
                        str(report), "-e", ".[dev]", *pip_args], check=True)
        resolved = json.loads(report.read_text())["install"]
    pins = sorted((item["metadata"]["name"].lower(), item["metadata"]["version"]) for item in resolved)
    lines = [f"{name}=={version}" for name, version in pins
             if name != "dyvte" and not name.startswith(CUDA_PREFIXES)]
    command = " ".join(["python .ci/lock.py", python.replace(str(Path.home()), "~"), out, *pip_args])
    Path(out).write_text(f"# {command}\n" + "\n".join(lines) + "\n")
    print(f"{out}: {len(lines)} packages")


if __name__ == "__main__":
    main(*sys.argv[1:])
