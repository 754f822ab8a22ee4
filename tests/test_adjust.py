"""Field paths on real CRI messages: reading, applying, and the provenance stamp."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf.json_format import ParseError
from google.protobuf.message import Message

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.adjust import NOTHING, Adjustment, Change, Denial, apply_change, provenance, read_field

SECCOMP = "config.linux.security_context.seccomp"
RES = "config.linux.resources."


def create_request() -> api_pb2.CreateContainerRequest:
    """A CreateContainer request with the resources a kubelet would send for a 1 CPU / 1Gi container."""
    request = api_pb2.CreateContainerRequest(pod_sandbox_id="sb1")
    request.config.metadata.name = "app"
    res = request.config.linux.resources
    res.cpu_period, res.cpu_quota, res.cpu_shares = 100_000, 100_000, 1024
    res.memory_limit_in_bytes = res.memory_swap_limit_in_bytes = 1 << 30
    res.oom_score_adj = 500
    res.cpuset_cpus = "0-3"
    res.hugepage_limits.add(page_size="2MB", limit=0)
    res.hugepage_limits.add(page_size="1GB", limit=0)
    res.unified["memory.oom.group"] = "1"
    return request


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (RES + "cpu_quota", 100_000),
        (RES + "cpu_shares", 1024),
        (RES + "memory_limit_in_bytes", 1 << 30),
        (RES + "cpuset_cpus", "0-3"),
        (RES + "cpuset_mems", ""),
        (RES + "oom_score_adj", 500),
        (RES + "unified[memory.oom.group]", "1"),
        (RES + "unified[memory.high]", None),
        (RES + "hugepage_limits[2MB]", 0),
        (RES + "hugepage_limits[1GB]", 0),
        (RES + "hugepage_limits[64KB]", None),
        ("pod_sandbox_id", "sb1"),
        ("config.metadata.name", "app"),
        (SECCOMP, None),
        ("sandbox_config.linux", None),
        ("config.linux.resources.unified", {"memory.oom.group": "1"}),
    ],
    ids=["cpu-quota", "cpu-shares", "memory", "cpuset", "unset-string", "oom", "unified-set", "unified-absent",
         "hugepage-2MB", "hugepage-1GB", "hugepage-absent", "top-level", "nested-string", "unset-message",
         "unset-message-2", "whole-map"],
)
def test_read_field(path: str, value: Any) -> None:
    assert read_field(create_request(), path) == value


def test_read_field_of_unset_message_does_not_set_it() -> None:
    request = api_pb2.RunPodSandboxRequest()
    assert read_field(request, SECCOMP) is None
    assert not request.HasField("config")
    assert request.ByteSize() == 0


@pytest.mark.parametrize(
    ("message", "path", "value"),
    [
        (api_pb2.RunPodSandboxRequest(), "runtime_handler", "kata"),
        (api_pb2.CreateContainerRequest(), RES + "cpu_quota", 50_000),
        (api_pb2.CreateContainerRequest(), RES + "cpu_quota", -1),
        (api_pb2.CreateContainerRequest(), RES + "cpuset_mems", "0"),
        (api_pb2.UpdateContainerResourcesRequest(), "linux.memory_limit_in_bytes", 512 << 20),
        (api_pb2.UpdateContainerResourcesRequest(), "linux.unified[memory.high]", "1000000"),
        (api_pb2.UpdateContainerResourcesRequest(), "linux.hugepage_limits[2MB]", 4 << 20),
    ],
    ids=["handler", "quota", "quota-disable", "cpuset-mems", "update-memory", "update-unified", "update-hugepage"],
)
def test_apply_then_read_on_empty_messages(message: Message, path: str, value: Any) -> None:
    apply_change(message, Change(path, value, "s"))
    assert read_field(message, path) == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"profile_type": "RuntimeDefault"}, {"profile_type": "RuntimeDefault", "localhost_ref": ""}),
        ({"profile_type": "Unconfined"}, {"profile_type": "Unconfined", "localhost_ref": ""}),
        ({"profile_type": "Localhost", "localhost_ref": "/var/lib/kubelet/seccomp/a.json"},
         {"profile_type": "Localhost", "localhost_ref": "/var/lib/kubelet/seccomp/a.json"}),
    ],
    ids=["runtime-default", "unconfined", "localhost"],
)
def test_apply_message_field_from_dict(value: dict[str, str], expected: dict[str, str]) -> None:
    request = api_pb2.RunPodSandboxRequest()
    apply_change(request, Change(SECCOMP, value, "seccomp-profile"))
    seccomp = request.config.linux.security_context.seccomp
    assert request.config.linux.security_context.HasField("seccomp")  # even when every field is its default
    assert read_field(request, SECCOMP) == expected
    assert api_pb2.SecurityProfile.ProfileType.Name(seccomp.profile_type) == expected["profile_type"]
    assert seccomp.localhost_ref == expected["localhost_ref"]


def test_apply_message_field_from_what_only_parsedict_reads() -> None:
    # protobuf's constructor is the fast path; JSON field names still work, through ParseDict.
    request = api_pb2.CreateContainerRequest()
    apply_change(request, Change(SECCOMP, {"profileType": "Localhost", "localhostRef": "/a.json"}, "seccomp-profile"))
    seccomp = request.config.linux.security_context.seccomp
    assert (seccomp.profile_type, seccomp.localhost_ref) == (api_pb2.SecurityProfile.Localhost, "/a.json")
    with pytest.raises(ParseError, match="Nonexistent"):
        apply_change(request, Change(SECCOMP, {"profile_type": "Nonexistent"}, "seccomp-profile"))


def test_apply_message_field_replaces_the_whole_message() -> None:
    request = api_pb2.CreateContainerRequest()
    seccomp = request.config.linux.security_context.seccomp
    seccomp.profile_type, seccomp.localhost_ref = api_pb2.SecurityProfile.Localhost, "/old.json"
    apply_change(request, Change(SECCOMP, {"profile_type": "RuntimeDefault"}, "seccomp-profile"))
    assert seccomp.profile_type == api_pb2.SecurityProfile.RuntimeDefault
    assert seccomp.localhost_ref == ""  # cleared, not left behind


def test_apply_scalar_keeps_siblings() -> None:
    request = create_request()
    apply_change(request, Change(RES + "memory_limit_in_bytes", 256 << 20, "memory-limit"))
    res = request.config.linux.resources
    assert res.memory_limit_in_bytes == 256 << 20
    assert (res.memory_swap_limit_in_bytes, res.cpu_quota, res.cpuset_cpus) == (1 << 30, 100_000, "0-3")


def test_apply_map_entry_adds_and_replaces() -> None:
    request = create_request()
    apply_change(request, Change(RES + "unified[memory.high]", "500000000", "unified.memory.high"))
    apply_change(request, Change(RES + "unified[memory.oom.group]", "0", "unified.memory.oom.group"))
    assert dict(request.config.linux.resources.unified) == {"memory.high": "500000000", "memory.oom.group": "0"}


def test_apply_hugepage_updates_the_existing_entry_in_place() -> None:
    request = create_request()
    apply_change(request, Change(RES + "hugepage_limits[2MB]", 8 << 20, "hugepages-2mi"))
    assert [(h.page_size, h.limit) for h in request.config.linux.resources.hugepage_limits] == [
        ("2MB", 8 << 20), ("1GB", 0)]


def test_apply_hugepage_appends_an_absent_size() -> None:
    request = create_request()
    apply_change(request, Change(RES + "hugepage_limits[64KB]", 128 << 10, "hugepages-64ki"))
    assert [(h.page_size, h.limit) for h in request.config.linux.resources.hugepage_limits] == [
        ("2MB", 0), ("1GB", 0), ("64KB", 128 << 10)]
    assert read_field(request, RES + "hugepage_limits[64KB]") == 128 << 10


def test_applied_request_survives_the_wire() -> None:
    request = create_request()
    apply_change(request, Change(RES + "cpu_quota", 50_000, "cpu-quota"))
    apply_change(request, Change(SECCOMP, {"profile_type": "Unconfined"}, "seccomp-profile"))
    again = api_pb2.CreateContainerRequest.FromString(request.SerializeToString())
    assert again.config.linux.resources.cpu_quota == 50_000
    assert again.config.linux.security_context.seccomp.profile_type == api_pb2.SecurityProfile.Unconfined


def test_provenance_exact_json() -> None:
    changes = [
        Change(RES + "cpu_quota", 50_000, "cpu-quota", "cpu-quota.criproxy.io/pod", "500m", "resources"),
        Change("runtime_handler", "kata", "runtime-handler", by="runtime-handler"),
        Change(SECCOMP, {"profile_type": "Unconfined"}, "seccomp-profile", "seccomp-profile.criproxy.io", "unconfined",
               "seccomp"),
    ]
    before = {RES + "cpu_quota": 100_000, "runtime_handler": "", SECCOMP: None}
    stamp = provenance(changes, before)
    assert stamp == (
        '[{"by":"resources","field":"config.linux.resources.cpu_quota","key":"cpu-quota.criproxy.io/pod",'
        '"setting":"cpu-quota","value":50000,"was":100000},'
        '{"by":"runtime-handler","field":"runtime_handler","setting":"runtime-handler","source":"config",'
        '"value":"kata","was":""},'
        '{"by":"seccomp","field":"config.linux.security_context.seccomp","key":"seccomp-profile.criproxy.io",'
        '"setting":"seccomp-profile","value":{"profile_type":"Unconfined"},"was":null}]')
    assert json.loads(stamp)[1] == {"by": "runtime-handler", "field": "runtime_handler", "setting": "runtime-handler",
                                    "source": "config", "value": "kata", "was": ""}


@pytest.mark.parametrize(
    ("changes", "before", "expected"),
    [
        ([], {}, "[]"),
        ([Change("x", 1, "s", "k")], {}, '[{"by":"","field":"x","key":"k","setting":"s","value":1,"was":null}]'),
        ([Change("x", "é", "s", "k")], {"x": "a"},
         '[{"by":"","field":"x","key":"k","setting":"s","value":"\\u00e9","was":"a"}]'),
    ],
    ids=["empty", "was-missing-is-null", "non-ascii-escaped"],
)
def test_provenance_edges(changes: list[Change], before: dict[str, Any], expected: str) -> None:
    assert provenance(changes, before) == expected


def test_adjustment_shapes() -> None:
    assert Adjustment() == NOTHING
    assert NOTHING.changes == () and NOTHING.denial is None and NOTHING.warnings == ()
    denial = Denial("no")
    assert denial.as_adjustment() == Adjustment(denial=denial)
    assert denial.code.name == "PERMISSION_DENIED"
