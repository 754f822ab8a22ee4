"""Decision-path benchmark: what policy evaluation adds to an intercepted call, in-process.

    python bench/decisions.py [--calls N] [--rules N]

Runs Pipeline.decide (the interceptors and the policy, everything the proxy does to an
intercepted request besides moving bytes) on the same CreateContainer request under three
setups, interleaved in rounds, and reports CPU time per call (time.process_time):

- no policy: the three built-in interceptors, every change allowed;
- 50 rules: a policy whose matching rule is the last of N (every rule before it is tried);
- 50 rules, last matches, cold: the same with the per-namespace match memo emptied before each
  call (the first call for a namespace);
- 50 rules, first rule matches.

The figure the issue sets: the policy adds at most 100 µs per intercepted call at 50 rules.
Not a test: it prints figures and PASS/MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from criproxy.api.runtime.v1 import api_pb2
from criproxy.cri.annotations import Lookup
from criproxy.cri.context import CREATE_CONTAINER, CallContext
from criproxy.interceptors import build_interceptors
from criproxy.pipeline import Pipeline
from criproxy.pipeline.index import pod_info
from criproxy.policies.engine import AnnotationPolicy
from criproxy.policies.model import parse_policy

ANNOTATIONS = {
    "memory-limit.criproxy.io/container.app": "512Mi",
    "cpu-quota.criproxy.io/pod": "500m",
    "seccomp-profile.criproxy.io/pod": "runtime/default",
    "app.kubernetes.io/name": "web",
    "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 2000 + "}",
}


def policy_text(rules: int, target_first: bool) -> str:
    filler = [f"""  - name: team-{i}
    namespaces: ["team-{i}-*", "svc-{i}"]
    excludeNamespaces: [team-{i}-legacy]
    podSelector: {{matchLabels: {{tier: t{i}}}}}
    settings:
      memory-limit: {{min: 4Mi, max: {i + 1}Gi}}
      cpu-quota: {{max: "{i + 1}"}}
      seccomp-profile: {{values: [runtime/default, "localhost/team-{i}/*"]}}
""" for i in range(rules - 1)]
    target = """  - name: target
    namespaces: ["shop-*"]
    settings:
      memory-limit: {min: 4Mi, max: 8Gi}
      cpu-quota: {max: "8"}
      seccomp-profile: {values: [runtime/default]}
"""
    body = [target, *filler] if target_first else [*filler, target]
    return "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules:\n" + "".join(body)


def request() -> api_pb2.CreateContainerRequest:
    sandbox = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web-7d9f", uid="0f6b", namespace="shop-eu"),
        labels={"app": "web", "pod-template-hash": "7d9f"}, annotations=ANNOTATIONS)
    return api_pb2.CreateContainerRequest(
        pod_sandbox_id="a" * 64, sandbox_config=sandbox,
        config=api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="app"),
            linux=api_pb2.LinuxContainerConfig(resources=api_pb2.LinuxContainerResources(
                cpu_period=100_000, cpu_quota=200_000, cpu_shares=1024, memory_limit_in_bytes=1 << 30,
                memory_swap_limit_in_bytes=1 << 30, oom_score_adj=900))))


def setup(policy: str | None, *, cold: bool = False) -> Callable[[], None]:
    lookup = Lookup()
    pipeline = Pipeline(build_interceptors(None, {}, lookup, "bench"), lookup=lookup,
                        on_decisions=lambda ctx, decisions: None)
    policies = parse_policy(policy, "bench.yaml") if policy is not None else None
    if policies is not None:
        pipeline.policy = AnnotationPolicy(policies, lookup)
    req = request()
    s = req.sandbox_config
    loop = asyncio.new_event_loop()

    def one() -> None:
        if cold and policies is not None:
            policies._matches.clear()  # every call a namespace seen for the first time
        ctx = CallContext(CREATE_CONTAINER, pod_info(s.metadata, s.labels, s.annotations), "app", req,
                          pipeline.facts)
        outcome = loop.run_until_complete(pipeline.decide(ctx))
        assert outcome.denial is None and len(outcome.changes) == 4, outcome
    return one


def measure(fn: Callable[[], None], calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per setup per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rules", type=int, default=50)
    args = parser.parse_args()
    setups = {"interceptors, no policy": setup(None),
              f"{args.rules} rules, last matches": setup(policy_text(args.rules, target_first=False)),
              f"{args.rules} rules, last matches, cold": setup(policy_text(args.rules, target_first=False), cold=True),
              f"{args.rules} rules, first matches": setup(policy_text(args.rules, target_first=True))}
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for fn in setups.values():
        measure(fn, 200)  # warm-up
    for _ in range(args.rounds):
        for name, fn in setups.items():
            samples[name].append(measure(fn, args.calls))
    base = statistics.median(samples["interceptors, no policy"])
    print(f"{'setup':40} {'CPU/call (median of rounds)':>28} {'added by policy':>16}")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"{name:40} {med:25.1f} µs {med - base:13.1f} µs")
    worst = statistics.median(samples[f"{args.rules} rules, last matches, cold"]) - base
    print(f"\ntarget: policy adds <= 100 µs per intercepted call at {args.rules} rules: "
          f"{'PASS' if worst <= 100 else 'MISS'} ({worst:.1f} µs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
