"""Celery workers: the app factory, thin tasks, and the delivery logic they call."""
