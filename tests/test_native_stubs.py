"""The native module's committed stub is what scripts/genstubs.py makes from the built module,
and the package's version is the crate's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import criproxy

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_stub_is_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "genstubs.py"), "--check"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_package_version_is_the_crates() -> None:
    cargo = (ROOT / "native" / "Cargo.toml").read_text()
    match = re.search(r'^version = "([^"]+)"', cargo, re.M)
    assert match is not None
    assert criproxy.__version__ == match.group(1)
