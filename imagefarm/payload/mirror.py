"""The Debian mirror the builder fetches from: the machine's own apt sources by default.

Clusters use local mirrors (the public archive may be unreachable from compute nodes),
and the machine's apt already knows which one: the first enabled ``deb`` source of
the Debian archive in ``/etc/apt/sources.list``, ``sources.list.d/*.list`` (one-line
format) or ``sources.list.d/*.sources`` (deb822). A security or third-party source
never counts. Where a package comes from does not change what it is, so the mirror is
not part of the recipe digest: a payload built against one mirror is the payload of
every machine.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Debian archive suites (codenames and aliases); a suite name without a suffix
DEBIAN_SUITES = frozenset({
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable", "experimental",
})
_SUFFIX = re.compile(r"-(updates|backports|proposed-updates|backports-sloppy)$")


def _one_line(text: str) -> list[tuple[str, str, str]]:
    """(type, uri, suite) of each one-line entry (``deb [opts] URI SUITE COMP...``)."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=amd64 signed-by=...]
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[0], parts[1], parts[2]))
    return out


def _deb822(text: str) -> list[tuple[str, str, str]]:
    """(type, uri, suite) of each deb822 stanza (``Types:/URIs:/Suites:``), Enabled: no skipped."""
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
                continue
            k, sep, v = line.partition(":")
            if sep:
                key = k.strip().lower()
                fields[key] = v.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for typ in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    out.append((typ, uri, suite))
    return out


def apt_sources(etc: Path = Path("/etc/apt")) -> list[tuple[str, str, str]]:
    """Every (type, uri, suite) apt is configured with, in apt's reading order."""
    out: list[tuple[str, str, str]] = []
    main = etc / "sources.list"
    if main.is_file():
        out += _one_line(main.read_text(errors="replace"))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            try:
                if f.suffix == ".list":
                    out += _one_line(f.read_text(errors="replace"))
                elif f.suffix == ".sources":
                    out += _deb822(f.read_text(errors="replace"))
            except OSError:
                continue
    return out


def host_mirror(etc: Path = Path("/etc/apt")) -> str | None:
    """The Debian archive mirror of this machine's apt sources (None if it has none)."""
    for typ, uri, suite in apt_sources(etc):
        if typ == "deb" and _SUFFIX.sub("", suite) in DEBIAN_SUITES and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    return None


def builder_mirror(recipe_mirror: str | None, flag: str | None = None, etc: Path = Path("/etc/apt")) -> str:
    """The mirror a build uses: ``--mirror``, else the recipe's, else the machine's, else Debian's CDN."""
    return flag or recipe_mirror or host_mirror(etc) or DEFAULT_MIRROR
