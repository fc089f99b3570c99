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
    └── VerifyError              a derived image does not boot or answers wrongly

Every message names the bad input and, where there is one, the fix.
"""

from __future__ import annotations


class ImagefarmError(Exception):
    """Base of every error imagefarm raises on purpose."""

    #: transient errors may succeed on retry (the farm retries them with backoff)
    transient: bool = False


class InvalidReference(ImagefarmError, ValueError):
    """A malformed image reference."""


class ImageRefused(ImagefarmError):
    """A derived image named by the caller that must not be served: built with another
    recipe, or (by digest) without a passed boot check. Servers answer 409."""


class ConfigError(ImagefarmError):
    """Bad settings, recipe or other configuration."""


class DatasetError(ConfigError):
    """A dataset that cannot be read (missing file, wrong columns)."""


class ToolError(ImagefarmError):
    """An external tool exited with an error."""


class ToolMissing(ToolError):
    """An external tool is not installed."""


class RegistryError(ImagefarmError):
    """The registry refused or failed a request."""


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


class VerifyError(ImagefarmError):
    """A derived image failed its boot check."""
