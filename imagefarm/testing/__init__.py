"""Real services and fixture images for tests, the demo and the benchmarks.

Not mocks: ``services`` starts Debian's docker-registry and redis-server on free
loopback ports; ``images`` makes R2E-Gym-shaped base images from a debootstrapped
rootfs (cached) and pushes them under r2e names.
"""
