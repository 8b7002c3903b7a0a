"""Speed and quality measurements: scripts that print numbers (run them as `python benchmarks/NAME.py`)."""
