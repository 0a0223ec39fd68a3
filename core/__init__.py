"""What the HTTP service (`app`) and the round worker (`worker`) share: settings, the database,
the checkpoint registry and store, model loading and decoding, the round queue."""

__version__ = "0.1.0"
