"""The host: podman/buildah under the project's own storage, local services, and the checks and demo built on them.

``containers`` runs the container tools, ``services``/``devstack`` start a local registry and Redis, ``samples``
and ``rootfs`` make R2E-shaped sample images, and ``doctor``/``demo`` check and show a machine end to end.
"""
