"""The public surface: every name in ``imagefarm.__all__`` resolves, and importing the
package alone stays cheap (no HTTP client, no web framework)."""

from __future__ import annotations

import subprocess
import sys


def test_every_public_name_resolves():
    code = ("import sys, imagefarm; heavy = {'httpx', 'fastapi', 'celery'} & set(sys.modules); "
            "assert not heavy, heavy; "
            "missing = [n for n in imagefarm.__all__ if getattr(imagefarm, n, None) is None]; "
            "assert not missing, missing; print(len(imagefarm.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) > 20
