"""The fast path: derive an agent-server image by manifest surgery, no layer pulled.

Per base: resolve it (index -> platform manifest), compute the deterministic target
tag, stop if that tag already holds this derive, read the base config, write the new
config (payload diff_id + history + recipe env), place blobs (mount / HEAD-skip /
copy once / upload once), put the OCI manifest with its annotations. With the base
already in the target registry this is ~8 small requests and 0 layer bytes.

One ``Appender`` is meant to serve a whole farm process (thread pool included): its
client pools connections and its ``BlobPlacer`` remembers where blobs are.
"""

from __future__ import annotations

import json
from typing import Sequence

from imagefarm import oci
from imagefarm.errors import DeriveError, NotFound, RegistryError
from imagefarm.names.reference import Prefix, Reference, mirrored, parse
from imagefarm.registry import RegistryClient, Resolved, scope
from imagefarm.registry.manifests import Manifest
from imagefarm.settings import Settings
from imagefarm.names.tags import derived_reference
from . import provenance, surgery
from .blobs import BlobPlacer
from .values import AppendPayload, DeriveResult, PayloadLike

PAYLOAD_REPO = "imagefarm-payload"


def payload_home(to: Prefix | str) -> str:
    """The repository (path) in the target registry where the payload blob is kept."""
    prefix = to if isinstance(to, Prefix) else Prefix.parse(to)
    return prefix.repository(PAYLOAD_REPO).path


def existing_derive(client: RegistryClient, target: Reference, base_digest: str, recipe_digest: str,
                    *, scopes: Sequence[str] | None = None) -> str | None:
    """Digest of the image under ``target`` if it already holds this derive (else None).
    A tag holding something else is overwritten by the caller: the registry is the truth."""
    try:
        got = client.get_manifest(target, scopes=scopes)
    except NotFound:
        return None
    if isinstance(got, Manifest) and surgery.matches(got, base_digest, recipe_digest):
        return got.digest
    return None


