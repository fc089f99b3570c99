"""The farm's Celery face (installed as ``imagefarm.worker``): the app and its tasks.

``tasks`` wraps ``imagefarm.farm.jobs`` (derive, verify) with the retry policy, ``semaphore``
caps concurrent work per node through Redis, and ``farm_worker.sbatch`` starts a worker on SLURM.
"""
