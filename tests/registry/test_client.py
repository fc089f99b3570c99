"""The registry client against a real docker-registry (and a fault proxy in front of it)."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from imagefarm import oci
from imagefarm.errors import (AuthError, NotFound, RegistryError, RegistryUnreachable, TransientRegistryError,
                              UnsupportedMedia)
from imagefarm.names.reference import parse
from imagefarm.registry import Index, Manifest, RegistryClient
from imagefarm.settings import Settings
from imagefarm.host.services import Registry, free_port

from regkit import _reply, push_image, tiny_layers


def skopeo_raw(ref: str) -> dict:
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_push_resolve_head_roundtrip(client, reg, tmp_path):
    ref = parse(f"{reg.host}/namanjain12/pandas_final:{'a' * 40}")
    layers = tiny_layers(tmp_path, "x", "y")
    digest = push_image(client, ref, layers)
    got = client.resolve(ref)
    assert isinstance(got.manifest, Manifest) and got.digest == digest
    assert [d.digest for d in got.manifest.layers] == [l.digest for l in layers]
    assert client.head_manifest(ref).digest == digest
    assert client.head_manifest(ref.with_tag("nope")) is None
    assert skopeo_raw(str(ref))["layers"][1]["digest"] == layers[1].digest
    # pinned by digest: content is checked against it
    assert client.get_manifest(ref.with_digest(digest)).digest == digest


def test_blob_upload_modes_and_stream_get(client, reg, tmp_path):
    ref = parse(f"{reg.host}/blobs/modes:1")
    data = bytes(range(256)) * 5000  # 1.28 MB
    d = oci.sha256_digest(data)
    path = tmp_path / "blob"
    path.write_bytes(data)
    client.upload_blob(ref, d, path, chunk_size=300_000)          # PATCH-chunked from a file
    assert client.blob_exists(ref, d)
    ref2 = ref.with_repository(ref.registry, "blobs/iter")
    client.upload_blob(ref2, d, iter([data[:1000], data[1000:]]), size=len(data))  # one-shot iterator
    with client.open_blob(ref2, d) as chunks:
        assert b"".join(chunks) == data
    assert client.stats.total.blobs_uploaded == 2


def test_mount_201_and_202(client, reg, tmp_path):
    src = parse(f"{reg.host}/mount/src:1")
    dst = parse(f"{reg.host}/mount/dst:1")
    layer = tiny_layers(tmp_path, "m")[0]
    client.upload_blob(src, layer.digest, layer.path)
    assert client.mount_blob(dst, layer.digest, src.repository) == (True, None)
    assert client.blob_exists(dst, layer.digest)
    other = tiny_layers(tmp_path, "not-in-src")[0]
    mounted, location = client.mount_blob(dst, other.digest, src.repository)
    assert not mounted and location
    client.upload_blob(dst, other.digest, other.path, location=location)  # falls back to upload
    assert client.blob_exists(dst, other.digest)


def test_copy_blob_between_registries_streams(client, reg, tmp_path):
    with Registry.create() as other:
        src = parse(f"{reg.host}/copy/src:1")
        dst = parse(f"{other.host}/copy/dst:1")
        data = b"z" * 3_000_000
        d = oci.sha256_digest(data)
        client.upload_blob(src, d, data)
        before = client.stats.total.blob_bytes_uploaded
        client.copy_blob(src, dst, oci.Descriptor(oci.OCI_LAYER_GZIP, d, len(data)))
        assert client.blob_exists(dst, d)
        assert client.stats.total.blob_bytes_uploaded - before == len(data)


def test_tag_listing_paginates(client, proxy, tmp_path):
    """distribution 2.8 returns every tag at once; the proxy pages like distribution 3 / Hub."""
    proxy.tag_page = 2
    ref = parse(f"{proxy.host}/tags/many:t0")
    layers = tiny_layers(tmp_path, "t")
    for i in range(5):
        push_image(client, ref.with_tag(f"t{i}"), layers)
    n_before = client.stats.total.requests
    assert client.list_tags(ref, page_size=2) == [f"t{i}" for i in range(5)]
    assert client.stats.total.requests - n_before == 3  # three pages via Link headers


def test_index_resolves_to_linux_amd64(client, reg, tmp_path):
    ref = parse(f"{reg.host}/multi/arch:1")
    amd = push_image(client, ref.with_tag("amd"), tiny_layers(tmp_path, "amd"))
    arm = push_image(client, ref.with_tag("arm"), tiny_layers(tmp_path, "arm"), architecture="arm64")
    size = lambda tag: client.head_manifest(ref.with_tag(tag)).size  # noqa: E731
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": arm, "size": size("arm"),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": oci.OCI_MANIFEST, "digest": amd, "size": size("amd"),
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]})
    client.put_manifest(ref, index, oci.OCI_INDEX)
    assert isinstance(client.get_manifest(ref), Index)
    got = client.resolve(ref)
    assert got.digest == amd and got.index is not None
    assert client.resolve(ref, "linux/arm64").digest == arm
    with pytest.raises(UnsupportedMedia, match=r"no image for platform linux/s390x.*linux/amd64"):
        client.resolve(ref, "linux/s390x")


def test_not_found_names_ref_and_quotes_registry(client, reg):
    ref = parse(f"{reg.host}/namanjain12/pandas_final:doesnotexist")
    with pytest.raises(NotFound) as e:
        client.get_manifest(ref)
    assert str(ref) in str(e.value) and "MANIFEST_UNKNOWN" in str(e.value)


def test_artifact_is_not_an_image(client, reg, tmp_path):
    ref = parse(f"{reg.host}/charts/thing:1")
    cfg = b"{}"
    client.upload_blob(ref, oci.sha256_digest(cfg), cfg)
    layer = tiny_layers(tmp_path, "chart")[0]
    client.upload_blob(ref, layer.digest, layer.path)
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json",
                      "digest": oci.sha256_digest(cfg), "size": 2},
           "layers": [{"mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
                       "digest": layer.digest, "size": layer.size}]}
    client.put_manifest(ref, oci.canonical_json(doc), oci.OCI_MANIFEST)
    with pytest.raises(UnsupportedMedia, match="OCI artifact.*helm"):
        client.get_manifest(ref)


def test_manifest_over_4mib_refused(client, reg, proxy, tmp_path):
    """distribution itself refuses to store one; a registry that serves one anyway
    (here the proxy) is refused by the client before it is read into memory."""
    ref = parse(f"{proxy.host}/big/manifest:1")
    layer = tiny_layers(tmp_path, "big")[0]
    push_image(client, ref.with_tag("small"), [layer])
    config = client.get_manifest(ref.with_tag("small")).config
    doc = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "config": config.to_json(),
           "layers": [layer.descriptor.to_json()], "annotations": {"pad": "x" * (4 * 1024 * 1024 + 10)}}
    big = oci.canonical_json(doc)
    with pytest.raises(RegistryError, match="MANIFEST_INVALID"):
        client.put_manifest(ref, big, oci.OCI_MANIFEST)
    proxy.canned["/v2/big/manifest/manifests/1"] = (oci.OCI_MANIFEST, big)
    with pytest.raises(UnsupportedMedia, match="over the 4194304 byte limit"):
        client.get_manifest(ref)


# -- retries -------------------------------------------------------------------------
def test_retries_5xx_and_dropped_connections(client, proxy, tmp_path):
    ref = parse(f"{proxy.host}/flaky/repo:1")
    layers = tiny_layers(tmp_path, "f")
    push_image(client, ref, layers)
    proxy.faults = ["503", "drop", "429"]
    got = client.resolve(ref)
    assert got.manifest.layers[0].digest == layers[0].digest
    # 503 and the drop are retried; the bare 429 is waited out at the rate-limit gate
    assert client.stats.total.retries == 2 and client.stats.total.rate_limited == 1
    # an upload whose PUT is dropped restarts in a fresh session
    data = b"u" * 100_000
    proxy.faults = [None, "drop"]  # POST ok, PUT dropped
    client.upload_blob(ref, oci.sha256_digest(data), data)
    assert client.blob_exists(ref, oci.sha256_digest(data))


def test_retries_run_out(rsettings, proxy):
    ref = parse(f"{proxy.host}/flaky/repo:1")
    with RegistryClient(rsettings, retries=2, backoff=0.01, credentials={}) as c:
        proxy.faults = ["503"] * 10
        with pytest.raises(TransientRegistryError, match="503 after 3 tries"):
            c.head_manifest(ref)


def test_unreachable_registry(rsettings):
    ref = parse(f"127.0.0.1:{free_port()}/nobody/home:1")
    with RegistryClient(rsettings, retries=1, backoff=0.01, credentials={}) as c:
        with pytest.raises(RegistryUnreachable, match="cannot reach registry"):
            c.get_manifest(ref)


# -- auth ------------------------------------------------------------------------------
def _auth_file(tmp_path, host, user, password):
    p = tmp_path / "auth.json"
    p.write_text(json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return p


@pytest.fixture(scope="module")
def basic_reg(tmp_path_factory):
    with Registry.create(tmp_path_factory.mktemp("basic"), users={"farm": "s3cret"}) as r:
        yield r


def test_basic_auth_from_auth_file(basic_reg, tmp_path):
    s = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, basic_reg.host, "farm", "s3cret"))
    with RegistryClient(s) as c:
        ref = parse(f"{basic_reg.host}/secure/repo:1")
        digest = push_image(c, ref, tiny_layers(tmp_path, "s"))
        assert c.resolve(ref).digest == digest


def test_basic_auth_wrong_password(basic_reg, tmp_path):
    s = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, basic_reg.host, "farm", "wrong"))
    with RegistryClient(s) as c, pytest.raises(AuthError) as e:
        c.get_manifest(parse(f"{basic_reg.host}/secure/repo:1"))
    msg = str(e.value)
    assert basic_reg.host in msg and "podman login" in msg and "'farm'" in msg


def test_basic_auth_no_credentials(basic_reg, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with RegistryClient(Settings(state_dir=tmp_path)) as c, pytest.raises(AuthError, match="none were found"):
        c.get_manifest(parse(f"{basic_reg.host}/secure/repo:1"))


def test_bearer_token_flow_with_scopes(proxy, reg, tmp_path):
    """Token realm followed with service + scopes; one token per scope set, reused."""
    ref = parse(f"{proxy.host}/tok/target:1")
    src = parse(f"{proxy.host}/tok/source:1")
    with RegistryClient(Settings(state_dir=tmp_path), credentials={}, backoff=0.01) as plain:
        layer = tiny_layers(tmp_path, "b")[0]
        plain.upload_blob(src, layer.digest, layer.path)
    proxy.bearer = {"farm": "pw"}
    s = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, proxy.host, "farm", "pw"))
    with RegistryClient(s) as c:
        scopes = ("repository:tok/target:pull,push", "repository:tok/source:pull")
        assert c.mount_blob(ref, layer.digest, src.repository, scopes=scopes) == (True, None)
        assert c.blob_exists(ref, layer.digest, scopes=scopes)
        assert proxy.token_requests == [sorted(scopes)]  # fetched once, reused
        with pytest.raises(AuthError):
            c.blob_exists(parse(f"{proxy.host}/tok/elsewhere:1"), layer.digest,
                          scopes=("repository:tok/target:pull",))
    bad = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, proxy.host, "farm", "nope"))
    with RegistryClient(bad) as c, pytest.raises(AuthError, match="podman login"):
        c.blob_exists(ref, layer.digest)


def test_client_is_shareable_across_threads(client, reg, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    ref = parse(f"{reg.host}/threads/repo:1")
    layers = tiny_layers(tmp_path, *[f"l{i}" for i in range(8)])

    def one(i):
        with client.track() as st:
            push_image(client, ref.with_tag(f"t{i}"), [layers[i]])
            return st.requests

    with ThreadPoolExecutor(8) as pool:
        counts = list(pool.map(one, range(8)))
    # each: POST+PUT layer, POST+PUT config, PUT manifest; plus one GET /v2/ for the client
    assert sorted(counts)[:7] == [5] * 7 and sum(counts) == 8 * 5 + 1, counts
    assert sorted(client.list_tags(ref)) == sorted(f"t{i}" for i in range(8))


def test_credentials_go_only_to_an_https_or_same_host_realm(proxy, reg, tmp_path):
    """A registry naming a plain-http realm on another host gets no password sent there."""
    proxy.bearer = {"farm": "pw"}
    s = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, proxy.host, "farm", "pw"))
    ref = parse(f"{proxy.host}/tok/realm:1")
    port = proxy.host.rsplit(":", 1)[1]
    proxy.realm = f"http://localhost:{port}/token"  # the same server, but another host name
    with RegistryClient(s, backoff=0.01) as c, pytest.raises(AuthError):
        c.blob_exists(ref, "sha256:" + "0" * 64)
    assert proxy.token_auth and all(a == "" for a in proxy.token_auth), proxy.token_auth
    proxy.token_auth.clear()
    proxy.realm = None  # the registry's own host: credentials are sent, and work
    with RegistryClient(s, backoff=0.01) as c:
        assert c.blob_exists(ref, "sha256:" + "0" * 64) is False
    assert proxy.token_auth and proxy.token_auth[0].startswith("Basic ")
    from imagefarm.registry.auth import realm_may_get_credentials

    assert realm_may_get_credentials("https://auth.example/token", "registry.example")
    assert not realm_may_get_credentials("http://auth.example/token", "registry.example")
    assert realm_may_get_credentials("http://registry.example:5001/token", "registry.example:5000")


def test_tag_list_that_links_to_itself_stops(client, proxy):
    proxy.tag_loop = True
    n_before = len(proxy.seen)
    with pytest.raises(RegistryError, match="already read"):
        client.list_tags(parse(f"{proxy.host}/loop/me:1"))
    assert len(proxy.seen) - n_before <= 3  # stopped at the first repeated link


def test_credentials_never_follow_a_link_to_another_host(proxy, tmp_path):
    """A tag page whose ``Link`` names another host: the page there is read, but the
    registry's token (or password) is not sent to it."""
    import http.server
    import json as _json
    import threading

    seen: list[str] = []

    class Other(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization", ""))
            body = _json.dumps({"name": "links/away", "tags": ["t9"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        proxy.bearer = {"farm": "pw"}
        away = f"http://localhost:{other.server_address[1]}/v2/links/away/tags/list?last=t0"
        page = _json.dumps({"name": "links/away", "tags": ["t0"]}).encode()
        proxy.canned["/v2/links/away/tags/list"] = ("application/json", page)
        s = Settings(state_dir=tmp_path, auth_file=_auth_file(tmp_path, proxy.host, "farm", "pw"))
        orig = proxy.handle

        def with_link(h):  # the canned page, plus a Link to the other host
            if h.path == "/v2/links/away/tags/list" and proxy._authorized(h):
                proxy.seen.append(f"{h.command} {h.path}")
                return _reply(h, 200, page, {"Content-Type": "application/json", "Link": f'<{away}>; rel="next"'})
            return orig(h)

        proxy.handle = with_link
        with RegistryClient(s, backoff=0.01) as c:
            assert c.list_tags(parse(f"{proxy.host}/links/away:1")) == ["t0", "t9"]
        assert seen == [""], seen  # asked there, with no Authorization
    finally:
        other.shutdown()
        other.server_close()
