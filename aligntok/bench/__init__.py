"""`aligntok bench ...`: throughput, memory and GPU measurements (the CLI wires them in stages/bench.py)."""
