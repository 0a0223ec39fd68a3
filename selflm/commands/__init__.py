"""The `selflm` client commands (they talk to a running server over HTTP)."""
