"""Run by criproxy.service itself (ExecStartPre= in a test-only drop-in), so inside the unit's
sandbox: tries what the sandbox must allow and what it must refuse, and prints one line,
`criproxy-sandbox-probe: {JSON}`, to the unit's journal. It never fails the unit.

Usage: sandbox-probe.py TOKEN   (TOKEN names the files it writes, so the test can look for them)
"""

import ctypes
import errno
import json
import os
import socket
import sys

TOKEN = sys.argv[1]
CLONE_NEWUSER = 0x10000000
PTRACE_TRACEME = 0
SYS_PTRACE = {"x86_64": 101, "aarch64": 117}[os.uname().machine]


def attempt(action):
    """'ok', or the errno name the attempt failed with."""
    try:
        action()
    except OSError as error:
        return errno.errorcode.get(error.errno or 0, str(error))
    return "ok"


def write(path):
    def action():
        with open(path, "w") as out:
            out.write("probe\n")
    return attempt(action)


def libc_call(function, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, function)(*args) != 0:
        return errno.errorcode.get(ctypes.get_errno(), "?")
    return "ok"


def traceme():
    """ptrace(PTRACE_TRACEME) in a child: needs no capability, only a syscall filter refuses it."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        status = 0 if libc.syscall(SYS_PTRACE, PTRACE_TRACEME, 0, 0, 0) == 0 else ctypes.get_errno() or 255
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


def sock(family, kind=socket.SOCK_STREAM):
    def action():
        socket.socket(family, kind).close()
    return attempt(action)


def connect_runtime():
    def action():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect("/run/containerd/containerd.sock")
    return attempt(action)


def status():
    fields = {}
    with open("/proc/self/status") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return {key: fields.get(key) for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}


def umask_of_new_file():
    path = f"/var/log/criproxy/.probe-{TOKEN}"
    with open(path, "w"):
        pass
    mode = oct(os.stat(path).st_mode & 0o777)
    os.unlink(path)
    return mode


results = {
    "write": {path: write(path) for path in (
        f"/etc/criproxy/probe-{TOKEN}", f"/opt/criproxy/probe-{TOKEN}", f"/usr/local/bin/probe-{TOKEN}",
        f"/var/lib/probe-{TOKEN}", f"/run/probe-{TOKEN}", f"/root/probe-{TOKEN}", f"/srv/probe-{TOKEN}",
        f"/sys/fs/cgroup/probe-{TOKEN}", f"/run/criproxy/probe-{TOKEN}", f"/var/log/criproxy/probe-{TOKEN}",
        f"/tmp/probe-{TOKEN}")},
    "new_file_mode": umask_of_new_file(),
    "status": status(),
    "unshare_user": libc_call("unshare", CLONE_NEWUSER),
    "ptrace_traceme": traceme(),
    "socket": {"AF_UNIX": sock(socket.AF_UNIX), "AF_INET": sock(socket.AF_INET),
               "AF_NETLINK": sock(socket.AF_NETLINK, socket.SOCK_RAW),
               "AF_PACKET": sock(socket.AF_PACKET, socket.SOCK_RAW)},
    "connect_runtime": connect_runtime(),
    "dev": sorted(os.listdir("/dev")),
    "kmsg": attempt(lambda: open("/dev/kmsg").close()),
}
for path in (f"/run/criproxy/probe-{TOKEN}", f"/var/log/criproxy/probe-{TOKEN}", f"/tmp/probe-{TOKEN}"):
    if results["write"][path] == "ok" and not path.startswith("/tmp/"):
        os.unlink(path)
print("criproxy-sandbox-probe: " + json.dumps(results, sort_keys=True), flush=True)
