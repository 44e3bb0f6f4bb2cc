"""dyvte benchmarks: `python -m benchmarks.run [--quick]`."""
