"""``imagefarm payload build|show|push``: the agent-server payload layer of a recipe."""

from __future__ import annotations

import time

import typer

from imagefarm.errors import ImagefarmError
from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out

#: the one ``--agent-server-version`` option (payload, prebuild, derive, lookup, runtime serve)
VERSION_HELP = ("openhands-agent-server version from PyPI (IMAGEFARM_AGENT_SERVER_VERSION); "
                "building: the recipe at it (own digest, tags); serving: the images at it")


def version_option() -> str | None:
    return typer.Option(None, "--agent-server-version", metavar="VERSION", help=VERSION_HELP)

payload_app = typer.Typer(help="The agent-server payload: one layer that runs on any x86_64 base.",
                          no_args_is_help=True)
app.add_typer(payload_app, name="payload")


def _summary(p, cached: bool | None = None) -> dict:
    d = p.to_json()
    d["digest"] = p.layer.digest
    d["size"] = p.layer.size
    if cached is not None:
        d["cached"] = cached
    return d


def _print(p, cached: bool | None = None) -> None:
    out.print(f"recipe        {p.recipe_name} ({p.recipe_digest[:19]})", highlight=False)
    out.print(f"agent-server  {p.agent_server_version} (python {p.python_version})", highlight=False)
    out.print(f"digest        {p.layer.digest}", highlight=False)
    out.print(f"diff_id       {p.layer.diff_id}", highlight=False)
    out.print(f"size          {p.layer.size / 1e6:.1f} MB compressed, "
              f"{p.uncompressed_size / 1e6:.1f} MB unpacked", highlight=False)
    out.print(f"blob          {p.layer.path}", highlight=False, soft_wrap=True)
    if cached is not None:
        out.print(f"cached        {'yes' if cached else f'no (built in {p.build_seconds:.0f}s)'}", highlight=False)


