"""A fast fake CRI runtime for the forwarding benchmark: canned, pre-serialized answers over a unix socket.

Run as its own process (bench/forwarding.py starts it):

    python bench/fake_runtime.py --listen /tmp/dir/runtime.sock --containers 1000 --events 20000

Every response is serialized once at start, so a call costs the server little more than gRPC's
own work and the benchmark's "direct" figures measure the transport, not this script:

- RuntimeService/Version answers a fixed VersionResponse (runtime.v1 only; v1alpha2 paths answer
  UNIMPLEMENTED, as a v1-only containerd does, so the proxy settles on v1).
- RuntimeService/ListContainers answers `--containers` realistic Container messages (64-hex ids,
  kubelet labels and annotations, image references by digest).
- RuntimeService/GetContainerEvents streams small ContainerEventResponse messages; how many is
  the request's `x-bench-messages` metadata, or `--events`, paced by `x-bench-interval` seconds.
- Every other runtime.v1 method answers one empty message (a valid value of every CRI response).
- Requests are never parsed.

The unary and streaming handlers are plain coroutines on one grpc.aio server, as a Go runtime's
handlers would be plain functions: no journal, no locks, no per-call allocation beyond gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# Before grpc is first imported. The harness's engine choice comes from bench/forwarding.py,
# which starts this process with GRPC_EXPERIMENTS set; run alone, it uses criproxy's default.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")
# The repository's criproxy package, whether or not it is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc
import grpc.aio

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.methods import METHODS

MESSAGES_METADATA = "x-bench-messages"
#: Seconds between stream messages (bench/soak.py keeps long-lived, mostly idle event streams open).
INTERVAL_METADATA = "x-bench-interval"
MAX_MESSAGE_BYTES = 64 << 20
MAX_STREAM_MESSAGES = 10_000_000
_EVENT_VARIETY = 256


def hex64(*parts: object) -> str:
    """A deterministic 64-hex id, as containerd's container and sandbox ids are."""
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()


def make_container(index: int) -> api_pb2.Container:
    """One Container as containerd reports a kubelet-made container."""
    pod = index // 3
    namespace = f"team-{pod % 17}"
    pod_name = f"web-{hex64('pod', pod)[:10]}-{hex64('rs', pod)[:5]}"
    name = ("app", "sidecar", "istio-proxy")[index % 3]
    image_digest = hex64("image", index % 40)
    repo = ("registry.k8s.io/pause", "docker.io/library/nginx", "quay.io/prometheus/node-exporter",
            "ghcr.io/example/payments-api")[index % 4]
    pod_uid = hex64("uid", pod)
    uid = f"{pod_uid[:8]}-{pod_uid[8:12]}-{pod_uid[12:16]}-{pod_uid[16:20]}-{pod_uid[20:32]}"
    return api_pb2.Container(
        id=hex64("container", index),
        pod_sandbox_id=hex64("sandbox", pod),
        metadata=api_pb2.ContainerMetadata(name=name, attempt=index % 3),
        image=api_pb2.ImageSpec(image=f"sha256:{image_digest}", user_specified_image=f"{repo}:v1.{index % 9}.0"),
        image_ref=f"{repo}@sha256:{image_digest}",
        image_id=f"sha256:{image_digest}",
        state=api_pb2.CONTAINER_RUNNING,
        created_at=1_760_000_000_000_000_000 + index * 1_000_003,
        labels={
            "io.kubernetes.container.name": name,
            "io.kubernetes.pod.name": pod_name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
        },
        annotations={
            "io.kubernetes.container.hash": f"{int(hex64('hash', index)[:8], 16):x}",
            "io.kubernetes.container.restartCount": str(index % 3),
            "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
            "io.kubernetes.container.terminationMessagePolicy": "File",
            "io.kubernetes.pod.terminationGracePeriod": "30",
            "io.kubernetes.container.ports": '[{"name":"http","containerPort":8080,"protocol":"TCP"}]',
        },
    )


def list_containers_response(count: int) -> bytes:
    return api_pb2.ListContainersResponse(containers=[make_container(i) for i in range(count)]).SerializeToString()


def container_events(variety: int = _EVENT_VARIETY) -> list[bytes]:
    """Small ContainerEventResponse messages (id, type, time), a few distinct ones to cycle through."""
    return [
        api_pb2.ContainerEventResponse(
            container_id=hex64("container", i),
            container_event_type=(api_pb2.CONTAINER_STARTED_EVENT, api_pb2.CONTAINER_STOPPED_EVENT)[i % 2],
            created_at=1_760_000_000_000_000_000 + i,
        ).SerializeToString()
        for i in range(variety)
    ]


VERSION_RESPONSE = api_pb2.VersionResponse(
    version="0.1.0", runtime_name="bench-fake-runtime", runtime_version="1.7.99", runtime_api_version="v1"
).SerializeToString()

UnaryHandler = Callable[[bytes, Any], Awaitable[bytes]]
StreamHandler = Callable[[bytes, Any], AsyncIterator[bytes]]


def canned_unary(response: bytes) -> UnaryHandler:
    async def handle(request: bytes, context: Any) -> bytes:
        return response

    return handle


def canned_stream(messages: list[bytes], default_count: int) -> StreamHandler:
    async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
        count, interval = default_count, 0.0
        for key, value in context.invocation_metadata() or ():
            if key == MESSAGES_METADATA:
                count = min(int(value), MAX_STREAM_MESSAGES)
            elif key == INTERVAL_METADATA:
                interval = float(value)
        variety = len(messages)
        for i in range(count):
            yield messages[i % variety]
            if interval:
                await asyncio.sleep(interval)

    return handle


class CannedRuntime(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Answers every runtime.v1 path from a table of handlers built once."""

    def __init__(self, containers: int, events: int) -> None:
        unary: dict[str, bytes] = {
            "RuntimeService/Version": VERSION_RESPONSE,
            "RuntimeService/ListContainers": list_containers_response(containers),
        }
        streams: dict[str, StreamHandler] = {
            "RuntimeService/GetContainerEvents": canned_stream(container_events(), events),
        }
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        for key, method in METHODS.items():
            path = method.path("v1")
            if method.server_streaming:
                stream = streams.get(key) or canned_stream([b""], 1)
                self._handlers[path] = grpc.unary_stream_rpc_method_handler(stream)
            else:
                self._handlers[path] = grpc.unary_unary_rpc_method_handler(canned_unary(unary.get(key, b"")))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        return self._handlers.get(handler_call_details.method)


async def serve(listen: str, containers: int, events: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((CannedRuntime(containers, events),))
    if server.add_insecure_port("unix://" + listen) == 0:
        raise SystemExit(f"fake runtime: cannot bind {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake runtime serving {listen} (pid {os.getpid()})", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fast fake CRI runtime for bench/forwarding.py")
    parser.add_argument("--listen", required=True, help="unix socket path to serve")
    parser.add_argument("--containers", type=int, default=1000, help="containers in the ListContainers answer")
    parser.add_argument("--events", type=int, default=20_000,
                        help=f"GetContainerEvents messages per call unless the call's {MESSAGES_METADATA} says")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.containers, args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
