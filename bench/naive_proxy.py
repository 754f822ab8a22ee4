"""A naive grpc.aio CRI proxy, the "naive-grpcio" reference row of bench/forwarding.py.

    python bench/naive_proxy.py --listen unix:///tmp/dir/naive.sock --runtime-endpoint unix:///tmp/dir/runtime.sock

What anyone would write first: one grpc.aio server with a generic handler that relays every call
as raw bytes on one upstream channel; a unary call is `await upstream.unary_unary(path)(request,
metadata=..., timeout=...)`, a server stream is relayed message by message with `async for`. No
interceptors, no metrics, no decoding, no tuning. It stands for what a grpc.aio proxy costs in
gRPC alone, whatever it does on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# Before grpc is first imported: the same engine choice as the rest of the harness.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import grpc.aio

from criproxy.api.runtime.v1 import api_pb2

MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
#: Metadata gRPC sets itself on the upstream call.
_SKIP_METADATA = ("user-agent", "grpc-")


def streaming_paths() -> frozenset[str]:
    """The server-streaming methods of CRI v1, from the generated descriptors."""
    return frozenset(f"/{service.full_name}/{method.name}"
                     for service in api_pb2.DESCRIPTOR.services_by_name.values()
                     for method in service.methods if method.server_streaming)


def forwarded(context: grpc.aio.ServicerContext[bytes, bytes]) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in context.invocation_metadata() or () if not k.startswith(_SKIP_METADATA))


class Relay(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, upstream: grpc.aio.Channel) -> None:
        self.upstream = upstream
        self.streaming = streaming_paths()

    def unary(self, path: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            try:
                return await self.upstream.unary_unary(path)(  # type: ignore[no-any-return]
                    request, metadata=forwarded(context), timeout=context.time_remaining())
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")  # raises
                raise

        return handle

    def stream(self, path: str) -> Callable[[bytes, Any], AsyncIterator[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
            try:
                async for message in self.upstream.unary_stream(path)(
                        request, metadata=forwarded(context), timeout=context.time_remaining()):
                    yield message
            except grpc.aio.AioRpcError as err:
                await context.abort(err.code(), err.details() or "")

        return handle

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        path = handler_call_details.method
        if path in self.streaming:
            return grpc.unary_stream_rpc_method_handler(self.stream(path))
        return grpc.unary_unary_rpc_method_handler(self.unary(path))


async def serve(listen: str, runtime: str) -> None:
    upstream = grpc.aio.insecure_channel(runtime, options=OPTIONS)
    server = grpc.aio.server(options=[*OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((Relay(upstream),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"naive proxy: cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"naive grpc.aio proxy {listen} -> {runtime} (pid {os.getpid()})", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0)
    await upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="naive grpc.aio raw-bytes CRI proxy (a benchmark reference)")
    parser.add_argument("--listen", required=True, help="unix://PATH to serve")
    parser.add_argument("--runtime-endpoint", required=True, help="unix://PATH of the runtime")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.runtime_endpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
