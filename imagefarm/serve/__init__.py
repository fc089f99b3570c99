"""Serving prebuilt images to training: find the image for a base, over a CLI, an HTTP API, or a training launch.

``lookup`` answers "which prebuilt image for this base" from a lockfile or the registry, ``lookup_api`` serves it
over HTTP behind ``apikey``, and ``launch`` turns a lockfile into SkyRL/SLURM training inputs.
"""
