"""The `selflm` command line: composes the service (`app`), the worker and the migrations."""
