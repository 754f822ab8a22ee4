"""Annotation keys: the Kubernetes key rules, the lookup precedence, and that every documented key is valid."""

from __future__ import annotations

import pytest

from criproxy.cri.annotations import CONTAINER, DEFAULT_DOMAIN, POD, Found, Lookup, annotation_key_problem, setting_of

DOCUMENTED_SETTINGS = ("runtime-handler", "seccomp-profile", "cpu-quota", "cpu-period", "cpu-shares", "cpuset-cpus",
                       "cpuset-mems", "memory-limit", "memory-swap", "hugepages-2mi", "hugepages-1gi", "oom-score-adj",
                       "unified.memory.high", "unified.pids.max")
LONGEST_CONTAINER = "a" * 53  # "container." + 53 characters = 63, the longest name part


@pytest.mark.parametrize(
    "key",
    [
        "runtime-handler.criproxy.io",
        "runtime-handler.criproxy.io/pod",
        "memory-limit.criproxy.io/container.app",
        "unified.memory.high.criproxy.io/container.my_app.v2",
        "app.kubernetes.io/name",
        "plain-name",
        "A",
        "a" * 63,
        f"{'a' * 253}/x",
        "UPPER_and.lower-9",
    ],
    ids=["bare", "pod", "container", "unified-container", "k8s-style", "no-prefix", "one-letter", "name-63",
         "prefix-253", "mixed-case-name"],
)
def test_valid_annotation_keys(key: str) -> None:
    assert annotation_key_problem(key) is None


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("/pod", "the prefix before '/' is empty"),
        (f"{'a' * 254}/pod", "the prefix is longer than 253 characters"),
        ("Criproxy.io/pod",
         "the prefix 'Criproxy.io' is not a DNS subdomain (lower-case letters, digits, '-' and '.')"),
        ("hugepages-2Mi.criproxy.io/pod",
         "the prefix 'hugepages-2Mi.criproxy.io' is not a DNS subdomain (lower-case letters, digits, '-' and '.')"),
        ("-x.criproxy.io/pod", "the prefix '-x.criproxy.io' is not a DNS subdomain (lower-case letters, digits, '-' "
                               "and '.')"),
        ("a..b/pod", "the prefix 'a..b' is not a DNS subdomain (lower-case letters, digits, '-' and '.')"),
        ("a/b/c", "the prefix 'a/b' is not a DNS subdomain (lower-case letters, digits, '-' and '.')"),
        ("", "the name is empty"),
        ("criproxy.io/", "the name is empty"),
        ("a" * 64, f"the name '{'a' * 64}' is longer than 63 characters"),
        ("x.io/-pod", "the name '-pod' must be letters, digits, '-', '_' or '.', starting and ending alphanumeric"),
        ("x.io/pod.", "the name 'pod.' must be letters, digits, '-', '_' or '.', starting and ending alphanumeric"),
        ("x.io/po d", "the name 'po d' must be letters, digits, '-', '_' or '.', starting and ending alphanumeric"),
    ],
    ids=["empty-prefix", "prefix-254", "upper-prefix", "upper-setting", "prefix-leading-dash", "empty-label",
         "two-slashes", "empty-key", "empty-name", "name-64", "name-leading-dash", "name-trailing-dot", "name-space"],
)
def test_invalid_annotation_keys(key: str, problem: str) -> None:
    assert annotation_key_problem(key) == problem


@pytest.mark.parametrize("key", ["criproxy.io/pod\n", "criproxy.io\n/pod"], ids=["newline-name", "newline-prefix"])
def test_trailing_newline_is_not_a_valid_key(key: str) -> None:
    assert annotation_key_problem(key) is not None


@pytest.mark.parametrize("setting", DOCUMENTED_SETTINGS)
@pytest.mark.parametrize("container", [None, "app", "a", "my-app-2", LONGEST_CONTAINER],
                         ids=["pod-level", "app", "a", "dashed", "53-chars"])
def test_every_documented_key_is_a_valid_kubernetes_annotation_key(setting: str, container: str | None) -> None:
    keys = [key for key, _ in Lookup().keys(setting, container)]
    assert len(keys) == (2 if container is None else 3)
    assert {key: annotation_key_problem(key) for key in keys} == dict.fromkeys(keys)


def test_container_scope_exists_only_for_names_up_to_53_characters() -> None:
    name = "a" * 54
    key, scope = Lookup().keys("memory-limit", name)[0]
    assert (key, scope) == (f"memory-limit.criproxy.io/container.{name}", CONTAINER)
    assert annotation_key_problem(key) == f"the name 'container.{name}' is longer than 63 characters"


@pytest.mark.parametrize(
    ("domain", "container", "expected"),
    [
        (DEFAULT_DOMAIN, "app", [("cpu-quota.criproxy.io/container.app", CONTAINER), ("cpu-quota.criproxy.io/pod", POD),
                                 ("cpu-quota.criproxy.io", POD)]),
        (DEFAULT_DOMAIN, None, [("cpu-quota.criproxy.io/pod", POD), ("cpu-quota.criproxy.io", POD)]),
        (DEFAULT_DOMAIN, "", [("cpu-quota.criproxy.io/pod", POD), ("cpu-quota.criproxy.io", POD)]),
        ("example.com", "db", [("cpu-quota.example.com/container.db", CONTAINER), ("cpu-quota.example.com/pod", POD),
                               ("cpu-quota.example.com", POD)]),
    ],
    ids=["container", "pod-level", "empty-container-name", "custom-domain"],
)
def test_keys_in_precedence_order(domain: str, container: str | None, expected: list[tuple[str, str]]) -> None:
    assert Lookup(domain).keys("cpu-quota", container) == expected


