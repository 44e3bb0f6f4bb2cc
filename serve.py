"""Serve an OpenAI-compatible chat endpoint with visual-token exit (LitServe); docs/serving.md.

    python serve.py heads=dyvte/testbed/data/heads policy=dynamic port=8000
"""

from dyvte.serve import cli_main

if __name__ == "__main__":
    cli_main()