class Appender:
    """Derive images by appending the payload layer; share one per process."""

    def __init__(self, settings: Settings | None = None, client: RegistryClient | None = None) -> None:
        self.settings = settings or Settings.load()
        self.client = client or RegistryClient(self.settings)
        self.blobs = BlobPlacer(self.client)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Appender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the verb ----------------------------------------------------------------
    def derive(self, base: Reference | str, payload: PayloadLike, *, to: Prefix | str | None = None,
               publish: bool = True) -> DeriveResult:
        """Derive ``base`` with ``payload`` under ``to`` (default ``settings.to``).

        ``publish=False`` pushes the manifest by digest only: the tag (what lookups and
        runtimes find) is put by ``publish()`` once the image has proven it boots."""
        base = parse(base) if isinstance(base, str) else base
        if not hasattr(payload, "env"):  # e.g. imagefarm.payload.Payload: no recipe env
            payload = AppendPayload.of(payload)
        to = self.settings.prefix if to is None else to if isinstance(to, Prefix) else Prefix.parse(to)
        # the name stays the dataset's; the bytes may come through a mirror
        source = mirrored(base, self.settings.mirrors)
        # a base from another registry (a public one counts manifest GETs): HEAD first,
        # so a base read before (by --plan, an earlier batch) spends no pull
        cross = source.registry != to.registry
        with self.client.track() as st:
            resolved = self.client.resolve(source, self.settings.platform, head_first=cross)
            where = f"base {base}" + (f" (read through {source.registry})" if source != base else "")
            surgery.check_base(resolved.manifest, where)
            target = derived_reference(base, resolved.digest, payload.recipe_name, payload.recipe_digest,
                                       payload.agent_server_version, to)
            scopes = self._scopes(source, target)
            existing = existing_derive(self.client, target, resolved.digest, payload.recipe_digest,
                                       scopes=scopes)
            if existing is not None:
                digest, skipped, published = existing, True, True
            else:
                digest, size = self._derive(base, source, resolved, target, payload, to, scopes, where, publish)
                skipped, published = False, publish
        if not skipped:  # outside the counts above: those are the image's own
            provenance.publish(self.client, target, digest, size, base=base, base_digest=resolved.digest,
                               how="append", recipe=payload.recipe_name, recipe_digest=payload.recipe_digest,
                               agent_server_version=payload.agent_server_version, payload=payload.layer)
        return DeriveResult(
            base=str(base), base_digest=resolved.digest, image=str(target), digest=digest,
            skipped=skipped, blobs_uploaded=st.blobs_uploaded, bytes_moved=st.blob_bytes_uploaded,
            requests=st.requests, published=published)

    def publish(self, image: Reference | str, digest: str) -> bool:
        """Tag the manifest ``digest`` as ``image`` (its deterministic tag); False if it
        already was. The manifest bytes are copied as they are: the digest is kept."""
        ref = parse(image) if isinstance(image, str) else image
        current = self.client.head_manifest(ref)
        if current is not None and current.digest == digest:
            return False
        got = self.client.get_manifest(ref.with_digest(digest))
        self.client.put_manifest(Reference(ref.registry, ref.repository, ref.tag), got.raw, got.media_type)
        return True

    # -- steps -------------------------------------------------------------------
    def _scopes(self, base: Reference, target: Reference) -> tuple[str, ...]:
        """One token scope set for every target call (bearer registries: one token)."""
        out = [scope(target.repository, push=True)]
        if base.registry == target.registry and base.repository != target.repository:
            out.append(scope(base.repository))
        return tuple(out)

    def _derive(self, base: Reference, source: Reference, resolved: Resolved, target: Reference,
                payload: PayloadLike, to: Prefix, scopes: tuple[str, ...], where: str, publish: bool = True
                ) -> tuple[str, int]:
        m = resolved.manifest
        pinned = source.with_digest(m.digest)
        src_scopes = scopes if source.registry == target.registry else None
        try:
            base_config = json.loads(self.client.get_blob_bytes(pinned, m.config.digest, scopes=src_scopes))
        except ValueError:
            raise DeriveError(f"{where}: its config blob {m.config.digest} is not JSON") from None
        ann = surgery.annotations(base, m.digest, payload, source)
        config = surgery.derived_config(base_config, m, payload, ann, platform=self.settings.platform,
                                        where=where)
        manifest = surgery.derived_manifest(m, config, payload, ann)
        home = payload_home(to)
        dest = target if publish else target.with_digest(oci.sha256_digest(manifest))
        for attempt in (0, 1):
            self._place_blobs(pinned, target, m, payload, config, home, scopes)
            try:
                digest = self.client.put_manifest(dest, manifest, oci.OCI_MANIFEST, scopes=scopes)
            except RegistryError as exc:
                if not exc.blob_unknown or attempt:
                    raise
                self.blobs.forget(target)  # someone deleted blobs we believed present
                continue
            return digest, len(manifest)
        raise AssertionError("unreachable")

    def _place_blobs(self, base: Reference, target: Reference, m: Manifest, payload: PayloadLike,
                     config: bytes, home: str, scopes: tuple[str, ...]) -> None:
        for d in m.layers:
            self.blobs.ensure(target, d, source=base, scopes=scopes)
        layer = payload.layer
        # a payload found in a registry (``payload.remote``) has no file here, only the
        # repository holding it: it is mounted from there (copied once across registries)
        self.blobs.ensure(target, layer.descriptor, local=layer.path, home=home,
                          source=getattr(payload, "source", None), scopes=scopes)
        # the config is new for every derive: upload it (tiny, 2 requests)
        self.client.upload_blob(target, oci.sha256_digest(config), config, scopes=scopes)


def derive(base: Reference | str, payload: PayloadLike, settings: Settings | None = None, *,
           to: Prefix | str | None = None) -> DeriveResult:
    """One-off derive (opens and closes its own client); farms should share an ``Appender``."""
    with Appender(settings) as a:
        return a.derive(base, payload, to=to)
