"""The runtime server (installed as ``imagefarm.runtime``)."""
