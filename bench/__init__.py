"""The benchmark of fused_cosloss: ``python bench/run.py --vocab 50257`` (see bench/run.py)."""
