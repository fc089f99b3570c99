"""Names: image references (``registry/repository:tag@digest``) parsed into values, and the derived-tag scheme.

``reference`` is the parser and the ``Reference`` value; ``tags`` names a derived image from its base and recipe,
so the same base and recipe always land on the same tag.
"""
