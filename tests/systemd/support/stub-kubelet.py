"""The test kubelet: one CRI Version call on containerRuntimeEndpoint at start, recorded as a JSON
line in /srv/criproxy/out/kubelet.jsonl, then READY=1 to systemd, then idle until SIGTERM.

It runs with criproxy's virtualenv Python when criproxy is installed (for grpc); before that only
the node's python3 exists, and it records whether the endpoint accepts a connection."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

CONFIG = "/var/lib/kubelet/config.yaml"
RECORD = "/srv/criproxy/out/kubelet.jsonl"


def endpoint() -> str:
    with open(CONFIG) as stream:
        found = re.search(r"^containerRuntimeEndpoint:\s*(\S+)", stream.read(), re.M)
    return found.group(1) if found else ""


def version(target: str) -> str:
    try:
        import grpc
    except ImportError:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(target.removeprefix("unix://"))
        except OSError as error:
            return f"connect: {error}"
        return "connected"
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary("/runtime.v1.RuntimeService/Version")(b"", timeout=5)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
    return "ok"


def main() -> None:
    target = endpoint()
    started = time.monotonic()
    result = version(target)
    criproxy = subprocess.run(["systemctl", "is-active", "criproxy.service"], capture_output=True, text=True,
                              check=False).stdout.strip()
    record = {"pid": os.getpid(), "monotonic": started, "endpoint": target, "version": result,
              "criproxy": criproxy}
    with open(RECORD, "a") as out:
        out.write(json.dumps(record) + "\n")
    print(f"stub kubelet: {json.dumps(record)}", flush=True)
    notify = os.environ.get("NOTIFY_SOCKET")  # Type=notify: `systemctl (re)start kubelet` returns now
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", "\0" + notify[1:] if notify.startswith("@") else notify)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


main()
