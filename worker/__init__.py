"""Celery worker: runs self-update rounds on queue `gpu`."""
