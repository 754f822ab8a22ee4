"""Settings for `criproxy serve`: one table drives the command-line flags and the YAML config file.

Every setting is a flag (--runtime-endpoint) and a top-level key of the config file
(runtime-endpoint:). A flag given on the command line wins over the file, the file over the
default. Unknown keys, wrong types and impossible values stop the start with a message that
names the file, the key and the value.
"""

from __future__ import annotations

import grp
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from criproxy.cri.annotations import DEFAULT_DOMAIN, annotation_key_problem
from criproxy.errors import ConfigError
from criproxy.interceptors import BUILTIN, InterceptorSpec, read_interceptors
from criproxy.pipeline.index import DEFAULT_MAX_ENTRIES
from criproxy.transport.endpoints import Endpoint, parse_endpoint
from criproxy.transport.sockets import TEMPORARY_SUFFIX_BYTES

MiB = 1024 * 1024
#: The kubelet's own message limit; the proxy must carry at least what the kubelet accepts.
DEFAULT_MAX_MESSAGE_BYTES = 16 * MiB
DEFAULT_LISTEN = "unix:///run/criproxy/criproxy.sock"
DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT = "127.0.0.1", 9808
STDERR = Path("-")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """What `criproxy serve` runs with; built once at start, never changed while serving."""

    #: Where the kubelet connects (its --container-runtime-endpoint points here).
    listen: Endpoint
    #: The real runtime; None means: the first well-known socket that answers.
    runtime_endpoint: Endpoint | None = None
    #: ImageService calls go here; None means: the runtime endpoint.
    image_endpoint: Endpoint | None = None
    #: Largest message accepted or sent, on both sides of the proxy.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Permission bits of the listening socket: who besides root may drive the runtime through it.
    socket_mode: int = 0o660
    #: Group owning the socket (name or number); None keeps the proxy's own group.
    socket_group: int | None = None
    #: How long SIGTERM waits for in-flight calls before closing them.
    shutdown_grace_seconds: float = 10.0
    #: Python logging level name.
    log_level: str = "INFO"
    #: The domain of criproxy's annotation keys (`<setting>.<domain>/pod`).
    annotation_domain: str = DEFAULT_DOMAIN
    #: The interceptors that run, in order, each with its checked settings (the config file's `interceptors:`
    #: list and sections); plain data: criproxy.interceptors.build makes the objects where they run.
    interceptors: tuple[InterceptorSpec, ...] = ()
    #: How many containers the container index remembers before it evicts the least recently used.
    container_cache_size: int = DEFAULT_MAX_ENTRIES
    #: The policies file; None: every enabled interceptor's changes stand (no policy).
    policies: Path | None = None
    #: Where /metrics, /healthz and /readyz are served; None: nowhere.
    metrics_address: tuple[str, int] | None = None
    #: The decision log: a file, '-' for stderr, or None (decisions then go to the main log only).
    decision_log: Path | None = None
    #: Rotate the decision log file past this size (5 old files kept).
    decision_log_max_bytes: int = 50 * MiB
    #: The recording for `criproxy replay`: one JSON line per intercepted call (None: no recording).
    record: Path | None = None
    #: Rotate the recording past this size (5 old files kept).
    record_max_bytes: int = 50 * MiB
    #: The node's name in the recording; None: the host name.
    node_name: str | None = None
    #: Calls served at once (streams included); past it a call fails at once with RESOURCE_EXHAUSTED,
    #: so a hung runtime cannot make the proxy queue without bound.
    max_concurrent_calls: int = 1000
    #: The file the settings came from, for messages; None when only flags were used.
    config_file: Path | None = None
    #: Replace a running proxy on --listen without downtime (command line only: an upgrade is an act).
    takeover: bool = False


def _endpoint(value: Any, where: str) -> Endpoint:
    return parse_endpoint(_string(value, where), what=where)


#: --listen binds PATH.<pid>.tmp first and renames it over PATH (criproxy.transport.sockets): both must fit.
_LISTEN_RESERVE = (TEMPORARY_SUFFIX_BYTES, "the proxy first binds PATH.<pid>.tmp beside it")


def _listen(value: Any, where: str) -> Endpoint:
    return parse_endpoint(_string(value, where), what=where, reserve=_LISTEN_RESERVE)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value.strip()


