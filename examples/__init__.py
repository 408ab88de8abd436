"""Runnable natflow examples; `make demo` serves and runs them all."""
