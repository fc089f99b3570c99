import pytest

from imagefarm.errors import InvalidReference
from imagefarm.names.reference import parse


@pytest.mark.parametrize("text,expected", [
    ("namanjain12/pandas_final:abc", "docker.io/namanjain12/pandas_final:abc"),
    ("docker.io/namanjain12/pandas_final:abc", "docker.io/namanjain12/pandas_final:abc"),
    ("index.docker.io/namanjain12/pandas_final:abc", "docker.io/namanjain12/pandas_final:abc"),
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("ubuntu:22.04", "docker.io/library/ubuntu:22.04"),
    ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
    ("127.0.0.1:5000/xingyaoww/r2e-namanjain12/pandas_final:t", "127.0.0.1:5000/xingyaoww/r2e-namanjain12/pandas_final:t"),
    ("ghcr.io/openhands/agent-server:1.0-python", "ghcr.io/openhands/agent-server:1.0-python"),
    ("docker://quay.io/a/b:c", "quay.io/a/b:c"),
    ("r@sha256:" + "a" * 64, "docker.io/library/r@sha256:" + "a" * 64),
    ("[::1]:5000/x:1", "[::1]:5000/x:1"),
])
def test_normalise(text, expected):
    assert str(parse(text)) == expected


def test_familiar_round_trip():
    assert parse("ubuntu").familiar == "ubuntu:latest"
    assert parse("namanjain12/pandas_final:abc").familiar == "namanjain12/pandas_final:abc"
    assert parse("127.0.0.1:5000/a:b").familiar == "127.0.0.1:5000/a:b"


def test_loopback_is_plain_http():
    assert parse("localhost:5000/a").is_loopback
    assert parse("127.0.0.1:5000/a").is_loopback
    assert not parse("registry.example.com/a").is_loopback
    assert parse("docker.io/a/b").api_host == "registry-1.docker.io"
    # loopback IP literals and localhost only: a name that starts with 127. is a remote host
    for host in ("127.0.0.2:5000", "127.255.0.1", "[::1]:5000", "LOCALHOST:5000", "localhost"):
        assert parse(f"{host}/a:1").is_loopback, host
    for host in ("127.corp.example", "127.corp.example:5000", "127.0.0.1.nip.io:5000", "10.0.0.1:5000",
                 "[fe80::1]:5000", "localhost.example.com"):
        assert not parse(f"{host}/a:1").is_loopback, host
    from imagefarm.registry import RegistryClient
    from imagefarm.settings import Settings

    with RegistryClient(Settings(insecure_registries=["reg.lan:5000"]), credentials={}) as c:
        assert c.base_url(parse("127.corp.example/a:1")) == "https://127.corp.example"
        assert c.base_url(parse("127.0.0.1:5000/a:1")) == "http://127.0.0.1:5000"
        assert c.base_url(parse("reg.lan:5000/a:1")) == "http://reg.lan:5000"  # configured host


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("   ", "empty"),
    ("name with space:1", "whitespace"),
    ("Namanjain12/pandas:1", "lower case"),
    ("x@sha256:1234", "digest"),
    ("x@md5:" + "a" * 32, "digest"),
    ("x:" + "a" * 200, "longer than 128"),
    ("x:-bad", "tag"),
    ("a//b", "repository"),
])
def test_malformed(text, needle):
    with pytest.raises(InvalidReference) as err:
        parse(text)
    assert needle in str(err.value)


def test_with_tag_validates():
    ref = parse("a/b:c")
    assert str(ref.with_tag("d")) == "docker.io/a/b:d"
    with pytest.raises(InvalidReference):
        ref.with_tag("a" * 129)
