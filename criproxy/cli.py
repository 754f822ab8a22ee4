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
from pathlib import Path

from criproxy import __version__
from criproxy.config import SETTINGS, build_config
from criproxy.errors import ConfigError

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
    serve = commands.add_parser("serve", help="run the proxy", description=DESCRIPTION, epilog=SERVE_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for setting in SETTINGS:
        serve.add_argument(setting.flag, dest=setting.attr, metavar=setting.metavar, help=setting.help)
    serve.add_argument("--config", type=Path, metavar="FILE", help="YAML file with any of the settings above")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from criproxy.server import serve

    flags = {s.key: getattr(args, s.attr) for s in SETTINGS}
    config = build_config(flags, args.config)
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _serve(args)
    except ConfigError as err:
        print(f"criproxy: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
