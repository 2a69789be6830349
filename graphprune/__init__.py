from graphprune.api import analyze, optimize, refit

__all__ = ["analyze", "optimize", "refit"]
