"""`natflow bench`: the benchmark, loaded only by that command (never by applications)."""
