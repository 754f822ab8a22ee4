"""The long fuzzing run (a soak, not a test): the invariants of tests/test_fuzz.py, 100,000+ inputs per target.

The targets and their invariants are bench/fuzz_targets.py (shared with the fast tests). Inputs here
come from a seeded random generator with mutation (much faster than hypothesis at this volume), and
aim wider than the fast tests: explicit YAML tags, deep nesting, alias bombs, malformed kubelet
values. Per target it prints the inputs tried, the outcomes by type, the known bugs hit (each pinned
by a strict-xfail test) and the failures: inputs that ended in anything undocumented (should be 0).

    python bench/fuzz.py                          # 100,000 inputs per target, 2 processes
    python bench/fuzz.py --inputs 5000 --jobs 1   # a quick look
    python bench/fuzz.py --max-seconds 600        # stop every target at 10 minutes, reporting how far it got
    python bench/fuzz.py --target proxy --seed 7  # one target, another seed

Exit status: 0 when no target had a failure, 1 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")  # as criproxy serve
sys.path.insert(0, ROOT)

from bench import fuzz_targets as ft  # noqa: E402  (after sys.path)

TARGETS = ("quantity", "parsers", "adjust", "policy", "proxy")
#: How many processes share a target's inputs (the policy loader is pure-Python YAML: the slowest).
SHARDS = {"policy": 2}
MAX_FAILURES_SHOWN = 5


@dataclass
class Result:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    failure_count: int = 0

    def merge(self, other: Result) -> None:
        self.inputs += other.inputs
        self.seconds = max(self.seconds, other.seconds)
        self.outcomes.update(other.outcomes)
        self.failure_count += other.failure_count
        self.failures += other.failures[: MAX_FAILURES_SHOWN - len(self.failures)]


# ------------------------------------------------------------------------------------------ random inputs

PRINTABLE = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\x00", "\r"]


def rand_char(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.7:
        return rng.choice(PRINTABLE)
    if pick < 0.9:
        return chr(rng.randint(0x80, 0xD7FF))
    return chr(rng.randint(0xE000, 0x10FFFF))


def rand_text(rng: random.Random, longest: int, alphabet: str | None = None) -> str:
    size = rng.randint(0, longest) if rng.random() < 0.9 else rng.randint(longest, longest * 50)
    if alphabet is not None:
        return "".join(rng.choice(alphabet) for _ in range(size))
    return "".join(rand_char(rng) for _ in range(size))


def mutate_text(rng: random.Random, text: str, alphabet: str | None = None) -> str:
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        char = rng.choice(alphabet) if alphabet and rng.random() < 0.7 else rand_char(rng)
        op = rng.randrange(4)
        if op == 0:
            text = text[:at] + char + text[at:]
        elif op == 1:
            text = text[:at] + text[at + 1:]
        elif op == 2:
            text = text[:at] + char + text[at + 1:]
        else:
            text = text[:at] + text[at:at + rng.randint(1, 8)] * rng.randint(2, 20) + text[at:]
    return text


def rand_value(rng: random.Random, good: tuple[str, ...] = ()) -> str:
    pick = rng.random()
    if good and pick < 0.4:
        return rng.choice(good)
    if good and pick < 0.55:
        return mutate_text(rng, rng.choice(good), ft.QUANTITY_ALPHABET)
    if pick < 0.75:
        return rng.choice(ft.VALUES)
    return rand_text(rng, 40)


def rand_annotations(rng: random.Random, interceptor: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    interceptor = interceptor or rng.choice(sorted(ft.SETTING_VALUES))
    settings = ft.SETTING_VALUES[interceptor]
    for _ in range(rng.randint(0, 6)):
        pick = rng.random()
        if pick < 0.6:
            setting = rng.choice(sorted(settings))
            key = ft.annotation_key(setting, rng.choice(("", "/pod", "/container.app", "/container.x")))
            out[key] = rand_value(rng, settings[setting])
        elif pick < 0.7:
            out[rng.choice(ft.LEGACY_KEYS)] = rand_value(rng, ft.GOOD_VALUES["seccomp-profile"])
        elif pick < 0.85:
            out[ft.annotation_key(rng.choice(ft.SETTINGS), rng.choice(ft.SCOPES))] = rand_value(rng)
        else:
            out[rng.choice((*ft.OTHER_KEYS, rand_text(rng, 30)))] = rand_value(rng)
    return out


def rand_kubelet(rng: random.Random) -> dict[str, Any]:
    kubelet = {name: rng.choice(choices) for name, choices in ft.KUBELET_CHOICES.items()}
    if rng.random() < 0.2:
        name = rng.choice(("memory_limit_in_bytes", "cpu_shares", "cpu_quota", "cpu_period", "oom_score_adj"))
        kubelet[name] = rng.randint(-2**63, 2**63 - 1) if name == "oom_score_adj" else rng.randint(0, 2**63 - 1)
    if rng.random() < 0.02:  # what no kubelet sends: reaches the kubelet-cpuset known bug
        kubelet[rng.choice(("cpuset_cpus", "cpuset_mems"))] = rand_text(rng, 8, "0123456789-,x ")
    return kubelet


# ------------------------------------------------------------------------------------------ targets


def quantity_inputs(rng: random.Random, scratch: Path) -> Iterator[Callable[[], str]]:
    while True:
        pick = rng.random()
        if pick < 0.4:
            text = rand_text(rng, 70, ft.QUANTITY_ALPHABET)
        elif pick < 0.8:
            text = mutate_text(rng, rng.choice(ft.QUANTITY_SEEDS), ft.QUANTITY_ALPHABET)
        else:
            text = rand_text(rng, 80)
        yield lambda text=text: ft.check_quantity(text)


def parser_inputs(rng: random.Random, scratch: Path) -> Iterator[Callable[[], str]]:
    root = ft.make_profile_root(scratch)
    numbers = (100_000, 1000, 1_000_000, ft.Mi * 4, 0)
    while True:
        parser = rng.choice(ft.PARSERS)
        value = rand_value(rng, ft.GOOD_VALUES[parser])
        number = rng.choice(numbers) if rng.random() < 0.7 else rng.randint(-2**63, 2**63 - 1)
        yield lambda p=parser, v=value, n=number: ft.check_annotation_parser(p, v, root, n)


def adjust_inputs(rng: random.Random, scratch: Path) -> Iterator[Callable[[], str]]:
    root = ft.make_profile_root(scratch)
    interceptors = ft.build_interceptors(root)
    while True:
        variant = rng.choice(ft.INTERCEPTOR_VARIANTS)
        case = ft.AdjustCase(
            variant=variant, event=rng.randint(0, 1), annotations=rand_annotations(rng, ft.interceptor_of(variant)),
            container=rng.choice(("app", "app", "other", "", rand_text(rng, 60))), kubelet=rand_kubelet(rng),
            handler=rng.choice(("", "runc", "kata", "gvisor")), seccomp=rng.choice((None, 0, 1, 2, 3)),
            facts=rng.randint(0, 1))
        yield lambda case=case: ft.check_adjust(interceptors, case, root)


def mutated_policy(rng: random.Random, seeds: list[str]) -> str:
    ops = [(rng.choice(sorted(ft.MUTATIONS)), rng.randrange(1 << 20), rng.randrange(1 << 20),
            rng.choice((*ft.YAML_TOKENS, *ft.YAML_TAG_TOKENS)) if rng.random() < 0.6 else rand_char(rng))
           for _ in range(rng.randint(1, 8))]
    return ft.mutate(rng.choice(seeds), ops)


def token_soup(rng: random.Random) -> str:
    header = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n" if rng.random() < 0.7 else ""
    return header + "".join(rng.choice((*ft.YAML_TOKENS, *ft.YAML_TAG_TOKENS, rand_text(rng, 6)))
                            for _ in range(rng.randint(0, 80)))


def random_rule(rng: random.Random) -> str:
    """A rule with a random setting, key and value: reaches the model's checks, not just YAML's."""
    setting = rng.choice((*ft.SETTINGS, "hugepages-*", "unified.*"))
    spec = rng.choice(("values", "patterns", "forbid", "min", "max", "default", "required", "effective"))
    value = rng.choice(("[a, '*', '(x']", "{}", "512Mi", "'1e999'", "[" + rand_text(rng, 10) + "]", "true",
                        "'" + rand_text(rng, 12).replace("'", "") + "'", "[" * 40, "!!int ''", "!!float x"))
    return ("apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules:\n- name: r\n  namespaces: [a]\n"
            f"  settings:\n    {setting}: {{{spec}: {value}}}\n")


def hostile_document(rng: random.Random) -> str:
    """Deep nesting, an alias bomb, or a long document (rare: each costs up to a second)."""
    kind = rng.choice(("nest", "bomb", "long"))
    if kind == "nest":
        return ft.nested(rng.choice((40, 600, 5000)), rng.choice(("flow-map", "block-list", "flow-list")))
    if kind == "bomb":
        return ft.alias_bomb(rng.randint(2, 12), rng.randint(2, 9))
    return "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\nrules:\n" + "".join(
        f"  - {{name: r{i}, namespaces: [n{i}]}}\n" for i in range(rng.randint(100, 3000)))


POLICY_SHAPES: tuple[tuple[float, Callable[[random.Random, list[str]], str | bytes]], ...] = (
    (0.25, mutated_policy),
    (0.25, lambda rng, seeds: token_soup(rng)),
    (0.2, lambda rng, seeds: rand_text(rng, 300)),
    (0.15, lambda rng, seeds: bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))),
    (0.1485, lambda rng, seeds: random_rule(rng)),
    (1.0, lambda rng, seeds: hostile_document(rng)),
)


def policy_text(rng: random.Random, seeds: list[str]) -> str | bytes:
    pick, total = rng.random(), 0.0
    for share, make in POLICY_SHAPES:
        total += share
        if pick < total:
            return make(rng, seeds)
    return hostile_document(rng)


def policy_inputs(rng: random.Random, scratch: Path) -> Iterator[Callable[[], str]]:
    seeds = ft.policy_seeds()
    while True:
        data = policy_text(rng, seeds)
        yield lambda data=data: ft.check_policy_text(data, with_load=False)


def proxy_inputs(rng: random.Random, scratch: Path) -> Iterator[Callable[[], str]]:
    """Two proxies (the default interceptors; one also with the repository's policies.yaml) before one fake
    runtime, each input sent to one of them."""
    from criproxy.config import build_config
    from criproxy.server import start_proxy
    from tests.support.fakeruntime import FakeRuntime
    from tests.support.loopthread import LoopThread

    loop, fake = LoopThread(), FakeRuntime()
    sockdir = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/tmp"))
    loop.run(fake.start(str(sockdir / "runtime.sock")))
    ft.script_fake(fake)
    root = ft.make_profile_root(scratch)
    policies = scratch / "policies.yaml"
    policies.write_bytes(ft.REPO_POLICY.read_bytes())
    policies.chmod(0o644)
    harnesses, proxies = [], []
    for name, policy in (("plain", None), ("policy", policies)):
        (sockdir / name).mkdir()
        config = scratch / f"{name}.yaml"
        config.write_text(ft.proxy_config_text(sockdir / name, root, policy).replace(
            f"runtime-endpoint: unix://{sockdir / name}/", f"runtime-endpoint: unix://{sockdir}/"))
        proxy = loop.run(start_proxy(build_config({}, config)))
        proxies.append(proxy)
        harnesses.append(ft.ProxyHarness(proxy.config.listen.target, fake.journal))
    bases = ft.base_requests()
    try:
        for count in range(1 << 62):
            harness = harnesses[count % 2]
            key, payload, api = proxy_input(rng, bases)
            yield lambda h=harness, k=key, p=payload, a=api: h.call(k, p, a)
            if count % 1000 == 999:
                del fake.journal[:]
                if not all(h.version_answers() for h in harnesses):
                    raise ft.Broken("proxy", None, "Version no longer answers")
    finally:
        for harness in harnesses:
            harness.close()
        for proxy in proxies:
            loop.run(proxy.stop(0))
        loop.run(fake.stop())
        loop.close()


def proxy_input(rng: random.Random, bases: dict[str, list[bytes]]) -> tuple[str, bytes, str]:
    api = "v1alpha2" if rng.random() < 0.2 else "v1"
    pick = rng.random()
    if pick < 0.15:
        return rng.choice(sorted(ft.DECODED)), bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))), api
    key = rng.choice(sorted(bases))
    base = rng.choice(bases[key])
    if pick < 0.3:
        return key, ft.truncate(base, rng.randrange(1 << 16)), api
    if pick < 0.5:
        return key, ft.flip_bits(base, [rng.randrange(1 << 20) for _ in range(rng.randint(1, 8))]), api
    key = rng.choice((ft.RUN_POD_SANDBOX, ft.CREATE_CONTAINER, ft.UPDATE_CONTAINER_RESOURCES))
    namespace = rng.choice(("criproxy-demo", "shop", "kube-system", "batch-eu"))
    annotations = rand_annotations(rng)
    if rng.random() < 0.2:
        setting, value = rng.choice((("memory-limit", "4Gi"), ("oom-score-adj", "-1000"), ("cpu-quota", "4")))
        annotations[ft.annotation_key(setting, "/pod")] = value
    return key, ft.annotated_request(key, annotations, namespace), api


GENERATORS: dict[str, Callable[[random.Random, Path], Iterator[Callable[[], str]]]] = {
    "quantity": quantity_inputs, "parsers": parser_inputs, "adjust": adjust_inputs, "policy": policy_inputs,
    "proxy": proxy_inputs,
}


def run_shard(target: str, inputs: int, seed: int, deadline: float) -> Result:
    """Up to `inputs` inputs of one target (or until `deadline`, a time.time())."""
    import logging

    logging.disable(logging.CRITICAL)  # the proxy logs every refusal; only outcomes matter here
    rng = random.Random(seed)
    result = Result(target)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        generator = GENERATORS[target](rng, Path(scratch))
        try:
            for check in generator:
                if result.inputs >= inputs or time.time() > deadline:
                    break
                result.inputs += 1
                try:
                    result.outcomes[check()] += 1
                except Exception as err:  # Broken, or a bug of the checker itself: a failure either way
                    result.failure_count += 1
                    result.outcomes["FAILURE"] += 1
                    if len(result.failures) < MAX_FAILURES_SHOWN:
                        result.failures.append(str(err) if isinstance(err, ft.Broken) else repr(err))
        finally:
            generator.close()
    result.seconds = time.monotonic() - started
    return result


def report(result: Result) -> None:
    rate = result.inputs / result.seconds if result.seconds else 0.0
    print(f"\n== {result.target}: {result.inputs:,} inputs in {result.seconds:.0f} s ({rate:,.0f}/s); "
          f"failures: {result.failure_count}")
    for label, count in sorted(result.outcomes.items(), key=lambda item: (-item[1], item[0])):
        print(f"   {count:>9,}  {label}")
    for failure in result.failures:
        print("   FAILURE " + failure.replace("\n", "\n           "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs per target (default 100,000)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop every target after this long")
    parser.add_argument("--target", action="append", choices=TARGETS, help="only these targets (repeatable)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (each shard derives its own)")
    args = parser.parse_args(argv)
    targets = args.target or list(TARGETS)
    deadline = time.time() + args.max_seconds
    shards = [(t, args.inputs // SHARDS.get(t, 1) + (i < args.inputs % SHARDS.get(t, 1)), args.seed * 1000 + i)
              for t in targets for i in range(SHARDS.get(t, 1))]
    shards.sort(key=lambda s: s[0] != "policy")  # the slowest first
    print(f"fuzzing {', '.join(targets)}: {args.inputs:,} inputs per target, {args.jobs} process(es), "
          f"at most {args.max_seconds:.0f} s, seed {args.seed}", flush=True)
    started = time.monotonic()
    results = {t: Result(t) for t in targets}
    context = multiprocessing.get_context("spawn")  # gRPC does not survive fork
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = [pool.submit(run_shard, t, n, seed, deadline) for t, n, seed in shards]
        for future in futures:
            shard = future.result()
            results[shard.target].merge(shard)
    for target in targets:
        report(results[target])
    failures = sum(r.failure_count for r in results.values())
    print(f"\ntotal: {sum(r.inputs for r in results.values()):,} inputs in {time.monotonic() - started:.0f} s, "
          f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
