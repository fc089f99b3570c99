"""A CPU stand-in for the training job: what SkyRL would do with the prepared run.

Reads the pinned dataset and the environment the training job script exported,
then starts one runtime for the first instance with the real OpenHands client
(``IMAGEFARM_SDK_ARGV``: the command prefix of the SDK's Python) and runs its tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

url = os.environ["SANDBOX_REMOTE_RUNTIME_API_URL"]
key = os.environ["ALLHANDS_API_KEY"]
rows = pq.read_table(Path(os.environ["IMAGEFARM_DATASET"]) / "train.parquet").to_pylist()
image = rows[0]["instance"]["instance_id"]
print(json.dumps({"step": "dataset", "rows": len(rows), "image": image, "url": url}), flush=True)
assert "@sha256:" in image, image
proc = subprocess.run([*json.loads(os.environ["IMAGEFARM_SDK_ARGV"]), url, key, image],
                      capture_output=True, text=True, timeout=900)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr[-5000:])
sys.exit(proc.returncode)
