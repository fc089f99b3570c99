"""The runtime server (installed as ``imagefarm.runtime``).

It speaks the OpenHands remote runtime API for both clients (the SDK's
``APIRemoteWorkspace`` and V0's ``RemoteRuntime``) and starts prebuilt agent-server
images only, as podman containers on the node it runs on (``runtime_server.sbatch``
puts it on a SLURM CPU node).

* ``app.create_app(settings, backend, resolver, config)`` - the FastAPI app
* ``manager`` - runtimes: start, watch, pause, stop, reap, reconcile after restart
* ``backend.PodmanBackend`` - the podman CLI through asyncio subprocesses
* ``resolver`` - the ``Resolver`` protocol (``imagefarm.serve.lookup.Lookup`` is the one resolver)
* ``state`` - sqlite records under ``state_dir/runtime/``
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def create_app(*args, **kwargs):
    from .app import create_app as _create

    return _create(*args, **kwargs)


def serve(*args, **kwargs):
    from .serve import serve as _serve

    return _serve(*args, **kwargs)
