"""Drive the real SDK client (openhands-workspace's APIRemoteWorkspace) against a runtime server.

Runs under a Python >= 3.12 that has ``openhands-workspace`` installed (not the
project's venv): ``python sdk_client.py URL KEY IMAGE [--exec]`` prints one JSON line
per step (``--wait S``: seconds to wait for ready, default 120). With ``--exec`` (a real agent-server image) it also runs a command in
/testbed through the agent server; the stand-in image only answers /alive and /health.
"""

import json
import os
import sys
import time

os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from openhands.workspace import APIRemoteWorkspace  # noqa: E402


def step(**kw):
    print(json.dumps(kw), flush=True)


def main() -> None:
    url, key, image = sys.argv[1:4]
    wait = int(sys.argv[sys.argv.index("--wait") + 1]) if "--wait" in sys.argv else 120
    t0 = time.monotonic()
    ws = APIRemoteWorkspace(runtime_api_url=url, runtime_api_key=key, server_image=image,
                            working_dir="/testbed", startup_wait_timeout=wait, init_timeout=60)
    step(step="ready", seconds=round(time.monotonic() - t0, 2), runtime_id=ws._runtime_id, host=ws.host,
         alive=ws.alive)
    if "--exec" in sys.argv:
        r = ws.execute_command("echo from-sdk > /testbed/sdk_wrote.txt && cat /testbed/sdk_wrote.txt && id -u && "
                               "python -c 'import sys; print(sys.prefix)' && echo PATH=$PATH",
                               cwd="/testbed", timeout=60)
        step(step="exec", exit_code=r.exit_code, stdout=r.stdout)
    ws.pause()
    step(step="paused")
    ws.resume()
    step(step="resumed", alive=ws.alive)
    rid = ws._runtime_id
    ws.cleanup()
    step(step="stopped", runtime_id=rid)


if __name__ == "__main__":
    main()
