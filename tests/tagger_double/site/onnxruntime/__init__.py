"""TEST DOUBLE of the `onnxruntime` package: only importable (the daemon's readiness probe imports it)."""

__version__ = "0.0-double"


def get_available_providers() -> list[str]:
    return ["CPUExecutionProvider"]
