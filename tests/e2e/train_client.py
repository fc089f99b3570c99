"""The rollout side of the SLURM end-to-end test, run under the SDK's Python:
start one runtime with the real APIRemoteWorkspace, run the r2e tests in /testbed,
stop it. ``python train_client.py URL KEY IMAGE`` prints one JSON line per step."""

import json
import os
import sys

os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from openhands.workspace import APIRemoteWorkspace  # noqa: E402


def main() -> None:
    url, key, image = sys.argv[1:4]
    ws = APIRemoteWorkspace(runtime_api_url=url, runtime_api_key=key, server_image=image,
                            working_dir="/testbed", startup_wait_timeout=300, init_timeout=120)
    try:
        print(json.dumps({"step": "ready", "runtime_id": ws._runtime_id}), flush=True)
        r = ws.execute_command("/testbed/run_tests.sh", cwd="/testbed", timeout=120)
        print(json.dumps({"step": "tests", "exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}),
              flush=True)
    finally:
        ws.cleanup()
        print(json.dumps({"step": "stopped"}), flush=True)


if __name__ == "__main__":
    main()
