"""Session fixtures: real services on free loopback ports, isolated container storage.

Nothing here is a mock. The registry is Debian's docker-registry, Redis is
redis-server, containers run under podman with the project's own configuration and
storage under a temporary state directory. Everything started is stopped at the end.
Slow parts (debootstrapped rootfs, payload) are cached under the user's cache dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagefarm.host.containers import release_mounts, run
from imagefarm.settings import Settings
from imagefarm.host.samples import FixtureFactory
from imagefarm.host.services import Redis, Registry

# recipes/ plus the test-only recipes (broken.toml must not ship in the wheel)
HERE = Path(__file__).resolve().parent
TEST_RECIPES = HERE / "recipes"

REQUIRED = {
    "docker-registry": "apt-get install -y docker-registry",
    "redis-server": "apt-get install -y redis-server",
    "podman": "apt-get install -y podman runc",
    "runc": "apt-get install -y runc",
    "buildah": "apt-get install -y buildah",
    "skopeo": "apt-get install -y skopeo",
    "debootstrap": "apt-get install -y debootstrap",
    "htpasswd": "apt-get install -y apache2-utils",
    "git": "apt-get install -y git",
    "slurmctld": "apt-get install -y slurm-wlm munge",
    "munged": "apt-get install -y munge",
}


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [f"{tool} ({fix})" for tool, fix in REQUIRED.items() if not shutil.which(tool)]
    if missing:
        raise pytest.UsageError(
            "the test suite needs real tools that are not installed: " + ", ".join(missing)
            + ". Run scripts/setup (or `make test`), which installs them."
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suites by kind are folders; mark them too, so ``-m "not e2e"`` works anywhere."""
    for item in items:
        kind = item.path.relative_to(HERE).parts[0]
        if kind in ("e2e", "reliability"):
            item.add_marker(kind)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user's cache (debootstrap rootfs, payload): shared across runs on purpose."""
    return Settings().cache_dir


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Settings:
    """Settings with a private state dir (so podman/buildah storage is isolated)."""
    state = tmp_path_factory.mktemp("state")
    s = Settings(state_dir=state, cache_dir=cache_dir, recipes_dir=TEST_RECIPES)
    yield s
    # leave no container or mount behind
    run(s, ["podman", "rm", "--all", "--force", "--time", "0"], check=False, timeout=120)
    run(s, ["buildah", "rm", "--all"], check=False, timeout=120)
    release_mounts(s)
    # the storage's files (100+ s of unlinking after a full run, measured; `podman system
    # reset` costs the same) are removed by a process of their own, not on the suite's clock
    trash = state.with_name(f".trash-{state.name}-{os.getpid()}")
    (state / "containers").rename(trash)
    subprocess.Popen(["rm", "-rf", "--one-file-system", str(trash)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The session registry; its access log is on, so tests can count what pulls fetched."""
    with Registry.create(tmp_path_factory.mktemp("registry"), access_log=True) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A registry that requires htpasswd basic auth (user ``farm``, password ``s3cret``)."""
    with Registry.create(tmp_path_factory.mktemp("auth-registry"), users={"farm": "s3cret"}) as reg:
        yield reg


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Redis:
    """The session Redis, with an ACL user and password as `dev up` makes it: every
    farm test's broker URL carries credentials."""
    import secrets

    with Redis.create(tmp_path_factory.mktemp("redis"), password=secrets.token_hex(16)) as r:
        yield r


@pytest.fixture(scope="session")
def fixtures(settings: Settings, registry: Registry) -> FixtureFactory:
    """Makes r2e-style bases in the session registry."""
    with FixtureFactory(settings, registry.host) as f:
        yield f


@pytest.fixture(scope="session")
def project_group(settings: Settings, registry: Registry):
    """Four buildah-made r2e images of a real PyPI project (requests), one per release,
    in the session registry (``imagefarm.host.projects``; built once, then cached)."""
    from imagefarm.host.projects import SMALL, ProjectImages

    with ProjectImages(settings, registry.host, log=lambda m: print(m, file=sys.stderr)) as p:
        return p.push(SMALL)


@pytest.fixture(scope="session")
def r2e_base(fixtures: FixtureFactory):
    return fixtures.r2e_base()


@pytest.fixture(scope="session")
def busybox_base(fixtures: FixtureFactory):
    return fixtures.busybox_base()


@pytest.fixture(scope="session")
def multiarch_base(fixtures: FixtureFactory):
    return fixtures.multiarch()


@pytest.fixture
def cli_env(settings: Settings, registry: Registry, redis_server: Redis) -> dict[str, str]:
    """Environment for running the ``imagefarm`` CLI against the session services."""
    env = dict(os.environ)
    env.update({
        "IMAGEFARM_STATE_DIR": str(settings.state_dir),
        "IMAGEFARM_CACHE_DIR": str(settings.cache_dir),
        "IMAGEFARM_TO": f"{registry.host}/prebuilt",
        "IMAGEFARM_BROKER_URL": redis_server.url,
        "IMAGEFARM_RECIPES_DIR": str(TEST_RECIPES),
    })
    return env


def imagefarm_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``imagefarm`` console script as a user would."""
    return subprocess.run([IMAGEFARM, *args], capture_output=True, text=True, env=env, timeout=timeout)


#: the console script of the environment running the tests (make test does not put it on PATH)
IMAGEFARM = str(Path(sys.executable).parent / "imagefarm")


@pytest.fixture(scope="session")
def sdk_python(settings):
    """openhands-workspace (APIRemoteWorkspace) under Python 3.13 from Debian's packages."""
    from imagefarm.testing.clients import SDK, client_python

    return client_python(settings, "sdk", SDK)


@pytest.fixture(scope="session")
def v0_python(settings):
    """openhands-ai 0.59 (the V0 RemoteRuntime SkyRL uses) under Python 3.13."""
    from imagefarm.testing.clients import V0, client_python

    return client_python(settings, "v0", V0)


@pytest.fixture(scope="session")
def payload(settings):
    """The real agent-server payload (built once, then cached under ~/.cache/imagefarm)."""
    import sys

    from imagefarm.payload import build_payload
    from imagefarm.payload.recipe import recipe_for

    return build_payload(settings, recipe_for(settings), log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def v0_payload(settings):
    """The real V0 action-execution-server payload (recipe ``v0``; built once, then cached)."""
    import sys

    from imagefarm.payload import build_payload
    from imagefarm.payload.recipe import recipe_for

    return build_payload(settings, recipe_for(settings, "v0"), log=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def v0_images(settings, fixtures, registry, v0_payload):
    """The V0 payload derived (real ``Appender``) onto an r2e-style base and the busybox
    base without libc: {"r2e": DeriveResult, "busybox": DeriveResult, "r2e_base": ref}."""
    from imagefarm.derive import Appender, AppendPayload
    from imagefarm.payload.recipe import recipe_for

    payload = AppendPayload.of(v0_payload, recipe_for(settings, "v0"))
    r2e = fixtures.r2e_base()
    busybox = fixtures.busybox_base(repo="fixtures/v0-busybox", tag="1")
    with Appender(settings) as appender:
        out = {"r2e": appender.derive(r2e.ref, payload, to=f"{registry.host}/prebuilt"),
               "busybox": appender.derive(busybox.ref, payload, to=f"{registry.host}/prebuilt")}
    out["r2e_base"] = r2e.ref
    return out
