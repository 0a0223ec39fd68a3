"""HTTP routes: thin, they validate, call a service and return a typed response."""
