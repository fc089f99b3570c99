"""The training loop's ``StepPrefetch`` against the real runtime server: the next step's
instances (an instance id of the lockfile, its base image) arrive as one ``POST /prefetch``
of one image, and the prebuilt image lands in the node's podman storage (read from
podman's own list) before any ``/start``."""

from __future__ import annotations

import time

from imagefarm.farm.lockfile import Entry, Lockfile
from imagefarm.host.containers import run
from imagefarm.names.reference import parse
from imagefarm.serve.launch import StepPrefetch

from rtkit import API_KEY


def _images(settings) -> set[str]:
    out = run(settings, ["podman", "images", "--digests", "--format", "{{.Repository}}@{{.Digest}}"],
              timeout=120).stdout
    return set(out.split())


def test_next_step_pulls_the_pinned_images_before_any_start(server_factory, prebuilt, rt_settings, rt_to):
    image = prebuilt["r2e"]
    pinned = f"{parse(image.image).name}@{image.digest}"
    base = str(prebuilt["r2e_base"])
    lock = Lockfile((Entry("r2e__inst-1", "train", base, "sha256:" + "0" * 64, image.image, image.digest,
                           "default", "sha256:" + "1" * 64, "1.58.2", True),))
    run(rt_settings, ["podman", "rmi", "--force", pinned], check=False, timeout=120)
    assert pinned not in _images(rt_settings)
    with server_factory() as srv, StepPrefetch(srv.url, API_KEY, lockfile=lock, warm=2) as step:
        prompt = {"prompt": [], "env_class": "r2e", "uid": "u1",
                  "env_extras": {"instance": {"instance_id": "r2e__inst-1"}}}
        rows = step.next_step([prompt, prompt, base]).result(timeout=120)
        # the id (through the lockfile) and the base (through the server's lookup) are one image
        assert len(rows) == 1 and rows[0]["image"] == base and rows[0]["prebuilt_image"] == pinned
        assert rows[0]["warm"] == 2  # the server took the warm field: 2 sandboxes booting for it
        deadline = time.monotonic() + 300
        while pinned not in _images(rt_settings) and time.monotonic() < deadline:
            time.sleep(1)
        assert pinned in _images(rt_settings)
