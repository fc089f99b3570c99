"""The one exception hierarchy of imagefarm.

Catch ``ImagefarmError`` for everything; the tree says what else to catch::

    ImagefarmError
    ├── InvalidReference        malformed image reference (bad input, never retried)
    ├── ImageRefused            a derived image no lookup may serve (stale recipe, boot check)
    ├── ConfigError              bad settings, recipe or dataset
    │   └── DatasetError         a dataset that cannot be read at all
    ├── ToolError                an external tool (podman, buildah, skopeo, ...) failed
    │   └── ToolMissing          ... or is not installed (message says what to install)
    ├── RegistryError            the registry answered with an error
    │   ├── RegistryUnreachable  connection refused / DNS / TLS (transient, retried)
    │   ├── AuthError            401/403 after following the auth challenge
    │   ├── NotFound             manifest or blob does not exist (permanent)
    │   ├── UnsupportedMedia     not an image (artifact, unknown media type, too big)
    │   └── TransientRegistryError 429 / 5xx after retries ran out
    ├── DeriveError              a base cannot become an agent-server image
    ├── PayloadError             the agent payload cannot be built
    ├── SignatureError           something published is not signed by a trusted key
    └── VerifyError              a derived image does not boot or answers wrongly

Every message names the bad input and, where there is one, the fix. Callers read
data, not text: ``RegistryError`` carries the ``registry_status``, the registry's error
``codes`` (``BLOB_UNKNOWN``...), the ``reference`` and the httpx ``request``; every
error has the HTTP ``status_code`` both servers answer with (``http_status``).
"""

from __future__ import annotations

from typing import Any


class ImagefarmError(Exception):
    """Base of every error imagefarm raises on purpose."""

    #: transient errors may succeed on retry (the farm retries them with backoff)
    transient: bool = False
    #: what an HTTP server answers when this escapes a request (see ``http_status``)
    status_code: int = 500


class InvalidRequest(ImagefarmError, ValueError):
    """A malformed value in a request (a version, a recipe name): servers answer 400."""

    status_code = 400


class InvalidReference(InvalidRequest):
    """A malformed image reference."""


class ImageRefused(ImagefarmError):
    """A derived image named by the caller that must not be served: built with another
    recipe, or (by digest) without a passed boot check. Servers answer 409."""

    status_code = 409


class ConfigError(ImagefarmError):
    """Bad settings, recipe or other configuration."""


class DatasetError(ConfigError):
    """A dataset that cannot be read (missing file, wrong columns)."""


class ToolError(ImagefarmError):
    """An external tool exited with an error."""


class ToolMissing(ToolError):
    """An external tool is not installed."""


class RegistryError(ImagefarmError):
    """The registry refused or failed a request: an upstream failure (502) to our clients."""

    status_code = 502

    def __init__(self, message: str, *, registry_status: int | None = None, codes: tuple[str, ...] = (),
                 reference: Any = None, request: Any = None) -> None:
        super().__init__(message)
        #: the registry's HTTP status (None: no answer), its error codes, what was asked
        self.registry_status, self.codes = registry_status, tuple(codes)
        self.reference, self.request = reference, request

    @property
    def blob_unknown(self) -> bool:
        """A manifest named a blob the repository does not have (deleted, or mid-upload elsewhere)."""
        return bool({"BLOB_UNKNOWN", "MANIFEST_BLOB_UNKNOWN"}.intersection(self.codes))


class RegistryUnreachable(RegistryError):
    transient = True


class AuthError(RegistryError):
    """Credentials missing or rejected."""


class NotFound(RegistryError):
    """A manifest, tag or blob does not exist."""


class UnsupportedMedia(RegistryError):
    """The artifact is not a container image this tool can handle."""


class TransientRegistryError(RegistryError):
    transient = True


class DeriveError(ImagefarmError):
    """A base image cannot be turned into an agent-server image."""


class PayloadError(ImagefarmError):
    """The agent-server payload cannot be built."""


class SignatureError(ImagefarmError):
    """A payload, verification record or provenance without a valid signature by a
    trusted key (``imagefarm.sign``): refused, never taken as a miss. Servers answer 409."""

    status_code = 409


class VerifyError(ImagefarmError):
    """A derived image failed its boot check."""


def http_status(exc: BaseException) -> int:
    """The one mapping from error to HTTP status, shared by the lookup API and the runtime
    server: 400 bad reference, 502 upstream registry failure, a runtime error's own, else 500."""
    return exc.status_code if isinstance(exc, ImagefarmError) else 500
