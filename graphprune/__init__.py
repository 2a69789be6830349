from graphprune.api import analyze, drop_layers, optimize, refit

__all__ = ["analyze", "drop_layers", "optimize", "refit"]
