"""The serving engine: holds the champion model, batches concurrent requests."""
