"""Test-only helpers: real OpenHands client venvs (``clients``) and a real single-node SLURM cluster (``slurm``).

Product code never imports this package; the services and sample images the demo also uses live in
``imagefarm.host``.
"""
