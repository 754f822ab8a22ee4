"""The container index: bounded, least recently used out, evictions counted and logged, misses looked up."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.context import PodInfo
from criproxy.pipeline.index import ContainerIndex, ContainerInfo


def pod(name: str) -> PodInfo:
    return PodInfo("ns", name, f"uid-{name}")


def test_sandbox_lookups_refresh_so_the_least_recently_used_goes() -> None:
    index = ContainerIndex(max_entries=2)
    index.add_sandbox("a", pod("a"))
    index.add_sandbox("b", pod("b"))
    assert index.sandbox("a") == pod("a")  # used: b is now the least recently used
    index.add_sandbox("c", pod("c"))
    assert (index.sandbox("a"), index.sandbox("b"), index.sandbox("c")) == (pod("a"), None, pod("c"))


def test_container_lookups_refresh_so_the_least_recently_used_goes() -> None:
    index = ContainerIndex(max_entries=2)
    for cid in ("x", "y"):
        index.add_container(cid, ContainerInfo("a", cid, pod("a")))
    assert index.container("x") is not None and index.container("x").name == "x"  # type: ignore[union-attr]
    index.add_container("z", ContainerInfo("a", "z", pod("a")))
    assert [index.container(cid) is None for cid in ("x", "y", "z")] == [False, True, False]


def test_evictions_are_counted_by_table_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="criproxy.pipeline.index")
    evicted: list[tuple[str, str]] = []
    index = ContainerIndex(max_entries=1, on_evict=lambda kind, key: evicted.append((kind, key)))
    index.add_sandbox("a", pod("a"))
    index.add_sandbox("b", pod("b"))
    index.add_container("x", ContainerInfo("b", "x", pod("b")))
    index.add_container("y", ContainerInfo("b", "y", pod("b")))
    index.add_sandbox("b", pod("b"))  # replacing an entry evicts nothing
    assert evicted == [("sandbox", "a"), ("container", "x")]
    assert index.evictions == {"sandbox": 1, "container": 1}
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("evicted sandbox a" in m for m in debug) and any("evicted container x" in m for m in debug), debug


def test_a_full_index_warns_rarely(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="criproxy.pipeline.index")
    index = ContainerIndex(max_entries=1)
    for i in range(1200):
        index.add_sandbox(f"s{i}", pod(f"s{i}"))
    assert index.evictions["sandbox"] == 1199
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # the first, the 1000th


def test_an_evicted_sandbox_is_looked_up_in_the_runtime() -> None:
    asked: list[str] = []

    async def runtime(key: str, request: Message) -> Any:
        asked.append(key)
        assert isinstance(request, api_pb2.PodSandboxStatusRequest)
        if request.pod_sandbox_id != "a":
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "no such sandbox")
        return api_pb2.PodSandboxStatusResponse(status=api_pb2.PodSandboxStatus(
            id="a", metadata=api_pb2.PodSandboxMetadata(name="a", namespace="ns", uid="uid-a"),
            annotations={"criproxy.io/pinned": "{}"}))

    index = ContainerIndex(max_entries=1)
    index.add_sandbox("a", pod("a"))
    index.add_sandbox("b", pod("b"))
    found = asyncio.run(index.resolve_sandbox("a", runtime))
    assert found == PodInfo("ns", "a", "uid-a", {}, {"criproxy.io/pinned": "{}"})
    assert asked == ["RuntimeService/PodSandboxStatus"]
    assert index.sandbox("a") == found  # indexed again
    assert asyncio.run(index.resolve_sandbox("a", runtime)) == found and len(asked) == 1
    assert asyncio.run(index.resolve_sandbox("gone", runtime)) is None
