"""The `criproxy` command line."""

from __future__ import annotations

import os

# Before grpc is first imported: the older polling engine answers a unix-socket call ~30% faster
# on these nodes than the event engine (bench/forwarding.py measures it). An operator's own
# GRPC_EXPERIMENTS setting wins.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from criproxy import __version__
from criproxy import demo as demo_cli
from criproxy.config import SETTINGS, build_config
from criproxy.errors import ConfigError
from criproxy.observe.logqueue import DEFAULT_CAPACITY, BackgroundLog

DESCRIPTION = """\
criproxy sits between the kubelet and the container runtime (containerd, CRI-O) on the
node's CRI socket. It forwards every CRI call unchanged, except where an interceptor,
allowed by policy, adjusts what the runtime is asked to do.
"""

SERVE_EPILOG = """\
Point the kubelet at the --listen socket (KubeletConfiguration containerRuntimeEndpoint and
imageServiceEndpoint, or --container-runtime-endpoint). Every flag can also be set in the
--config YAML file under the same name without the dashes' prefix, e.g.

  runtime-endpoint: unix:///run/containerd/containerd.sock
  max-message-bytes: 16Mi

Flags override the file. Exit status: 0 after a clean stop, 2 on a configuration error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="criproxy", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"criproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help=demo_cli.HELP, description=demo_cli.DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    demo_cli.add_arguments(demo)
    serve = commands.add_parser("serve", help="run the proxy", description=DESCRIPTION, epilog=SERVE_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for setting in SETTINGS:
        serve.add_argument(setting.flag, dest=setting.attr, metavar=setting.metavar, help=setting.help)
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML file with any of the settings above")
    serve.add_argument("--takeover", action="store_true",
                       help="replace the criproxy serving on --listen without refusing a connection: bind beside "
                       "it, rename over its socket; the old process drains its calls and exits (an upgrade)")

    policy = commands.add_parser("policy", help="work with policy files")
    policy_commands = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)
    check = policy_commands.add_parser(
        "check", help="check policy files", description="Check policy files as `criproxy serve` checks them: "
        "their content, and the file itself (after symlinks: owned by root or by the user running the check, "
        "writable by nobody else). Exit status 0 when every file is valid, 1 when any is not (every problem listed "
        "as file:line: key: why). With --config, notes what the config's settings do under each policy.")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--config", type=Path, metavar="FILE",
                       help="criproxy config file (seccomp.legacy-annotations puts more pods under the policy)")

    explain = commands.add_parser(
        "explain", help="show what the proxy would do to the pods of a manifest",
        description="Show, per pod and container of a Kubernetes manifest (Pod, Deployment, StatefulSet, "
        "DaemonSet, ReplicaSet, Job, CronJob, or a List of them), the adjustments and denials criproxy would "
        "apply, and the rule responsible. A multi-document stream (kubectl kustomize, helm template) may hold "
        "other kinds too (Service, ConfigMap, ...): they are listed as skipped. Exit status 0 when every call "
        "would be allowed, 1 when any would be denied or fail, 2 on bad input (or no pod at all).",
        epilog="Example: criproxy explain --policies policies.yaml docs/examples/criproxy-demo.yaml")
    explain.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST")
    explain.add_argument("--policies", type=Path, metavar="FILE", help="policy file (default: none, allow all)")
    explain.add_argument("--config", type=Path, metavar="FILE", help="criproxy config file (interceptors)")
    explain.add_argument("--namespace", "-n", default="default", help="namespace of objects that name none")
    explain.add_argument("--output", "-o", choices=("text", "json"), default="text")

    replay = commands.add_parser(
        "replay", help="show what a policy would change for the calls recorded on the nodes",
        description="Decide every call of the recordings (criproxy serve --record) again under the policy, with the "
        "pipeline's own code, and show per pod what would change compared with what was decided when it was "
        "recorded (or under --baseline): newly denied, no longer denied, denied differently, adjusted differently "
        "(field, before, after), flagged differently, each with its rule; then a summary. Exit status 0 when no "
        "call would newly be denied, 1 when one would (a CI gate), 2 on bad input (naming the file and line).",
        epilog="Example: criproxy replay --policies new/policies.yaml --config criproxy.yaml 'recordings/*.jsonl*'")
    replay.add_argument("recordings", nargs="+", metavar="RECORDING",
                        help="a recording file (gzip read as such), a glob, or - for stdin")
    replay.add_argument("--policies", type=Path, metavar="FILE", required=True, help="the policy to replay under")
    replay.add_argument("--baseline", type=Path, metavar="FILE",
                        help="compare with this policy's verdicts instead of the recorded decisions")
    replay.add_argument("--config", type=Path, metavar="FILE",
                        help="the nodes' criproxy config file (interceptors, annotation domain)")
    replay.add_argument("--jobs", "-j", type=int, metavar="N", help="processes (default: every core)")
    replay.add_argument("--output", "-o", choices=("text", "json"), default="text")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from criproxy.server import serve

    flags = {s.key: getattr(args, s.attr) for s in SETTINGS}
    config = replace(build_config(flags, args.config), takeover=args.takeover)
    main_log = start_process(config.log_level)
    try:
        asyncio.run(serve(config))
    finally:
        main_log.stop()  # write out what was logged before the stop
    return 0


def start_process(log_level: str) -> BackgroundLog:
    """What `criproxy serve` sets up for the whole process, in the order it needs: glibc malloc tuning
    (criproxy/transport/tuning.py) while this is the only thread, then the main log, whose writer is a
    thread of its own."""
    from criproxy.transport.tuning import tune_process

    tuned = tune_process()
    main_log = configure_logging(log_level)
    logging.getLogger("criproxy.transport.tuning").debug("%s", tuned)
    return main_log


def configure_logging(level: str, *, stream: TextIO | None = None,
                      capacity: int = DEFAULT_CAPACITY) -> BackgroundLog:
    """The main log of `criproxy serve`: lines go to stderr from a background thread (criproxy.observe.logqueue),
    so a stalled stderr never stalls a call; past `capacity` waiting lines, lines are dropped and counted."""
    destination = logging.StreamHandler(sys.stderr if stream is None else stream)
    destination.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    background = BackgroundLog("main", destination, capacity=capacity)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(background.handler)
    return background


def _policy_check(args: argparse.Namespace) -> int:
    from criproxy.interceptors.seccomp import LEGACY_CONTAINER, LEGACY_POD, SETTING, SeccompConfig
    from criproxy.policies.model import check_policy, parse_policy
    from criproxy.policies.store import file_problem

    # The enabled seccomp interceptor's settings say it: no interceptor needs to be built for that.
    legacy = args.config is not None and any(isinstance(s.settings, SeccompConfig) and s.settings.legacy_annotations
                                             for s in build_config({}, args.config).interceptors)
    failed = False
    for path in args.files:
        try:
            text = path.read_bytes()
        except OSError as err:
            problems = [f"{path}: cannot read it: {err.strerror}"]
        else:
            refused = file_problem(path)  # what serve checks of the file itself, before its content
            problems = [f"{path}: criproxy serve would refuse it: {refused}"] if refused is not None else []
            problems += [str(p) for p in check_policy(text, str(path))]
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{path}: {'invalid, ' + str(len(problems)) + ' problem(s)' if problems else 'ok'}")
        if legacy and not problems:
            where = parse_policy(text, str(path)).denied_wherever(SETTING)
            if where:
                print(f"{path}: note: seccomp.legacy-annotations is true in {args.config}: the legacy seccomp "
                      f"annotations ({LEGACY_POD}, {LEGACY_CONTAINER}<name>) count as {SETTING} annotations, so a "
                      f"pod carrying one is a violation (denied in enforce mode) {' and '.join(where)}")
        failed = failed or bool(problems)
    return 1 if failed else 0


def _explain(args: argparse.Namespace) -> int:
    from criproxy.cri.annotations import Lookup
    from criproxy.explain import explain_pod, read_manifests, render_json, render_text
    from criproxy.interceptors import build
    from criproxy.pipeline import Pipeline
    from criproxy.policies.store import load_policy

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="criproxy explain: %(message)s")
    config = build_config({}, args.config)
    lookup = Lookup(config.annotation_domain)
    pipeline = Pipeline(build(config.interceptors, lookup), lookup=lookup, on_decisions=lambda ctx, decisions: None)
    if args.policies is not None:
        pipeline.policy = load_policy(args.policies, lookup)
    manifest = read_manifests(args.manifests, args.namespace)  # kinds without pods are listed as skipped
    results = [(pod, asyncio.run(explain_pod(pod, pipeline))) for pod in manifest.pods]
    render = render_json if args.output == "json" else render_text
    sys.stdout.write(render(results, pipeline.policy.identity, manifest.skipped))
    return 1 if any(call.result != "allowed" for _, calls in results for call in calls) else 0


def _demo(args: argparse.Namespace) -> int:
    return demo_cli.main(args)


def _replay(args: argparse.Namespace) -> int:
    from criproxy.cri.annotations import Lookup
    from criproxy.policies.store import load_policy
    from criproxy.replay import NEWLY_DENIED, BadRecording, Replayer, expand, render_json, render_text, replay

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="criproxy replay: %(message)s")
    config = build_config({}, args.config)
    lookup = Lookup(config.annotation_domain)
    new = load_policy(args.policies, lookup)
    baseline = load_policy(args.baseline, lookup) if args.baseline is not None else None
    jobs = args.jobs if args.jobs is not None else len(os.sched_getaffinity(0))
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: expected at least 1")
    paths = expand(args.recordings)
    try:
        total = replay(Replayer(config, new, baseline), paths, jobs)
    except BadRecording as err:
        raise ConfigError(err.located()) from None
    render = render_json if args.output == "json" else render_text
    sys.stdout.write(render(total, new.identity, baseline.identity if baseline is not None else None))
    return 1 if total.kinds[NEWLY_DENIED] else 0


COMMANDS = {"serve": _serve, "policy": _policy_check, "explain": _explain, "demo": _demo, "replay": _replay}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"criproxy: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
