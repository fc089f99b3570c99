"""imagefarm: prebuilt OpenHands agent-server images for every R2E-Gym base."""

__version__ = "0.1.0"
