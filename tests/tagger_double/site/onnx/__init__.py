"""TEST DOUBLE of the `onnx` package: only importable, so the tagger double's `--onnx` import succeeds."""

__version__ = "0.0-double"
