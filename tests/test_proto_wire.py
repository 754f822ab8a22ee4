"""The committed CRI protos carry exactly the upstream wire facts (tests/data/runtime.*.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, FileDescriptor

from criproxy.api.runtime.v1 import api_pb2 as v1
from criproxy.api.runtime.v1alpha2 import api_pb2 as v1alpha2

DATA = Path(__file__).parent / "data"

_TYPES = {
    getattr(FieldDescriptor, name): name[len("TYPE_") :].lower()
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def _label(field: FieldDescriptor) -> str:
    return "repeated" if field.is_repeated else "optional"


def _field_facts(field: FieldDescriptor) -> dict[str, Any]:
    facts: dict[str, Any] = {"label": _label(field), "number": field.number, "type": _TYPES[field.type]}
    if field.message_type is not None:
        facts["type_name"] = "." + field.message_type.full_name
    elif field.enum_type is not None:
        facts["type_name"] = "." + field.enum_type.full_name
    return facts


def _walk(messages: dict[str, Any], enums: dict[str, Any], desc: Descriptor) -> None:
    messages["." + desc.full_name] = {f.name: _field_facts(f) for f in desc.fields}
    for nested in desc.nested_types:
        _walk(messages, enums, nested)
    for enum in desc.enum_types:
        _enum(enums, enum)


def _enum(enums: dict[str, Any], enum: EnumDescriptor) -> None:
    enums["." + enum.full_name] = {v.name: v.number for v in enum.values}


def facts_of(fd: FileDescriptor) -> dict[str, Any]:
    """The same shape as the wire-facts JSON, read off a compiled file descriptor."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    for desc in fd.message_types_by_name.values():
        _walk(messages, enums, desc)
    for enum in fd.enum_types_by_name.values():
        _enum(enums, enum)
    services = {
        svc.name: {
            m.name: {
                "client_streaming": m.client_streaming,
                "input": "." + m.input_type.full_name,
                "output": "." + m.output_type.full_name,
                "server_streaming": m.server_streaming,
            }
            for m in svc.methods
        }
        for svc in fd.services_by_name.values()
    }
    return {"enums": enums, "messages": messages, "package": fd.package, "services": services}


@pytest.mark.parametrize(
    ("module", "facts_file"),
    [(v1, "runtime.v1.json"), (v1alpha2, "runtime.v1alpha2.json")],
    ids=["v1", "v1alpha2"],
)
@pytest.mark.parametrize("section", ["package", "services", "messages", "enums"])
def test_descriptor_matches_wire_facts(module: Any, facts_file: str, section: str) -> None:
    expected = json.loads((DATA / facts_file).read_text())
    actual = facts_of(module.DESCRIPTOR)
    if section == "package":
        assert actual["package"] == expected["package"]
        return
    want, got = expected[section], actual[section]
    assert sorted(set(want) - set(got)) == [], f"{section} missing from the proto"
    assert sorted(set(got) - set(want)) == [], f"{section} in the proto but not upstream"
    for name in want:
        assert got[name] == want[name], f"{section} {name} differs"


def test_the_seven_server_streams_are_known() -> None:
    streams = sorted(
        m.name for svc in v1.DESCRIPTOR.services_by_name.values() for m in svc.methods if m.server_streaming
    )
    assert streams == [
        "GetContainerEvents",
        "StreamContainerStats",
        "StreamContainers",
        "StreamImages",
        "StreamPodSandboxMetrics",
        "StreamPodSandboxStats",
        "StreamPodSandboxes",
    ]
