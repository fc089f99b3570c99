"""The ``imagefarm`` command line: one Typer app, one module per verb group.

Every command takes its settings from flags over ``IMAGEFARM_*`` variables
(see ``imagefarm.settings``) and turns library errors into one clear line and
exit code 2, never a traceback.
"""

from __future__ import annotations

from ._app import app, main  # noqa: F401

# each module registers its commands on ``app``
from . import demo, doctor, farm, launch, lookup  # noqa: E402,F401
from . import derive  # noqa: E402,F401
from . import payload, verify  # noqa: E402,F401
from . import runtime  # noqa: E402,F401
from . import keys  # noqa: E402,F401
