"""``imagefarm keys init|show``: the farm's signing key pair."""

from __future__ import annotations

import typer

from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out

keys_app = typer.Typer(help="The ed25519 key pair that signs what this farm publishes (payloads, "
                            "verification records, provenance).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _show(settings: Settings, as_json: bool, made: bool | None = None) -> None:
    from imagefarm.sign import keys

    s = keys.signer(settings.config_dir, log=lambda m: None)
    pub = s.path.with_name(keys.PUB_NAME)
    trusted = sorted(keys.trust_store(settings.config_dir, settings.trusted_keys).keys)
    if as_json:
        emit_json({"private": str(s.path), "public": str(pub), "keyid": s.keyid, "trusted": trusted,
                   **({} if made is None else {"made": made})})
        return
    out.print(f"private key  {s.path} (0600)", highlight=False, soft_wrap=True)
    out.print(f"public key   {pub}", highlight=False, soft_wrap=True)
    out.print(f"key id       {s.keyid}", highlight=False)
    out.print(f"trusted      {', '.join(k[:12] for k in trusted)}", highlight=False)


@keys_app.command("init")
@friendly
def init_cmd(
    force: bool = typer.Option(False, "--force", help="replace an existing key (what it signed is then "
                                                      "trusted only where the old public key still is)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Make this machine's signing key under the config directory (IMAGEFARM_CONFIG_DIR,
    default $XDG_CONFIG_HOME/imagefarm); nothing happens if it exists (without --force).

    Give the public half (keys/farm.pub) to every machine that reads what this one
    publishes: they list it in IMAGEFARM_TRUSTED_KEYS."""
    from imagefarm.sign import keys

    settings = Settings.load()
    path, made = keys.init_keys(settings.config_dir, force=force)
    if not as_json:
        console.print(f"{'made' if made else 'kept the existing'} signing key {path}", highlight=False)
    _show(settings, as_json, made)


@keys_app.command("show")
@friendly
def show_cmd(as_json: bool = typer.Option(False, "--json", help="print as JSON")) -> None:
    """Where the key pair is, its id, and the ids of every trusted key."""
    _show(Settings.load(), as_json)
