"""`criproxy demo`: a private containerd, criproxy in front of it, and pods whose annotations the
proxy applies or denies, shown as a user wants to read it (criproxy.demo.run).

The machinery is shared with the end-to-end tests: the private containerd (containerd, host),
locally built OCI images (ociimage, pause.c), a CRI client (cri) and `criproxy serve` as a child
process (proxyproc). This module stays light (the command line imports it to build its parser).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_WORKDIR = Path("/run/criproxy-demo")

HELP = "see criproxy work here: a private containerd, the proxy in front of it, two pods (as root)"
DESCRIPTION = """\
Show criproxy working on this machine (where `bash scripts/install` ran), in five steps:
  1. start a private containerd with everything under --workdir (unless --runtime-endpoint),
  2. build the pause and busybox images here (no registry) and import them,
  3. start `criproxy serve` in front of it with the repository's policies.yaml and metrics on,
  4. run a pod whose annotations change its runtime handler, seccomp profile and memory limit,
     show what the runtime runs, and a pod whose annotation the policy denies,
  5. keep serving, for crictl, until Ctrl-C or SIGTERM (--once: exit after step 4).
On exit it removes every pod, mount, process and file it made. Exit status: 0 done, 1 a step
failed (it says what, quoting the runtime's or the proxy's log), 2 refused (not root, or another
demo runs in --workdir), 130 or 143 when stopped before step 5.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="run steps 1 to 4, clean up and exit (for CI)")
    parser.add_argument("--runtime-endpoint", metavar="URL",
                        help="use this running containerd (unix:///run/containerd/containerd.sock) instead of a "
                        "private one; only the demo's own pods and image are removed from it")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, metavar="DIR",
                        help=f"the demo's private directory, removed at exit (default {DEFAULT_WORKDIR})")
    parser.add_argument("--policies", type=Path, metavar="FILE",
                        help="policy file for the proxy (default: the repository's policies.yaml)")


def main(args: argparse.Namespace) -> int:
    from criproxy.demo.run import Options, run_demo

    return run_demo(Options(workdir=args.workdir, runtime_endpoint=args.runtime_endpoint, policies=args.policies,
                            once=args.once))