def _byte_size(value: Any, where: str) -> int:
    text = str(value).strip()
    units = {"Ki": 1024, "Mi": MiB, "Gi": 1024 * MiB}
    number, factor = text, 1
    for suffix, size in units.items():
        if text.endswith(suffix):
            number, factor = text[: -len(suffix)], size
            break
    if isinstance(value, bool) or not number.isdigit():
        raise ConfigError(f"{where}: expected a size in bytes such as 16777216 or 16Mi, got {value!r}")
    size = int(number) * factor
    if size < 4 * MiB or size > 2047 * MiB:
        raise ConfigError(f"{where}: {value!r} is out of range; use 4Mi to 2047Mi (the kubelet sends up to 16Mi)")
    return size


def _mode(value: Any, where: str) -> int:
    text = str(value).strip() if not isinstance(value, int) else oct(value)[2:]
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"{where}: expected octal permission bits such as 0660, got {value!r}") from None
    if mode & ~0o777 or mode & 0o007:
        raise ConfigError(f"{where}: {value!r} would let every local user drive the runtime; use at most 0770")
    return mode


def _group(value: Any, where: str) -> int:
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: no group named {text!r} on this host (see /etc/group)") from None


def _seconds(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not 0 <= seconds <= 3600:
        raise ConfigError(f"{where}: {value!r} is out of range; use 0 to 3600 seconds")
    return seconds


def _domain(value: Any, where: str) -> str:
    domain = _string(value, where)
    # The longest fixed setting name must still make a valid key prefix (253 characters at most).
    problem = annotation_key_problem(f"runtime-handler.{domain}/pod")
    if problem is not None or "." not in domain:
        raise ConfigError(f"{where}: {domain!r} is not a DNS domain such as criproxy.io or example.com")
    return domain


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or not 100 <= int(str(value)) <= 10_000_000:
        raise ConfigError(f"{where}: expected a whole number from 100 to 10000000, got {value!r}")
    return int(str(value))


def _file(value: Any, where: str) -> Path:
    path = Path(_string(value, where))
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


def _address(value: Any, where: str) -> tuple[str, int] | None:
    # YAML 1.1 reads an unquoted `off` (and `false`, `no`) in the config file as the boolean false.
    if value is False or (isinstance(value, str) and value.strip().lower() in ("", "off", "none", "false", "no")):
        return None
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if isinstance(value, bool) or not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT such as 127.0.0.1:9808 (or off), got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _log_path(value: Any, where: str) -> Path:
    text = _string(value, where)
    return STDERR if text == "-" else _file(text, where)


def _log_size(value: Any, where: str) -> int:
    text = str(value).strip()
    units = {"Ki": 1024, "Mi": MiB, "Gi": 1024 * MiB}
    factor = next((f for u, f in units.items() if text.endswith(u)), 1)
    number = text[:-2] if factor != 1 else text
    if isinstance(value, bool) or not number.isdigit() or not MiB <= int(number) * factor <= 100 * 1024 * MiB:
        raise ConfigError(f"{where}: expected a size from 1Mi to 100Gi such as 50Mi, got {value!r}")
    return int(number) * factor


def _node_name(value: Any, where: str) -> str:
    name = _string(value, where)
    if len(name) > 253 or any(c.isspace() or not c.isprintable() for c in name):
        raise ConfigError(f"{where}: expected a node name (at most 253 printable characters, no spaces), got "
                          f"{value!r}")
    return name


def _calls(value: Any, where: str) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or not 1 <= int(str(value)) <= 100_000:
        raise ConfigError(f"{where}: expected a whole number from 1 to 100000, got {value!r}")
    return int(str(value))


def _log_level(value: Any, where: str) -> str:
    level = _string(value, where).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{where}: expected one of debug, info, warning, error, got {value!r}")
    return level


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its flag/key, how to read it, and the --help text."""

    key: str
    parse: Callable[[Any, str], Any]
    metavar: str
    help: str

    @property
    def attr(self) -> str:
        return self.key.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.key


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", _listen, "URL",
            f"socket the kubelet connects to (default {DEFAULT_LISTEN}); point the kubelet's "
            "containerRuntimeEndpoint and imageServiceEndpoint here"),
    Setting("runtime-endpoint", _endpoint, "URL",
            "the real runtime's socket, e.g. unix:///run/containerd/containerd.sock; default: the first of "
            "containerd's and CRI-O's well-known sockets that answers"),
    Setting("image-endpoint", _endpoint, "URL", "where ImageService calls go (default: the runtime endpoint)"),
    Setting("max-message-bytes", _byte_size, "SIZE",
            "largest gRPC message carried either way, e.g. 16Mi (default 16Mi, the kubelet's limit)"),
    Setting("socket-mode", _mode, "OCTAL", "permission bits of the listening socket (default 0660)"),
    Setting("socket-group", _group, "GROUP",
            "group (name or id) that owns the listening socket (default: the proxy's own group)"),
    Setting("shutdown-grace-seconds", _seconds, "SECONDS",
            "on SIGTERM/SIGINT, how long in-flight calls may finish before they are cut (default 10)"),
    Setting("log-level", _log_level, "LEVEL", "debug, info, warning or error (default info)"),
    Setting("annotation-domain", _domain, "DOMAIN",
            f"domain of the annotation keys interceptors read, <setting>.DOMAIN/pod (default {DEFAULT_DOMAIN})"),
    Setting("policies", _file, "FILE",
            "policies.yaml: which namespaces may use which annotations and values; watched and reloaded "
            "(also on SIGHUP). Without it every enabled interceptor's changes stand"),
    Setting("metrics-address", _address, "HOST:PORT",
            f"serve Prometheus /metrics and /healthz, /readyz here (default {DEFAULT_METRICS_HOST}:"
            f"{DEFAULT_METRICS_PORT}; off to disable)"),
    Setting("decision-log", _log_path, "FILE",
            "write one JSON line per interceptor/policy decision here (- for stderr); default: main log only"),
    Setting("decision-log-max-bytes", _log_size, "SIZE", "rotate the decision log past this size (default 50Mi)"),
    Setting("record", _file, "FILE",
            "record every intercepted call (what its decision was made from and what was decided) as JSON lines "
            "here, for `criproxy replay`; default: no recording"),
    Setting("record-max-bytes", _log_size, "SIZE", "rotate the recording past this size (default 50Mi)"),
    Setting("node-name", _node_name, "NAME", "the node's name in the recording (default: the host name)"),
    Setting("max-concurrent-calls", _calls, "N",
            "calls served at once, streams included; more fail at once with RESOURCE_EXHAUSTED (default 1000)"),
    Setting("container-cache-size", _count, "N",
            f"containers remembered for UpdateContainerResources before the least recently used is looked up "
            f"again (default {DEFAULT_MAX_ENTRIES})"),
)
#: Config-file keys that are not flags: the interceptor list and one section per interceptor.
FILE_ONLY_KEYS = ("interceptors", *BUILTIN)
_BY_KEY = {s.key: s for s in SETTINGS}
assert {s.attr for s in SETTINGS} <= {f.name for f in fields(ServeConfig)}


def read_config_file(path: Path) -> dict[str, Any]:
    """Read the YAML config file into a mapping of known keys; every problem names the file and key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _BY_KEY and k not in FILE_ONLY_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: "
                          f"{', '.join([*_BY_KEY, *FILE_ONLY_KEYS])}")
    return {str(k): v for k, v in data.items()}


def build_config(flags: Mapping[str, Any], config_file: Path | None) -> ServeConfig:
    """Merge defaults, the config file and command-line flags (by setting key) into a ServeConfig."""
    values: dict[str, Any] = {"listen": parse_endpoint(DEFAULT_LISTEN, what="--listen"),
                              "metrics_address": (DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT)}
    file: dict[str, Any] = read_config_file(config_file) if config_file is not None else {}
    for key, raw in file.items():
        if key in _BY_KEY and raw is not None:  # `key:` with no value leaves the default
            values[_BY_KEY[key].attr] = _BY_KEY[key].parse(raw, f"config file {config_file}: {key}")
    for key, raw in flags.items():
        if raw is not None:
            setting = _BY_KEY[key]
            values[setting.attr] = setting.parse(raw, setting.flag)
    names = file.get("interceptors")
    where = f"config file {config_file}" if config_file is not None else "defaults"
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{where}: interceptors: expected a list of interceptor names, got {names!r}")
    values["interceptors"] = read_interceptors(names, file, where)
    return ServeConfig(config_file=config_file, **values)
