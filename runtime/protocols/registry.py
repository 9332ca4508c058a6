"""The protocol registry: what a serving protocol declares, and the two ways it is served
(in-process on grpc.aio, or across processes as serialized bytes for Ray)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import grpc

from runtime.api import ServingError


@dataclass(frozen=True)
class Protocol:
    name: str  # what --protocols calls it
    service: str  # the gRPC service's full name (health, reflection)
    messages: ModuleType  # the generated *_pb2 module
    add_to_server: Callable  # the generated add_<Service>Servicer_to_server
    adapter: Callable  # Core -> the object answering the service's methods

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self._descriptor().methods_by_name)

    def request_type(self, method: str) -> type:
        return getattr(self.messages, self._descriptor().methods_by_name[method].input_type.name)

    def response_type(self, method: str) -> type:
        return getattr(self.messages, self._descriptor().methods_by_name[method].output_type.name)

    def _descriptor(self):
        return self.messages.DESCRIPTOR.services_by_name[self.service.rsplit(".", 1)[1]]


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    PROTOCOLS[protocol.name] = protocol
    return protocol


def select(names: list[str] | tuple[str, ...]) -> list[Protocol]:
    """Protocol names -> the registered protocols; ValueError naming the known ones."""
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(
            f"--protocols: unknown {', '.join(map(repr, unknown))}; known: "
            f"{','.join(PROTOCOLS)} (default: all)"
        )
    if not names:
        raise ValueError(f"--protocols is empty; name at least one of {','.join(PROTOCOLS)}")
    return [PROTOCOLS[n] for n in names]


def aio_servicer(protocol: Protocol, adapter) -> SimpleNamespace:
    """The grpc.aio servicer of an adapter: the call's deadline in, ServingError -> status."""

    def method(fn):
        async def handle(request, context):
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            try:
                return await fn(request, deadline)
            except ServingError as e:
                await context.abort(grpc.StatusCode[e.code], str(e))

        return handle

    return SimpleNamespace(**{m: method(getattr(adapter, m)) for m in protocol.methods})


async def call(protocol: Protocol, adapter, method: str, payload: bytes):
    """A serialized request -> (None, serialized response) or (status name, message): what
    crosses process boundaries (Ray) without pickling protobuf classes."""
    request = protocol.request_type(method).FromString(payload)
    try:
        response = await getattr(adapter, method)(request, None)
    except ServingError as e:
        return e.code, str(e)
    return None, response.SerializeToString()
