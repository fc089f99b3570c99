"""The host: podman/buildah under the project's own storage, local services, sample images, and the machine check.

``containers`` runs the container tools, ``services``/``devstack`` start a local registry and Redis, ``samples``
and ``rootfs`` make R2E-shaped sample images, and ``doctor`` checks a machine end to end; the demo, which drives
the farm, sits on top as ``imagefarm.demo``.
"""
