"""Puts tests/ on sys.path (pytest's default import mode adds a conftest's folder), so test files in the
subfolders that mirror kvp_jax/ can `from helpers import ...`."""
