"""Drive the real V0 client (openhands-ai 0.x RemoteRuntime and RemoteRuntimeBuilder).

Runs under a Python >= 3.12 with ``openhands-ai<0.60`` installed (not the project's
venv): ``python v0_client.py URL KEY RUNTIME_IMAGE BASE_IMAGE`` prints one JSON line
per step. The runtime's public calls run on a prebuilt ``v0`` image: ``connect()``
(``/sessions``, ``/start`` with the V0 action execution server command as a list,
``/runtime/{id}``, ``{url}/alive``, then its initial environment through the server),
``run_action(CmdRunAction(...))`` in ``/testbed`` and ``close()`` (``/stop``); then the
builder's calls (``/registry_prefix``, ``/image_exists``, ``/build``), which a
prebuilt-only server refuses.
"""

import asyncio
import json
import os
import sys
import tempfile
import uuid

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx  # noqa: E402

from openhands.core.config import OpenHandsConfig  # noqa: E402
from openhands.events import EventStream  # noqa: E402
from openhands.events.action import CmdRunAction  # noqa: E402
from openhands.llm.llm_registry import LLMRegistry  # noqa: E402
from openhands.runtime.builder.remote import RemoteRuntimeBuilder  # noqa: E402
from openhands.runtime.impl.remote.remote_runtime import RemoteRuntime  # noqa: E402
from openhands.storage import get_file_store  # noqa: E402


def step(**kw):
    print(json.dumps(kw), flush=True)


def main() -> None:
    url, key, runtime_image, base_image = sys.argv[1:5]
    config = OpenHandsConfig()
    config.sandbox.remote_runtime_api_url = url
    config.sandbox.api_key = key
    config.sandbox.runtime_container_image = runtime_image
    config.sandbox.remote_runtime_init_timeout = 300  # a cold node pulls the image first (~1.5 GB)
    config.sandbox.keep_runtime_alive = False
    config.workspace_mount_path_in_sandbox = "/testbed"  # the server's --working-dir
    sid = f"v0-{uuid.uuid4().hex[:12]}"
    store = get_file_store("local", tempfile.mkdtemp())
    runtime = RemoteRuntime(config, EventStream(sid, store), LLMRegistry(config), sid=sid)
    asyncio.run(runtime.connect())
    step(step="ready", runtime_id=runtime.runtime_id, url=runtime.runtime_url, web_hosts=runtime.web_hosts,
         session_api_key_set=runtime.session_api_key is not None)
    obs = runtime.run_action(CmdRunAction(command="python -c 'import sys; print(sys.prefix)'; pwd"))
    step(step="action", type=type(obs).__name__, exit_code=getattr(obs, "exit_code", None),
         content=obs.content)
    rid = runtime.runtime_id
    runtime.close()
    step(step="closed", runtime_id=rid)

    builder = RemoteRuntimeBuilder(url, key)
    prefix = httpx.get(f"{url}/registry_prefix", headers={"X-API-Key": key}).json()["registry_prefix"]
    step(step="registry_prefix", registry_prefix=prefix)
    step(step="image_exists", base=builder.image_exists(base_image),
         v0_runtime=builder.image_exists(f"{prefix}/runtime:oh_v0.59.0_abc"))
    ctx = tempfile.mkdtemp()
    with open(os.path.join(ctx, "Dockerfile"), "w") as fh:
        fh.write("FROM scratch\n")
    try:
        builder.build(ctx, [f"{prefix}/runtime:oh_v0.59.0_abc"])
        step(step="build", refused=False)
    except Exception as exc:  # noqa: BLE001
        step(step="build", refused=True, error=str(exc)[-600:])


if __name__ == "__main__":
    main()