C_KEY, P_KEY = "memory-limit.criproxy.io/container.app", "memory-limit.criproxy.io/pod"
BARE = "memory-limit.criproxy.io"


@pytest.mark.parametrize(
    ("annotations", "container", "expected"),
    [
        ({C_KEY: "1Gi", P_KEY: "2Gi", BARE: "3Gi"}, "app", Found(C_KEY, "1Gi", CONTAINER)),
        ({P_KEY: "2Gi", BARE: "3Gi"}, "app", Found(P_KEY, "2Gi", POD)),
        ({BARE: "3Gi"}, "app", Found(BARE, "3Gi", POD)),
        ({C_KEY: "1Gi", BARE: "3Gi"}, "app", Found(C_KEY, "1Gi", CONTAINER)),
        ({C_KEY: "1Gi", P_KEY: "2Gi", BARE: "3Gi"}, None, Found(P_KEY, "2Gi", POD)),
        ({C_KEY: "1Gi", BARE: "3Gi"}, None, Found(BARE, "3Gi", POD)),
        ({C_KEY: "1Gi"}, None, None),
        ({C_KEY: "1Gi"}, "sidecar", None),
        ({"memory-limit.criproxy.io/container.sidecar": "1Gi", P_KEY: "2Gi"}, "app", Found(P_KEY, "2Gi", POD)),
        ({C_KEY: ""}, "app", Found(C_KEY, "", CONTAINER)),
        ({"memory-limit.example.com/pod": "2Gi"}, "app", None),
        ({"cpu-quota.criproxy.io/pod": "1"}, "app", None),
        ({}, "app", None),
    ],
    ids=["container-beats-all", "pod-beats-bare", "bare-alone", "container-beats-bare", "pod-level-ignores-container",
         "pod-level-bare", "pod-level-only-container-key", "other-container", "other-container-falls-to-pod",
         "empty-value-still-found", "other-domain", "other-setting", "no-annotations"],
)
def test_find_precedence(annotations: dict[str, str], container: str | None, expected: Found | None) -> None:
    assert Lookup().find(annotations, "memory-limit", container) == expected


@pytest.mark.parametrize(
    ("annotations", "container", "expected"),
    [
        ({"memory-limit.example.com/container.app": "1Gi", C_KEY: "9Gi"}, "app",
         Found("memory-limit.example.com/container.app", "1Gi", CONTAINER)),
        ({"memory-limit.example.com": "2Gi", C_KEY: "9Gi", P_KEY: "9Gi"}, "app",
         Found("memory-limit.example.com", "2Gi", POD)),
        ({C_KEY: "9Gi", P_KEY: "9Gi", BARE: "9Gi"}, "app", None),
    ],
    ids=["custom-container", "custom-bare-ignores-default-domain", "default-domain-ignored"],
)
def test_find_custom_domain(annotations: dict[str, str], container: str | None, expected: Found | None) -> None:
    assert Lookup("example.com").find(annotations, "memory-limit", container) == expected


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, []),
        ({"runtime-handler.criproxy.io/pod": "kata"}, []),
        ({"runtime-handler.criproxy.io/container.b": "x", "runtime-handler.criproxy.io/container.a": "y",
          "runtime-handler.criproxy.io": "z"},
         ["runtime-handler.criproxy.io/container.a", "runtime-handler.criproxy.io/container.b"]),
        ({"runtime-handler.example.com/container.a": "x", "seccomp-profile.criproxy.io/container.a": "x"}, []),
    ],
    ids=["none", "pod-key-only", "sorted-container-keys", "other-domain-and-setting"],
)
def test_container_scoped_keys(annotations: dict[str, str], expected: list[str]) -> None:
    assert Lookup().container_scoped_keys(annotations, "runtime-handler") == expected


def test_container_scoped_keys_custom_domain() -> None:
    annotations = {"runtime-handler.example.com/container.a": "x", "runtime-handler.criproxy.io/container.a": "x"}
    assert Lookup("example.com").container_scoped_keys(annotations, "runtime-handler") == [
        "runtime-handler.example.com/container.a"]


@pytest.mark.parametrize(
    ("domain", "annotations", "expected"),
    [
        (DEFAULT_DOMAIN, {}, []),
        (DEFAULT_DOMAIN,
         {"memory-limit.criproxy.io/pod": "1Gi", "cpu-quota.criproxy.io": "1", "app.kubernetes.io/name": "web",
          "seccomp-profile.criproxy.io/container.app": "unconfined"},
         ["cpu-quota.criproxy.io", "memory-limit.criproxy.io/pod", "seccomp-profile.criproxy.io/container.app"]),
        (DEFAULT_DOMAIN, {"criproxy.io/applied": "[]", "x.notcriproxy.io/pod": "1", "criproxy.io": "1"}, []),
        ("example.com", {"memory-limit.criproxy.io/pod": "1Gi", "memory-limit.example.com/pod": "1Gi"},
         ["memory-limit.example.com/pod"]),
    ],
    ids=["empty", "only-own-domain-sorted", "domain-itself-and-lookalikes", "custom-domain"],
)
def test_keys_of_the_domain(domain: str, annotations: dict[str, str], expected: list[str]) -> None:
    assert sorted(key for key in annotations if setting_of(key, domain) is not None) == expected


def test_prefix() -> None:
    assert Lookup().prefix("unified.memory.high") == "unified.memory.high.criproxy.io"
    assert Lookup("example.com").prefix("seccomp-profile") == "seccomp-profile.example.com"
