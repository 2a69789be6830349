"""Rewrite passes, one module per pass."""
