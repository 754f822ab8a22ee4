"""Typed reading of one mapping from a config file, with errors that name where it came from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from criproxy.errors import ConfigError


class Options:
    """A config section: `where` is how messages name it (e.g. 'config file /etc/x.yaml: seccomp')."""

    def __init__(self, data: Any, where: str, known: Iterable[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.where = where
        self.known = tuple(known)
        unknown = sorted(str(k) for k in data if k not in self.known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(self.known)}")

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: {why}")

    def string(self, key: str, default: str) -> str:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def string_list(self, key: str, default: Iterable[str] = ()) -> list[str]:
        value = self.data.get(key)
        if value is None:
            return list(default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        return list(value)
