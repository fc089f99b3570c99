"""imagefarm benchmarks: ``python -m bench`` (or ``make bench``).

Every figure in ``docs/BENCHMARKS.md`` is measured here, against real services started
for the run (docker-registry, redis-server, Celery workers, the runtime server, the
lookup API) on free loopback ports, and everything started is stopped again, also on
Ctrl-C. Nothing here asserts a timing: figures are reported, never checked.

Sections (``--only``): ``derive`` (fast path vs naive buildah, same bases, same
registry), ``scale`` (fast path on many small bases, 1/4/8 threads), ``farm`` (Celery
with 1/2/4 worker processes, plus the embedded local pool), ``copy`` (cross-registry
derive: bytes moved vs unique bytes), ``runtime`` (``/start`` to ready), ``lookup``
(in-process and HTTP, warm and cold), ``ratelimit`` (a batch from a rate-limited
registry: ``--plan`` vs what the run moves, and the run's pauses), ``fleet`` (placement
at 512 concurrent sandboxes, image-aware vs random: a model fed with the runtime
section's measured costs), ``relayer`` (one repository's bases re-layered vs plain:
bytes a node pulls, stored, unique per image, time to re-layer), ``v0`` (``/start`` to ready of the V0 action execution
server's image beside the agent server's, same base, interleaved), ``relayer-real`` (#27:
16 buildah-made images of a real PyPI project, plain vs re-layered, each in its own
process: stored and own bytes, sibling pulls, peak RSS, seconds per image), ``starts``
(``/start`` to ready by what the node holds: warm hit, image, base + payload, payload
only; default and V0), ``coldpull`` (cold ``podman pull`` of each recipe's payload, old
tree layout beside the zip layout, with download/decompress/unpack apart).
"""

SECTIONS = ("derive", "scale", "farm", "copy", "runtime", "lookup", "ratelimit", "fleet", "relayer", "v0",
            "relayer-real", "starts", "coldpull")
