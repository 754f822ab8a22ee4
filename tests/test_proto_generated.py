"""The committed criproxy/api modules are what scripts/genproto.py makes from proto/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_committed_modules_are_current(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import genproto
    finally:
        sys.path.pop(0)
    fresh = genproto.generate(tmp_path)
    assert fresh, "genproto wrote nothing"
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / "criproxy" / "api" / rel
        assert committed.exists(), f"criproxy/api/{rel} is not committed; run python scripts/genproto.py"
        assert committed.read_bytes() == path.read_bytes(), (
            f"criproxy/api/{rel} is stale; run python scripts/genproto.py and commit the result"
        )
