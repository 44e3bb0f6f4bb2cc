"""The Hydra configs of dyvte-train / dyvte-infer / dyvte-analyze (the repository's `conf/` links here)."""
