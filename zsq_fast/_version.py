"""The package version (its own module so that zsq_fast.report can read it without importing zsq_fast)."""
__version__ = "0.1.0"