@payload_app.command("build")
@friendly
def build_cmd(
    recipe: str = typer.Option(None, "--recipe", help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: str = version_option(),
    force: bool = typer.Option(False, "--force", help="rebuild even when cached"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    debian_mirror: str = typer.Option(
        None, "--debian-mirror", metavar="URL",
        help="Debian mirror for the builder (default: the recipe's, else this machine's apt sources)"),
    old_mirror: str = typer.Option(None, "--mirror", hidden=True),  # the old name, still read
) -> None:
    """Build (or find in the cache) the payload layer of a recipe.

    Minutes the first time (debootstrap of the builder, the server's install); a
    cache hit afterwards, until the recipe changes.
    """
    from imagefarm.payload import build_payload, load_payload
    from imagefarm.payload.recipe import recipe_for

    settings = Settings.load(recipe=recipe, agent_server_version=agent_server_version)
    rec = recipe_for(settings)
    cached = not force and load_payload(settings, rec) is not None
    t0 = time.monotonic()
    if not cached:
        console.print(f"building the payload of recipe {rec.name} ({rec.agent_server.package} "
                      f"{rec.agent_server_version}) ...", highlight=False)
    mirror = debian_mirror if debian_mirror is not None else old_mirror
    if mirror is not None and not mirror.startswith(("http://", "https://", "file:/")):
        flag = "--debian-mirror" if debian_mirror is not None else "--mirror"
        raise typer.BadParameter(f"{flag} must be an http(s):// or file:/ URL, not {mirror!r}")
    p = build_payload(settings, rec, force=force, mirror=mirror,
                      log=lambda m: console.print(f"[{time.monotonic() - t0:5.0f}s] {m}", highlight=False,
                                                  markup=False, soft_wrap=True))
    if as_json:
        emit_json(_summary(p, cached))
    else:
        _print(p, cached)


@payload_app.command("show")
@friendly
def show_cmd(
    recipe: str = typer.Option(None, "--recipe", help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: str = version_option(),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Show the cached payload of a recipe (version, size, digest); exit 1 if not built."""
    p = _cached(Settings.load(recipe=recipe, agent_server_version=agent_server_version))
    if as_json:
        emit_json(_summary(p))
    else:
        _print(p)


@payload_app.command("push")
@friendly
def push_cmd(
    to: str = typer.Option(None, "--to", metavar="PREFIX", help="registry prefix (IMAGEFARM_TO)"),
    recipe: str = typer.Option(None, "--recipe", help="recipe name or path (IMAGEFARM_RECIPE)"),
    agent_server_version: str = version_option(),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Publish the cached payload in a registry, named by its recipe digest.

    Machines without the payload (a cluster user cannot build it as root) then find it
    there: `derive` and `prebuild` mount the blob from it and download nothing.
    """
    from imagefarm.payload.remote import push
    from imagefarm.registry import RegistryClient

    settings = Settings.load(to=to, recipe=recipe, agent_server_version=agent_server_version)
    p = _cached(settings)
    with RegistryClient(settings) as client:
        ref, digest, sent = push(client, p, settings.to)
    if as_json:
        emit_json({"artifact": str(ref), "digest": digest, "layer": p.layer.digest,
                   "recipe_digest": p.recipe_digest, "blob_uploaded": sent})
    else:
        out.print(f"{ref}@{digest}", highlight=False, soft_wrap=True)
        console.print(f"payload {p.layer.digest[:19]} ({p.layer.size / 1e6:.0f} MB) "
                      f"{'uploaded' if sent else 'already there'}", highlight=False)


def _cached(settings: Settings):
    """The cached payload of the settings' recipe, or exit 1 saying how to build it."""
    from imagefarm.payload import load_payload
    from imagefarm.payload.recipe import recipe_for

    rec = recipe_for(settings)
    p = load_payload(settings, rec)
    if p is None:
        console.print(f"no payload built for recipe {rec.name} ({rec.digest[:19]}) on this machine: "
                      f"run `imagefarm payload build --recipe {rec.name} --agent-server-version {rec.agent_server_version}`", highlight=False)
        raise typer.Exit(1)
    return p


@payload_app.command("list")
@friendly
def list_cmd(
    to: str = typer.Option(None, "--to", metavar="PREFIX",
                           help="also list the payloads published under this registry prefix"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """The payloads built on this machine (cache) and pushed (under --to), one per
    recipe digest: which agent-server versions are there. ``current`` says whether the
    digest is still its recipe's at that version (false: stale, built from an older
    recipe; null: no recipe of that name in the recipes directory)."""
    from imagefarm.payload.cache import cached_payloads
    from imagefarm.payload.recipe import load_recipe

    settings = Settings.load(to=to)
    recipes: dict[str, object] = {}

    def current(name: str, version: str, digest: str) -> bool | None:
        if name not in recipes:
            try:
                recipes[name] = load_recipe(name, settings.recipes_dir)
            except ImagefarmError:
                recipes[name] = None
        rec = recipes[name]
        if rec is None:
            return None  # no recipe of that name here
        try:
            return rec.at_version(version).digest == digest
        except ImagefarmError:
            return False

    rows: dict[str, dict] = {}
    for p in cached_payloads(settings):
        rows[p.recipe_digest] = {"recipe_name": p.recipe_name, "agent_server_version": p.agent_server_version,
                                 "recipe_digest": p.recipe_digest, "digest": p.layer.digest,
                                 "built": True, "pushed": None}
    if to is not None:
        from imagefarm.payload.remote import published
        from imagefarm.registry import RegistryClient

        for r in rows.values():
            r["pushed"] = False
        with RegistryClient(settings) as client:
            for got in published(client, settings.to):
                row = rows.setdefault(got["recipe_digest"], {**got, "built": False})
                row.update(pushed=True, artifact=got["artifact"])
    from imagefarm.settings import version_key

    table = sorted(rows.values(), key=lambda r: (r["recipe_name"], version_key(r["agent_server_version"])))
    for r in table:
        r["current"] = current(r["recipe_name"], r["agent_server_version"], r["recipe_digest"])
    if as_json:
        emit_json(table)
        return
    for r in table:
        where = ", ".join(w for w, on in (("built", r["built"]), ("pushed", r["pushed"])) if on) or "-"
        out.print(f"{r['recipe_name']:<10} {r['agent_server_version']:<10} {r['recipe_digest'][:19]}  "
                  f"{where:<14} {({True: 'current', False: 'stale'}).get(r['current'], 'no recipe here')}", highlight=False)
