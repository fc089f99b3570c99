"""Drive the real SDK client (openhands-workspace's APIRemoteWorkspace) against a runtime server.

Runs under a Python >= 3.12 that has ``openhands-workspace`` installed (not the
project's venv): ``python sdk_client.py URL KEY IMAGE [--exec]`` prints one JSON line
per step (``--startup-timeout=S``: how long to wait for the runtime, default 120 s).
With ``--exec`` (a real agent-server image) it also runs a command in
/testbed through the agent server and reports the server's ``/server_info`` version;
the stand-in image only answers /alive and /health; ``--also=CMD`` (repeatable) runs
CMD in /testbed after it. ``--ask-own-version``: ask the
runtime server for images of this client's own openhands-sdk version, the way a
trainer does (``IMAGEFARM_AGENT_SERVER_VERSION`` in ``forward_env``: the /start
environment).
"""

import json
import os
import sys
import time
from importlib.metadata import version

os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from openhands.workspace import APIRemoteWorkspace  # noqa: E402


def step(**kw):
    print(json.dumps(kw), flush=True)


def main() -> None:
    url, key, image = sys.argv[1:4]
    # --startup-timeout=S: a node that still has to pull the image (fresh per-job storage)
    startup = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--startup-timeout=")), 120)
    extra = {}
    if "--ask-own-version" in sys.argv:
        os.environ["IMAGEFARM_AGENT_SERVER_VERSION"] = version("openhands-sdk")
        extra["forward_env"] = ["IMAGEFARM_AGENT_SERVER_VERSION"]
    t0 = time.monotonic()
    ws = APIRemoteWorkspace(runtime_api_url=url, runtime_api_key=key, server_image=image,
                            working_dir="/testbed", startup_wait_timeout=startup, init_timeout=60, **extra)
    step(step="ready", seconds=round(time.monotonic() - t0, 2), runtime_id=ws._runtime_id, host=ws.host,
         alive=ws.alive)
    if "--exec" in sys.argv:
        r = ws.execute_command("echo from-sdk > /testbed/sdk_wrote.txt && cat /testbed/sdk_wrote.txt && id -u && "
                               "python -c 'import sys; print(sys.prefix)' && echo PATH=$PATH",
                               cwd="/testbed", timeout=60)
        step(step="exec", exit_code=r.exit_code, stdout=r.stdout)
        for cmd in [a.split("=", 1)[1] for a in sys.argv if a.startswith("--also=")]:
            r = ws.execute_command(cmd, cwd="/testbed", timeout=60)
            step(step="also", command=cmd, exit_code=r.exit_code, stdout=r.stdout)
        step(step="server_info", version=ws.get_server_info().get("version"), sdk=version("openhands-sdk"))
    ws.pause()
    step(step="paused")
    ws.resume()
    step(step="resumed", alive=ws.alive)
    rid = ws._runtime_id
    ws.cleanup()
    step(step="stopped", runtime_id=rid)


if __name__ == "__main__":
    main()
