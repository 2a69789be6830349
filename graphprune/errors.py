"""Errors meant for users: one clear sentence, shown without a traceback by the CLI."""


class GraphpruneError(Exception):
    """A problem with the user's input or request; the message says what and how to fix it."""


class VerificationError(GraphpruneError):
    """The rewritten model failed a check (checker, ONNX Runtime, output shapes)."""


class RuntimeMissingError(GraphpruneError):
    """ONNX Runtime is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "ONNX Runtime is not installed: run `pip install graphprune[cpu]` "
            "(or `graphprune[gpu]` for CUDA/TensorRT) and try again."
        )
