"""The farm: turning a dataset of base images into verified, pinned agent-server images.

``catalog`` reads the dataset, ``jobs`` is one unit of work (derive, verify, attest), ``prebuild`` drives a batch
locally or through Celery (``imagefarm.worker``), and ``lockfile`` records what was published.
"""
