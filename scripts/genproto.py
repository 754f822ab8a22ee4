#!/usr/bin/env python3
"""Regenerate criproxy/api/ from proto/ (the committed *_pb2.py modules and their .pyi stubs).

Usage: python scripts/genproto.py [--out DIR]

Run it after every change under proto/. tests/test_proto_generated.py runs it into a
temporary directory and fails when the committed modules differ from a fresh run, so a
stale module cannot land. Needs grpcio-tools and mypy-protobuf (the `dev` extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ("runtime/v1/api.proto", "runtime/v1alpha2/api.proto")


def generate(out: Path) -> list[Path]:
    """Compile every file of PROTOS into out/, mirroring proto/'s layout; return what was written."""
    from grpc_tools import protoc  # the dev extra; imported here so --help works without it

    plugin = shutil.which("protoc-gen-mypy")
    if plugin is None:
        raise SystemExit("genproto: protoc-gen-mypy not found on PATH; pip install mypy-protobuf")
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--plugin=protoc-gen-mypy={plugin}",
            f"--mypy_out={out}",
            proto,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"genproto: protoc failed on proto/{proto}")
    return sorted(p for p in out.rglob("*_pb2.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "criproxy" / "api",
                        help="output root (default: criproxy/api)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
