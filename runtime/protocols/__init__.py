"""The serving protocols: each one file that converts its messages to the core's plain types.

A protocol is a gRPC service whose adapter turns requests into `runtime.api.Request`s for
`runtime.core.Core.infer` and predictions back into its responses; every adapter method is
`async def Method(request, deadline) -> response`, raising a `runtime.api.ServingError` that the
transport turns into a status. Each protocol module registers itself here (`register`), as a
merge method does; runtime.server serves every registered protocol on one port through
`aio_servicer`, and runtime.serve_ray forwards each RPC to a replica that answers it with
`call`. Adding a protocol is one file in this folder; every module in it is imported here.
"""

import importlib
import pkgutil

from runtime.protocols.registry import (
    PROTOCOLS,
    Protocol,
    aio_servicer,
    call,
    register,
    select,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PROTOCOLS", "Protocol", "aio_servicer", "call", "register", "select"]
