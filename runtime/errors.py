"""Errors of the runtime server, under imagefarm's one hierarchy.

::

    ImagefarmError
    └── RuntimeServerError        anything the runtime server refuses or cannot do
        ├── NoPrebuiltImage        (404) the image has no prebuilt agent-server image
        ├── UnknownRuntime         (404) no runtime with that id / session
        ├── CapacityFull           (429) --max-runtimes reached
        ├── BuildRefused           (501) /build: this server never builds
        └── BackendError           (502) podman failed (message carries its stderr)

Each carries the HTTP status the API answers with; the message is the ``detail``.
"""

from __future__ import annotations

from imagefarm.errors import ImagefarmError


class RuntimeServerError(ImagefarmError):
    status_code: int = 500


class NoPrebuiltImage(RuntimeServerError):
    status_code = 404

    def __init__(self, image: str, base: str, to: str, why: str = "") -> None:
        self.image, self.base, self.to = image, base, to
        super().__init__(
            f"no prebuilt agent-server image for {base} under {to}"
            + (f" ({why})" if why else "")
            + ": this runtime server starts prebuilt images only and never builds. "
            f"Build it with `imagefarm derive {base} --to {to}` "
            f"(or a whole dataset with `imagefarm prebuild --to {to} ...`), then start again."
        )


class UnknownRuntime(RuntimeServerError):
    status_code = 404


class CapacityFull(RuntimeServerError):
    status_code = 429


class BuildRefused(RuntimeServerError):
    status_code = 501


class BackendError(RuntimeServerError):
    status_code = 502
