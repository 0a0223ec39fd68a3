"""selflm: an LLM service that improves itself through self-update rounds."""

__version__ = "0.1.0"
