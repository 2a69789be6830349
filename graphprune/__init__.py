from graphprune.api import analyze, optimize

__all__ = ["analyze", "optimize"]
