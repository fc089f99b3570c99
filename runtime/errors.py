"""Errors of the runtime server, under imagefarm's one hierarchy.

::

    ImagefarmError
    └── RuntimeServerError        anything the runtime server refuses or cannot do
        ├── NoPrebuiltImage        (404) the image has no prebuilt agent-server image
        ├── UnknownRuntime         (404) no runtime with that id / session
        ├── CapacityFull           (429) --max-runtimes reached
        ├── BuildRefused           (501) /build: this server never builds
        ├── BackendError           (502) podman failed: ``kind`` says how, the message carries stderr
        └── NodeError              (502, or the node's own 4xx) a fleet node did not answer or refused

Each carries the HTTP status the API answers with; the message is the ``detail``.
"""

from __future__ import annotations

from imagefarm.errors import ImagefarmError


class RuntimeServerError(ImagefarmError):
    status_code: int = 500


class NoPrebuiltImage(RuntimeServerError):
    status_code = 404

    def __init__(self, image: str, base: str, to: str, why: str = "", *, recipe: str | None = None,
                 version: str | None = None) -> None:
        self.image, self.base, self.to, self.recipe, self.version = image, base, to, recipe, version
        what = f"image of recipe {recipe}" if recipe else "agent-server image"
        flags = (f" --recipe {recipe}" if recipe else "") + (f" --agent-server-version {version}" if version else "")
        super().__init__(
            f"no prebuilt {what} for {base} under {to}"
            + (f" at openhands-agent-server {version}" if version else "")
            + (f" ({why})" if why else "")
            + ": this runtime server starts prebuilt images only and never builds. "
            f"Build it with `imagefarm derive {base} --to {to}{flags}` "
            f"(or a whole dataset with `imagefarm prebuild --to {to}{flags} ...`), then start again."
        )


class UnknownRuntime(RuntimeServerError):
    status_code = 404


class NodeForbidden(RuntimeServerError):
    """A fleet report or leave not from the node whose id it names (its token is not
    there), or naming a URL off the address it connects from."""

    status_code = 403


class CapacityFull(RuntimeServerError):
    status_code = 429


class BuildRefused(RuntimeServerError):
    status_code = 501


class BackendError(RuntimeServerError):
    """podman failed; ``kind`` is what callers branch on (one of the constants below)."""

    status_code = 502
    WORKDIR_MISSING = "workdir-missing"   # the requested working directory is not in the image
    IMAGE_UNKNOWN = "image-unknown"       # the image is not (or no longer) in local storage
    PORT_IN_USE = "port-in-use"           # the host port was taken between choosing and binding
    NO_SPACE = "no-space"                 # the node's disk is full (eviction may free it)
    TIMEOUT = "timeout"
    OTHER = "other"

    def __init__(self, message: str, kind: str = OTHER) -> None:
        super().__init__(message)
        self.kind = kind

    @classmethod
    def from_podman(cls, message: str, stderr: str) -> "BackendError":
        """Name the failure once, here, from podman's words (it has no error codes)."""
        low = stderr.lower()
        if "workdir" in low and "does not exist" in low:
            kind = cls.WORKDIR_MISSING
        elif "image not known" in low:
            kind = cls.IMAGE_UNKNOWN
        elif "address already in use" in low:
            kind = cls.PORT_IN_USE
        elif "no space left" in low:
            kind = cls.NO_SPACE
        else:
            kind = cls.OTHER
        return cls(message, kind)


class NodeError(RuntimeServerError):
    """A fleet node failed a call of the front: unreachable (502), or its own 4xx passed on."""

    status_code = 502

    def __init__(self, message: str, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code if 400 <= status_code < 500 else 502
