"""Offline demo on scikit-learn's bundled digits (see run.py)."""
from .run import DemoSettings, format_table, run_demo

__all__ = ["DemoSettings", "format_table", "run_demo"]
