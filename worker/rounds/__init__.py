"""Self-update rounds: generate, select, update, evaluate, decide."""
