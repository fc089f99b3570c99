"""``imagefarm verify IMAGE``: boot an agent-server image and prove it serves."""

from __future__ import annotations

import typer

from imagefarm.settings import Settings
from ._app import app, console, emit_json, friendly, out


@app.command("verify")
@friendly
def verify_cmd(
    image: str = typer.Argument(..., metavar="IMAGE", help="agent-server image reference"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds to wait for /alive and /health"),
    user: str = typer.Option(None, "--user", help="run as this user (e.g. 10001, as APIRemoteWorkspace does)"),
    workdir: str = typer.Option(None, "--workdir", help="working directory to start in"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    tree: bool = typer.Option(False, "--tree", help="instead of booting: unpack IMAGE and its base with skopeo "
                              "and umoci and prove IMAGE is the base plus its top (payload) layer, file for file"),
    payload_digest: str = typer.Option(None, "--payload-digest", metavar="DIGEST",
                                       help="with --tree: the top layer must be this blob"),
) -> None:
    """Start IMAGE with podman the way a runtime does, wait for /alive and /health,
    run a command through the agent server's API and check it sees the base's python.

    With --tree: an independent check of a derived (for example re-layered) image,
    sharing no code with the deriver: every path, type, mode, owner, size, content
    digest and link target of IMAGE minus its top layer equals its base's.

    Exit 2 with the reason (timeout, crash with log lines, wrong python, the paths that
    differ) on failure.
    """
    from imagefarm.farm.verify import verify

    settings = Settings.load()
    if tree:
        from imagefarm.errors import VerifyError
        from imagefarm.farm.treecheck import prove_tree

        console.print(f"unpacking {image} and its base with umoci ...", highlight=False)
        proof = prove_tree(settings, image, payload_digest=payload_digest)
        if as_json:
            emit_json(proof.to_json())
        if not proof.ok:
            raise VerifyError(f"{image} is not its base {proof.base} plus its top layer: "
                              + "; ".join(proof.differences[:10]))
        if not as_json:
            out.print(f"ok {image}: {proof.paths} paths equal to {proof.base} + {proof.top_layer}",
                      highlight=False, soft_wrap=True)
        return
    console.print(f"verifying {image} ...", highlight=False)
    result = verify(settings, image, timeout=timeout, user=user, workdir=workdir)
    if as_json:
        emit_json(result.to_json())
        return
    out.print(f"ok {image}", highlight=False, soft_wrap=True)
    for check in result.checks:
        out.print(f"  {check}", highlight=False, markup=False, soft_wrap=True)
