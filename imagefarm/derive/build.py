"""The buildah path, for recipes whose kind is "buildah" (they need RUN steps on the base).

Slow by nature (the base layers are pulled and a new layer is built), so it is used
only when a recipe cannot be a single appended layer. It keeps the fast path's
contract: the same deterministic tag, the same annotations (so the idempotency check
and the lookup work unchanged), ``--timestamp 0`` for reproducible layers, and
``--layers`` so a rebuild of the same base and recipe hits buildah's cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol, Sequence

from imagefarm import oci
from imagefarm.host.containers import run
from imagefarm.errors import DeriveError
from imagefarm.names.reference import Prefix, Reference, parse
from imagefarm.registry import RegistryClient
from imagefarm.settings import Settings
from imagefarm.names.tags import derived_reference
from . import provenance, surgery
from .append import existing_derive
from .values import DeriveResult


class BuildRecipe(Protocol):
    """What the buildah path needs from a recipe (``imagefarm.payload.recipe.Recipe`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def agent_server_version(self) -> str: ...
    @property
    def env(self) -> Sequence[str]: ...
    @property
    def containerfile(self) -> str | None: ...


def render(template: str, base: Reference, env: Sequence[str] = ()) -> str:
    """The Containerfile: ``{base}`` -> ``registry/repo@digest`` (only that placeholder,
    so shell ``${VARS}`` in RUN lines pass through), a FROM added if the template has
    none, recipe env as ENV lines at the end."""
    text = template.replace("{base}", str(base))
    if not any(line.strip().upper().startswith("FROM ") for line in text.splitlines()):
        text = f"FROM {base}\n{text}"
    text = text.rstrip("\n")
    for item in env:
        key, _, value = item.partition("=")
        text += f'\nENV {key}="{value}"'
    return text.rstrip("\n") + "\n"


def _tls(settings: Settings, ref: Reference) -> list[str]:
    return ["--tls-verify=false"] if ref.registry.insecure(settings) else []


def build(base: Reference | str, recipe: BuildRecipe, settings: Settings, *,
          client: RegistryClient | None = None, to: Prefix | str | None = None,
          context: Path | None = None) -> DeriveResult:
    """Build ``recipe`` on ``base`` with buildah and push it under the derived tag."""
    if not recipe.containerfile:
        raise DeriveError(f"recipe {recipe.name!r} has no containerfile: it cannot take the buildah path")
    base = parse(base) if isinstance(base, str) else base
    to = settings.prefix if to is None else to
    own = client is None
    client = client or RegistryClient(settings)
    try:
        with client.track() as st:
            resolved = client.resolve(base, settings.platform)
            target = derived_reference(base, resolved.digest, recipe.name, recipe.digest,
                                       recipe.agent_server_version, to)
            digest = existing_derive(client, target, resolved.digest, recipe.digest)
            skipped = digest is not None
            if digest is None:
                digest = _buildah(base.with_digest(resolved.digest), target, recipe, settings, context)
                desc = client.head_manifest(target.with_digest(digest))
                provenance.publish(client, target, digest, desc.size if desc else 0, base=base,
                                   base_digest=resolved.digest, how="buildah", recipe=recipe.name,
                                   recipe_digest=recipe.digest, agent_server_version=recipe.agent_server_version)
        # blobs and bytes are buildah's business (not counted); requests are ours only
        return DeriveResult(base=str(base), base_digest=resolved.digest, image=str(target), digest=digest,
                            skipped=skipped, blobs_uploaded=0, bytes_moved=0, requests=st.requests,
                            kind="buildah")
    finally:
        if own:
            client.close()


def _buildah(pinned: Reference, target: Reference, recipe: BuildRecipe, settings: Settings,
             context: Path | None) -> str:
    base_ref = Reference(pinned.registry, pinned.repository, None, pinned.digest)
    ann = {
        oci.ANN_BASE_NAME: str(Reference(pinned.registry, pinned.repository, pinned.tag)),
        oci.ANN_BASE_DIGEST: pinned.digest or "",
        oci.ANN_RECIPE: recipe.name,
        oci.ANN_RECIPE_DIGEST: recipe.digest,
        oci.ANN_AGENT_VERSION: recipe.agent_server_version,
    }
    surgery.merge_env([], recipe.env)  # same env rules as the fast path
    with tempfile.TemporaryDirectory(prefix="imagefarm-build-") as tmp:
        ctx = Path(context) if context else Path(tmp) / "context"
        ctx.mkdir(parents=True, exist_ok=True)
        containerfile = Path(tmp) / "Containerfile"
        containerfile.write_text(render(recipe.containerfile or "", base_ref, recipe.env))
        flags: list[str] = []
        for k, v in ann.items():
            flags += ["--annotation", f"{k}={v}", "--label", f"{k}={v}"]
        run(settings, ["buildah", "bud", "--isolation", "chroot", "--layers", "--timestamp", "0",
                       "--format", "oci", "--platform", settings.platform, "--pull=true",
                       *_tls(settings, pinned), *flags, "-f", str(containerfile), "-t", str(target),
                       str(ctx)], timeout=3600)
        digestfile = Path(tmp) / "digest"
        run(settings, ["buildah", "push", *_tls(settings, target), "--format", "oci",
                       "--digestfile", str(digestfile), str(target), f"docker://{target}"], timeout=3600)
        digest = digestfile.read_text().strip()
    if not digest.startswith("sha256:"):
        raise DeriveError(f"buildah push of {target} reported no digest")
    return digest
