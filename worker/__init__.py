"""The farm: Celery app and tasks (installed as ``imagefarm.worker``)."""
