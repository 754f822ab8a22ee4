"""Settings: flags and the YAML file share one table; every bad value names the input."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from criproxy import server
from criproxy.config import DEFAULT_MAX_MESSAGE_BYTES, build_config
from criproxy.cri.annotations import Lookup
from criproxy.errors import ConfigError
from criproxy.interceptors import InterceptorSpec, build
from criproxy.interceptors.resources import ResourcesConfig, ResourcesInterceptor
from criproxy.interceptors.seccomp import SeccompConfig, SeccompInterceptor
from criproxy.transport import endpoints
from criproxy.transport.endpoints import parse_endpoint


def flags(**values: object) -> dict[str, object]:
    return {key.replace("_", "-"): value for key, value in values.items()}


def test_defaults() -> None:
    config = build_config({}, None)
    assert config.listen.url == "unix:///run/criproxy/criproxy.sock"
    assert config.runtime_endpoint is None
    assert config.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert config.socket_mode == 0o660


def test_file_then_flags_override(tmp_path: Path) -> None:
    file = tmp_path / "criproxy.yaml"
    file.write_text("runtime-endpoint: unix:///run/crio/crio.sock\nmax-message-bytes: 32Mi\nsocket-mode: '0600'\n")
    config = build_config(flags(runtime_endpoint="unix:///run/containerd/containerd.sock"), file)
    assert config.runtime_endpoint is not None
    assert config.runtime_endpoint.path == "/run/containerd/containerd.sock"
    assert config.max_message_bytes == 32 * 1024 * 1024
    assert config.socket_mode == 0o600
    assert config.config_file == file


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("listen", "tcp://127.0.0.1:1234",
         "--listen 'tcp://127.0.0.1:1234': the tcp:// scheme is not supported; expected a unix socket URL such as "
         "unix:///run/containerd/containerd.sock"),
        ("runtime-endpoint", "unix://run/containerd.sock",
         "--runtime-endpoint 'unix://run/containerd.sock': the socket path must be absolute "
         "(unix:///abs/path has three slashes)"),
        ("runtime-endpoint", "containerd.sock",
         "--runtime-endpoint 'containerd.sock': expected a unix socket URL such as "
         "unix:///run/containerd/containerd.sock"),
        ("max-message-bytes", "lots",
         "--max-message-bytes: expected a size in bytes such as 16777216 or 16Mi, got 'lots'"),
        ("max-message-bytes", "1Mi",
         "--max-message-bytes: '1Mi' is out of range; use 4Mi to 2047Mi (the kubelet sends up to 16Mi)"),
        ("socket-mode", "0666",
         "--socket-mode: '0666' would let every local user drive the runtime; use at most 0770"),
        ("socket-mode", "rw",
         "--socket-mode: expected octal permission bits such as 0660, got 'rw'"),
        ("socket-group", "no-such-group-here",
         "--socket-group: no group named 'no-such-group-here' on this host (see /etc/group)"),
        ("shutdown-grace-seconds", "-1",
         "--shutdown-grace-seconds: '-1' is out of range; use 0 to 3600 seconds"),
        ("log-level", "loud",
         "--log-level: expected one of debug, info, warning, error, got 'loud'"),
    ],
)
def test_bad_flag_values(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({key: value}, None)
    assert str(caught.value) == message


def values(value: Any) -> Iterator[Any]:
    """`value` and everything inside it: dataclass fields, tuple, frozenset and mapping members."""
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner: Any = [getattr(value, f.name) for f in dataclasses.fields(value)]
    elif isinstance(value, tuple | list | frozenset | set):
        inner = value
    elif isinstance(value, dict):
        inner = [*value, *value.values()]
    else:
        return
    for item in inner:
        yield from values(item)


def test_the_config_is_plain_data_and_interceptors_are_built_from_it(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("interceptors: [seccomp, resources]\n"
                    "seccomp: {profile-root: /opt/seccomp, legacy-annotations: true}\n"
                    "resources: {allow-loosening: [memory-limit], unified-keys: [pids.max]}\n")
    config = build_config({}, file)
    assert not [v for v in values(config) if hasattr(v, "adjust")]  # no interceptor objects, only values
    again = build_config({}, file)
    assert config == again and hash(config.interceptors) == hash(again.interceptors)
    assert config.interceptors == (
        InterceptorSpec("seccomp", SeccompConfig(profile_root=Path("/opt/seccomp"), legacy_annotations=True)),
        InterceptorSpec("resources", ResourcesConfig(allow_loosening=frozenset({"memory-limit"}),
                                                     unified_keys=frozenset({"pids.max"})),
    ))
    lookup = Lookup("example.com")
    first, second = build(config.interceptors, lookup), build(config.interceptors, lookup)
    assert [type(i) for i in first] == [type(i) for i in second] == [SeccompInterceptor, ResourcesInterceptor]
    assert all(a is not b for a, b in zip(first, second, strict=True))  # every build makes new objects
    assert [(i.config, i.lookup) for i in first] == [(i.config, i.lookup) for i in second] == [  # type: ignore[attr-defined]
        (spec.settings, lookup) for spec in config.interceptors]
    assert build_config({}, file) == config  # building changed nothing in the config


def test_unknown_key_in_file_lists_known_ones(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("runtime_endpoint: unix:///x\n")
    with pytest.raises(ConfigError) as caught:
        build_config({}, file)
    assert str(caught.value).startswith(f"config file {file}: unknown key(s) runtime_endpoint; known keys: listen, ")


def test_bad_value_in_file_names_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("max-message-bytes: true\n")
    with pytest.raises(ConfigError) as caught:
        build_config({}, file)
    assert str(caught.value) == (f"config file {file}: max-message-bytes: expected a size in bytes such as "
                                 "16777216 or 16Mi, got True")


@pytest.mark.parametrize(("text", "message"), [
    ("a: [", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of settings at the top, got list"),
])
def test_malformed_file(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config({}, file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({}, tmp_path / "nope.yaml")
    assert str(caught.value) == f"config file {tmp_path / 'nope.yaml'}: cannot read it: No such file or directory"


def test_autodetect_takes_the_first_answering_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    crio = tmp_path / "crio.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(crio))
    listener.listen()
    monkeypatch.setattr(server, "WELL_KNOWN_RUNTIME_ENDPOINTS",
                        (f"unix://{tmp_path}/containerd.sock", f"unix://{crio}"))
    try:
        found = server.find_runtime_endpoint(parse_endpoint("unix:///run/criproxy/criproxy.sock", what="t"))
    finally:
        listener.close()
    assert found.path == str(crio)


def test_autodetect_with_nothing_answering_says_what_it_tried(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setattr(server, "WELL_KNOWN_RUNTIME_ENDPOINTS", (f"unix://{tmp_path}/a.sock",))
    with pytest.raises(ConfigError) as caught:
        server.find_runtime_endpoint(parse_endpoint("unix:///run/criproxy/criproxy.sock", what="t"))
    assert str(caught.value) == (
        f"no --runtime-endpoint given and none of the well-known runtime sockets answers (unix://{tmp_path}/a.sock); "
        "start the runtime or pass --runtime-endpoint")


def test_well_known_order_is_containerd_then_crio() -> None:
    assert endpoints.WELL_KNOWN_RUNTIME_ENDPOINTS == (
        "unix:///run/containerd/containerd.sock", "unix:///run/crio/crio.sock")


@pytest.mark.parametrize("text", ["off", "false", "'off'", "none", "Off", "no"])
def test_metrics_address_off_in_the_file_disables_it(tmp_path: Path, text: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(f"metrics-address: {text}\n")
    assert build_config({}, file).metrics_address is None
    assert build_config({"metrics-address": "off"}, None).metrics_address is None


def test_metrics_address_true_in_the_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("metrics-address: on\n")
    with pytest.raises(ConfigError) as caught:
        build_config({}, file)
    assert str(caught.value) == (f"config file {file}: metrics-address: expected HOST:PORT such as 127.0.0.1:9808 "
                                 "(or off), got True")


def long_path(length: int) -> str:
    path = "/tmp/" + "d" * 50 + "/"
    return path + "s" * (length - len(path))


@pytest.mark.parametrize("key", ["runtime-endpoint", "image-endpoint"])
def test_a_socket_path_longer_than_the_kernel_allows_is_refused(key: str, tmp_path: Path) -> None:
    assert build_config({key: "unix://" + long_path(107)}, None)  # the limit itself is fine
    url = "unix://" + long_path(108)
    with pytest.raises(ConfigError) as caught:
        build_config({key: url}, None)
    assert str(caught.value) == (f"--{key} {url!r}: the socket path is 108 bytes long; the kernel allows at most "
                                 "107 bytes in a unix socket path")
    file = tmp_path / "c.yaml"
    file.write_text(f"{key}: {url}\n")
    with pytest.raises(ConfigError, match=f"config file {file}: {key} .*108 bytes long"):
        build_config({}, file)


def test_a_listen_path_leaves_room_for_the_temporary_socket_beside_it() -> None:
    assert build_config({"listen": "unix://" + long_path(95)}, None)
    url = "unix://" + long_path(96)
    with pytest.raises(ConfigError) as caught:
        build_config({"listen": url}, None)
    assert str(caught.value) == (f"--listen {url!r}: the socket path is 96 bytes long; the kernel allows at most "
                                 "107 bytes in a unix socket path, and the proxy first binds PATH.<pid>.tmp beside "
                                 "it (12 bytes more): use at most 95")


def test_a_multibyte_socket_path_counts_bytes() -> None:
    url = "unix://" + long_path(105)[:-5] + "\u00e9" * 5  # 100 + 10 bytes, 105 characters
    with pytest.raises(ConfigError, match="110 bytes long"):
        build_config({"runtime-endpoint": url}, None)
