"""Section: V0 clients: the action execution server's image beside the agent server's."""

from __future__ import annotations

from typing import Any

from ..fmt import mb, sec
from . import Context, Section


def body(r: dict[str, Any], ctx: Context) -> list[str]:
    """Section 7: the V0 action execution server's image beside the agent server's."""
    L: list[str] = []
    w = L.append
    w(f"Both images of the base `{r['base'].split('/', 1)[1][:70]}…`, on the node (warm): the runtime server "
      "asked with each client's own command (the agent server's; V0's `micromamba run -n openhands python -u -m "
      "openhands.runtime.action_execution_server 60000 ...`, which selects the `v0` image), interleaved, each "
      "runtime stopped before the next; ready = every path of the recipe's `ready` answers (agent server "
      "`/alive` + `/health`; V0 `/alive`, served once its tmux bash session is up). Own boot: `podman run` "
      f"with the same limits, polled directly. Payloads: agent server {mb(r['payload_bytes']['default'])}, "
      f"V0 {mb(r['payload_bytes']['v0'])} compressed ({mb(r['payload_unpacked_bytes']['v0'])} unpacked).")
    w("")
    w("| start | n | p50 | p95 | min | max |")
    w("|---|---|---|---|---|---|")
    for key, name in (("ready", "runtime `/start` → ready"), ("own_boot", "own boot (`podman run`, polled directly)")):
        for recipe, label in (("default", "agent server (default)"), ("v0", "V0 action execution server (v0)")):
            st = r[key][recipe]
            if st.get("n"):
                w(f"| {label}: {name} | {st['n']} | {sec(st['p50'])} | {sec(st['p95'])} | {sec(st['min'])} | "
                  f"{sec(st['max'])} |")
    w("")
    return L


SECTION = Section(
    "v0",
    8,
    body,
    title="## 8. V0 clients: the action execution server's image beside the agent server's",
)
