#!/usr/bin/env python3
"""Write criproxy/_native.pyi, the typed stub of the native data plane module, from the module.

Usage: python scripts/genstubs.py [--check]

Names, parameters (with their defaults) and docstrings come from the built module itself
(`__text_signature__`, `__doc__`): what PyO3 compiled is what the stub says. Types come from
TYPES below, keyed by 'Class.method.parameter' ('return' for the result); a parameter or
attribute without an entry, or an entry nothing in the module has, is an error, so the stub
cannot drift from the Rust code. tests/test_native_stubs.py runs this with --check.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "criproxy" / "_native.pyi"

Spans = "list[tuple[bytes, bytes, bytes | None, str, int, int, int]]"
TYPES: dict[str, str] = {
    "BUCKETS": "list[float]",
    "CONTROL_TIMEOUT_SECONDS": "float",
    "RECONNECT_MAX_SECONDS": "float",
    "DataPlane.__init__.runtime_endpoint": "str",
    "DataPlane.__init__.image_endpoint": "str",
    "DataPlane.__init__.methods": "list[tuple[str, bool]]",
    "DataPlane.__init__.max_message_bytes": "int",
    "DataPlane.__init__.max_concurrent_calls": "int",
    "DataPlane.__init__.connection_age_seconds": "float",
    "DataPlane.__init__.return": "None",
    "DataPlane.start.listen_path": "str",
    "DataPlane.start.return": "None",
    "DataPlane.set_routes.runtime_apis": "list[str]",
    "DataPlane.set_routes.image_apis": "list[str]",
    "DataPlane.set_routes.intercepted": "list[str]",
    "DataPlane.set_routes.return": "None",
    "DataPlane.set_control.return": "int",
    "DataPlane.take_jobs.return": "list[tuple[int, InterceptedCall, int, bytes | None]]",
    "DataPlane.set_tracing.sampler": "str",
    "DataPlane.set_tracing.ratio": "float",
    "DataPlane.set_tracing.queue": "int",
    "DataPlane.set_tracing.return": "None",
    "DataPlane.take_spans.timeout_seconds": "float",
    "DataPlane.take_spans.return": f"{Spans} | None",
    "DataPlane.spans_dropped.return": "int",
    "DataPlane.is_connected.role": "str",
    "DataPlane.is_connected.return": "bool",
    "DataPlane.in_flight.return": "int",
    "DataPlane.connections.return": "int",
    "DataPlane.stop.grace_seconds": "float",
    "DataPlane.stop.return": "bool",
    "DataPlane.snapshot.return": "dict[str, Any]",
    "InterceptedCall.forward.message": "bytes | None",
    "InterceptedCall.forward.return": "bool",
    "InterceptedCall.fail.code": "int",
    "InterceptedCall.fail.message": "str",
    "InterceptedCall.fail.return": "bool",
    "InterceptedCall.method": "str",
    "InterceptedCall.path": "str",
    "InterceptedCall.metadata": "list[tuple[str, str]]",
    "InterceptedCall.message": "bytes",
    "InterceptedCall.deadline": "float | None",
    "InterceptedCall.span": "tuple[bytes, bytes] | None",
    "InterceptedCall.state": "Any",
}
#: Attributes the Python side may set.
SETTABLE = {"InterceptedCall.state"}


class StubError(Exception):
    pass


def _doc(obj: object, indent: str) -> list[str]:
    doc = inspect.getdoc(obj)
    if not doc:
        return []
    lines = doc.splitlines()
    if len(lines) == 1:
        return [f'{indent}"""{lines[0]}"""']
    return [f'{indent}"""{lines[0]}', *[f"{indent}{line}".rstrip() for line in lines[1:]], f'{indent}"""']


def _signature(qualname: str, text: str, used: set[str]) -> str:
    """'($self, a, b=1)' -> '(self, a: T, b: T = 1) -> R' with TYPES."""
    params = ["self"] if qualname.endswith(".__init__") else []
    for raw in (p.strip() for p in text.strip()[1:-1].split(",")):
        if not raw:
            continue
        if raw in ("$self", "$type"):
            params.append("self")
            continue
        if raw == "*":
            params.append("*")
            continue
        name, _, default = raw.partition("=")
        params.append(f"{name}: {_typed(f'{qualname}.{name}', used)}" + (f" = {default}" if default else ""))
    return f"({', '.join(params)}) -> {_typed(f'{qualname}.return', used)}"


def _typed(key: str, used: set[str]) -> str:
    if key not in TYPES:
        raise StubError(f"no type for {key} in scripts/genstubs.py TYPES")
    used.add(key)
    return TYPES[key]


def _class(name: str, cls: type, used: set[str]) -> list[str]:
    out = ["", f"class {name}:", *_doc(cls, "    ")]
    text = getattr(cls, "__text_signature__", None)
    if text:
        out.append(f"    def __init__{_signature(f'{name}.__init__', text, used)}: ...")
    for attr, value in sorted(vars(cls).items()):  # descriptor order varies from build to build
        if attr.startswith("_"):
            continue
        if inspect.isgetsetdescriptor(value) or inspect.ismemberdescriptor(value):
            key = f"{name}.{attr}"
            kind = _typed(key, used)
            settable = key in SETTABLE
            out += [f"    {attr}: {kind}"] if settable else ["    @property", f"    def {attr}(self) -> {kind}: ..."]
        elif callable(value):
            sig = _signature(f"{name}.{attr}", value.__text_signature__ or "($self)", used)
            doc = _doc(value, "        ")
            out += [f"    def {attr}{sig}:", *doc, "        ..."] if doc else [f"    def {attr}{sig}: ..."]
    return out


def render() -> str:
    import criproxy._native as native

    used: set[str] = set()
    out = ['"""Typed stub of criproxy._native (native/src/lib.rs). Generated by scripts/genstubs.py: do not edit."""',
           "", "from typing import Any", ""]
    names = sorted(n for n in dir(native) if not n.startswith("_"))
    out += [f"{n}: {_typed(n, used)}" for n in names if not inspect.isclass(getattr(native, n))]
    for name in names:
        if inspect.isclass(cls := getattr(native, name)):
            out += _class(name, cls, used)
    stale = sorted(set(TYPES) - used)
    if stale:
        raise StubError(f"scripts/genstubs.py TYPES names what the module does not have: {', '.join(stale)}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stub is not current")
    args = parser.parse_args(argv)
    try:
        text = render()
    except StubError as err:
        print(f"genstubs: {err}", file=sys.stderr)
        return 2
    if args.check:
        current = STUB.read_text() if STUB.exists() else ""
        if current != text:
            print(f"genstubs: {STUB.relative_to(ROOT)} is stale; run python scripts/genstubs.py", file=sys.stderr)
            return 1
        return 0
    STUB.write_text(text)
    print(f"wrote {STUB.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
