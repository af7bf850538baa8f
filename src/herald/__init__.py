"""Herald: a self-hosted notification and background-job service on Celery + Redis."""

__version__ = "0.1.0"
