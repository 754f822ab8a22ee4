"""`criproxy demo`: criproxy working on this machine in one command, then serving for crictl.

1. a private containerd (Debian's package) under one directory, with the settings this machine
   needs (criproxy.demo.host), unless --runtime-endpoint names a running runtime;
2. the pause and busybox images, built here (no registry) and imported;
3. `criproxy serve` in front of it with the repository's policies.yaml and metrics on;
4. through the proxy, a pod whose annotations change its runtime handler, seccomp profile and
   memory limit, read back from the runtime, and a pod whose annotation policy denies, as the
   kubelet would report it; a few lines of /metrics;
5. serving until Ctrl-C or SIGTERM (--once: not at all).

Then every pod, process, mount, cgroup and file it made is removed. Each step prints its time; a
step that fails says what failed, quotes the log of the runtime or the proxy, and cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import grpc

from criproxy.api.runtime.v1 import api_pb2
from criproxy.demo import DEFAULT_WORKDIR
from criproxy.demo import pods as demo_pods
from criproxy.demo.containerd import (
    ALT_HANDLER,
    Containerd,
    ContainerdError,
    containerd_available,
    import_archive,
    remove_image_name,
    remove_pods,
)
from criproxy.demo.cri import CriClient, Service
from criproxy.demo.host import memory_limit_file, remove_cgroups
from criproxy.demo.ociimage import busybox_image
from criproxy.demo.proxyproc import ProxyProcess
from criproxy.demo.show import applied_lines, kubelet_event, metrics_excerpt, size
from criproxy.demo.workdir import Refused, WorkDir
from criproxy.policies.store import file_problem

#: The pods' cgroups live under /<this> in every hierarchy (private containerd only: it uses cgroupfs).
CGROUP_PARENT = "criproxy-demo"
PAUSE_IMAGE = "criproxy.demo/pause:1"
BUSYBOX_IMAGE = "criproxy.demo/busybox:1"
STEPS = 5
WAIT_SECONDS = 20.0
#: The repository's policies.yaml, beside the package in a source checkout (what scripts/install installs).
REPOSITORY_POLICIES = Path(__file__).resolve().parents[2] / "policies.yaml"


@dataclass(frozen=True)
class Options:
    workdir: Path = DEFAULT_WORKDIR
    runtime_endpoint: str | None = None
    policies: Path | None = None
    once: bool = False


class StepFailed(Exception):
    """A step could not be done: what failed, and the logs that say why (title, tail)."""

    def __init__(self, what: str, *logs: tuple[str, str]) -> None:
        super().__init__(what)
        self.what = what
        self.logs = logs


class Stop(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _socket_path(endpoint: str) -> Path:
    return Path(endpoint.removeprefix("unix://"))


def _endpoint(value: str) -> str:
    return value if value.startswith("unix://") else f"unix://{value}"


def run_demo(options: Options, out: TextIO | None = None) -> int:
    """Run the demo; the exit status: 0 done, 1 a step failed, 2 refused, 130/143 stopped before the end."""
    stream = out if out is not None else sys.stdout
    if os.geteuid() != 0:
        print("criproxy demo: it runs containerd and runc, which need root: run it as root (sudo criproxy demo)",
              file=sys.stderr)
        return 2
    try:
        workdir = WorkDir.claim(options.workdir)
    except Refused as refusal:
        print(f"criproxy demo: refused: {refusal}", file=sys.stderr)
        return 2
    demo = Demo(options, workdir, stream)
    status = 1
    with _signals(_raise_stop):
        try:
            status = demo.run()
        except StepFailed:
            status = 1
        except Stop as stop:
            demo.say(f"\n{stop.signame}: stopping before the demo was done", indent=0)
            status = 143 if stop.signame == "SIGTERM" else 130
        finally:
            with _signals(lambda signum, frame: demo.say("still cleaning up; a moment", indent=0)):
                if not demo.cleanup():
                    status = status or 1
    return status


class Demo:
    def __init__(self, options: Options, workdir: WorkDir, out: TextIO) -> None:
        self.options = options
        self.dir = workdir
        self.out = out
        self.containerd: Containerd | None = None
        self.endpoint = _endpoint(options.runtime_endpoint) if options.runtime_endpoint else ""
        self.proxy: ProxyProcess | None = None
        self.metrics_url = ""
        self.pods: list[str] = []
        self.imported: list[str] = []
        self.busybox = BUSYBOX_IMAGE
        self.alt_handler: str | None = None
        self.sandbox_image = ""
        self.web_pod_id = ""

    # -- output --------------------------------------------------------------------------------

    def say(self, text: str = "", indent: int = 6) -> None:
        # A terminal that went away (SIGHUP) must not stop the cleanup: output is best effort.
        with contextlib.suppress(OSError, ValueError):
            for line in text.splitlines() or [""]:
                print(" " * indent + line if line else "", file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, number: int, title: str) -> Iterator[None]:
        self.say(f"[{number}/{STEPS}] {title}", indent=0)
        started = time.monotonic()
        try:
            yield
        except Exception as error:  # what failed is said here, whatever it was; Stop passes through
            failure = error if isinstance(error, StepFailed) else StepFailed(
                f"{type(error).__name__}: {error}", *self._logs())
            self.say(f"FAILED after {time.monotonic() - started:.1f} s: {failure.what}")
            for name, tail in failure.logs:
                self.say(f"{name}:")
                self.say(tail, indent=8)
            with contextlib.suppress(OSError, ValueError):
                print(f"criproxy demo: step {number} failed: {failure.what.splitlines()[0]}", file=sys.stderr)
            if failure is error:
                raise
            raise failure from error
        self.say(f"ok ({time.monotonic() - started:.1f} s)")

    # -- the steps -----------------------------------------------------------------------------

    def run(self) -> int:
        where = self.dir.path
        self.say(f"criproxy demo: everything it makes is under {where}, and removed when it ends", indent=0)
        leftovers = self.dir.leftovers()
        if leftovers:
            self.say(f"an earlier demo left {', '.join(leftovers)} in {where}: cleaning that up first", indent=0)
            for line in self.dir.clean_leftovers():
                self.say(line)
            remove_cgroups(CGROUP_PARENT)
        with self.step(1, "A private containerd" if not self.endpoint else f"The runtime at {self.endpoint}"):
            self.start_runtime()
        with self.step(2, "The pause and busybox images, built here (no registry), imported"):
            self.images()
        policies = "the repository's policies.yaml" if self.options.policies is None else str(self.options.policies)
        with self.step(3, f"criproxy serve in front of it: {policies}, metrics on"):
            self.start_proxy()
        with self.step(4, "Two pods through the proxy"):
            self.run_pods()
        if self.options.once:
            self.say(f"[5/{STEPS}] Serving: skipped (--once)", indent=0)
            return 0
        with self.step(5, "Serving until Ctrl-C or SIGTERM"):
            try:
                self.serve()
            except Stop as stop:
                self.say(f"{stop.signame}: stopping")
        return 0

    def start_runtime(self) -> None:
        if self.endpoint:
            self._use_runtime()
            return
        problem = containerd_available()
        if problem is not None:
            raise StepFailed(problem)
        containerd = Containerd(self.dir.path / "containerd", pause_image=PAUSE_IMAGE, busybox_image=BUSYBOX_IMAGE)
        self.containerd = containerd
        self.endpoint = containerd.endpoint
        try:
            containerd.prepare()
            assert containerd.settings is not None
            self.say(f"settings for this machine: cgroupfs (no systemd needed); {containerd.settings.snapshotter} "
                     "snapshotter; handlers runc (default) and runc-alt; host network (no CNI)")
            for reason in containerd.settings.reasons:
                self.say(f"  {reason}")
            containerd.launch()
        except (ContainerdError, OSError) as error:
            raise StepFailed(str(error).split("\ncontainerd log:")[0],
                             ("containerd log", containerd.log_tail())) from None
        self.alt_handler = ALT_HANDLER
        with CriClient(self.endpoint) as client:
            version = client.call("RuntimeService", "Version", api_pb2.VersionRequest(), timeout=10)
        assert isinstance(version, api_pb2.VersionResponse)
        self.say(f"{version.runtime_name} {version.runtime_version} (CRI {version.runtime_api_version}) "
                 f"on {self.endpoint}, pid {containerd.pid}; config {containerd.config_path}")

    def _use_runtime(self) -> None:
        try:
            with CriClient(self.endpoint) as client:
                version = client.call("RuntimeService", "Version", api_pb2.VersionRequest(), timeout=10)
                status = client.call("RuntimeService", "Status", api_pb2.StatusRequest(verbose=True), timeout=10)
        except grpc.RpcError as error:
            raise StepFailed(f"nothing answers CRI calls on {self.endpoint} (is the runtime running?): "
                             f"{error.code().name}: {error.details()}") from None
        assert isinstance(version, api_pb2.VersionResponse) and isinstance(status, api_pb2.StatusResponse)
        handlers = sorted({h.name for h in status.runtime_handlers if h.name})
        config = _json(status.info.get("config", "{}"))
        if not handlers:
            handlers = sorted(config.get("containerd", {}).get("runtimes", {}))
        self.sandbox_image = str(config.get("sandboxImage", ""))
        self.alt_handler = ALT_HANDLER if ALT_HANDLER in handlers else None
        self.say(f"{version.runtime_name} {version.runtime_version} (CRI {version.runtime_api_version}); "
                 f"handlers: {', '.join(handlers) or 'not reported'}")
        if self.alt_handler is None:
            self.say(f"it has no handler {ALT_HANDLER}: the demo pod keeps the runtime's default handler")

    def images(self) -> None:
        images = self.dir.path / "images"
        if self.containerd is not None:
            try:
                archives = self.containerd.build_images()
                for archive in archives:
                    self.say(f"{archive.ref}  {archive.config_digest[:19]}  ({archive.path.stat().st_size} bytes)")
                self.containerd.import_images(archives)
            except (ContainerdError, RuntimeError, OSError) as error:
                raise StepFailed(str(error).split("\ncontainerd log:")[0],
                                 ("containerd log", self.containerd.log_tail())) from None
            return
        with CriClient(self.endpoint) as client:
            if self.sandbox_image and not _has_image(client, self.sandbox_image):
                raise StepFailed(f"the runtime's sandbox image {self.sandbox_image} is not there, and the demo uses "
                                 f"no registry: pull it first (crictl pull {self.sandbox_image})")
            self.say(f"pod sandboxes use the runtime's own image {self.sandbox_image or '(not reported)'}")
            if _has_image(client, self.busybox):
                self.say(f"{self.busybox} is there already")
                return
            try:
                archive = busybox_image(images / "busybox.tar", self.busybox)
            except (RuntimeError, OSError) as error:
                raise StepFailed(str(error)) from None
            if shutil.which("ctr") is None:
                raise StepFailed("importing an image needs ctr, containerd's client (Debian package containerd)")
            problem = import_archive(_socket_path(self.endpoint), archive.path, 60)
            if problem is not None:
                raise StepFailed(f"{problem}\n(importing works with containerd only)")
            self.imported.append(self.busybox)
            self.say(f"{archive.ref}  {archive.config_digest[:19]}  imported")

    def start_proxy(self) -> None:
        policies = self.options.policies or REPOSITORY_POLICIES
        if not policies.is_file():
            raise StepFailed(f"no policy file at {policies}; pass --policies FILE (the repository's policies.yaml)")
        refused = file_problem(policies)
        if refused is not None:
            private = self.dir.path / "policies.yaml"
            shutil.copyfile(policies, private)
            private.chmod(0o600)
            self.say(f"criproxy serve would refuse {policies} ({refused}); using a private copy")
            policies = private
        log = self.dir.path / "criproxy.log"
        proxy = ProxyProcess(self.dir.path / "criproxy.sock", "--runtime-endpoint", self.endpoint,
                             "--image-endpoint", self.endpoint, "--policies", str(policies),
                             "--decision-log", str(self.dir.path / "decisions.log"), log=log)
        self.proxy = proxy
        self.say("criproxy " + " ".join(proxy.command[proxy.command.index("serve"):]))
        try:
            proxy.start()
            self.metrics_url = proxy.metrics_url()
            identity = proxy.policy_identity()
        except AssertionError as error:
            raise StepFailed(f"criproxy did not start: {str(error).splitlines()[0]}",
                             ("criproxy log", proxy.log_tail())) from None
        assert proxy.proc is not None
        self.say(f"serving {proxy.endpoint} (pid {proxy.proc.pid}); policy {identity}; metrics {self.metrics_url}")

    def run_pods(self) -> None:
        web, report = demo_pods.demo_pods()
        if self.alt_handler is None:
            web.metadata = {**web.metadata, "annotations": {
                k: v for k, v in web.metadata["annotations"].items() if not k.startswith("runtime-handler.")}}
        cgroup_parent = f"/{CGROUP_PARENT}" if self.containerd is not None else ""
        assert self.proxy is not None
        with CriClient(self.proxy.endpoint) as kubelet, CriClient(self.endpoint) as runtime:
            try:
                self._adjusted_pod(kubelet, runtime, demo_pods.plan(
                    web, image=self.busybox, log_root=self.dir.path / "pods", cgroup_parent=cgroup_parent))
                self._denied_pod(kubelet, runtime, demo_pods.plan(
                    report, image=self.busybox, log_root=self.dir.path / "pods", cgroup_parent=cgroup_parent))
            except grpc.RpcError as error:
                raise StepFailed(f"{error.code().name}: {error.details()}", *self._logs()) from None
        self._metrics()

    def _logs(self) -> list[tuple[str, str]]:
        logs = []
        if self.containerd is not None:
            logs.append(("containerd log", self.containerd.log_tail(20)))
        if self.proxy is not None:
            logs.append(("criproxy log", self.proxy.log_tail(20)))
        return logs

    def _adjusted_pod(self, kubelet: CriClient, runtime: CriClient, plan: demo_pods.PodPlan) -> None:
        self.say(f"pod {plan.who}, annotated:")
        for key, value in plan.pod.metadata.get("annotations", {}).items():
            self.say(f"  {key}: {value}")
        pod_id = _call(kubelet, "RunPodSandbox", plan.sandbox, 60).pod_sandbox_id
        self.pods.append(pod_id)
        self.web_pod_id = pod_id
        containers = []
        for create in plan.containers:
            create.pod_sandbox_id = pod_id
            create.sandbox_config.CopyFrom(plan.sandbox.config)
            container_id = _call(kubelet, "CreateContainer", create).container_id
            _call(kubelet, "StartContainer", api_pb2.StartContainerRequest(container_id=container_id))
            containers.append((create, container_id))
        sandbox = _call(runtime, "PodSandboxStatus", api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id,
                                                                                    verbose=True))
        self.say(f"running as sandbox {pod_id[:13]}; criproxy.io/applied on the sandbox:")
        for line in applied_lines(demo_pods.applied(sandbox.status.annotations)) or ["(nothing)"]:
            self.say(f"  {line}")
        proof = [f"sandbox: runtime handler {sandbox.status.runtime_handler or '(the default)'} "
                 "(PodSandboxStatus)" + self._runc_state(sandbox.status.runtime_handler, pod_id)]
        for create, container_id in containers:
            name = create.config.metadata.name
            info = self._running(runtime, container_id)
            status = _call(runtime, "ContainerStatus", api_pb2.ContainerStatusRequest(container_id=container_id))
            self.say(f"criproxy.io/applied on container {name}:")
            for line in applied_lines(demo_pods.applied(status.status.annotations)) or ["(nothing)"]:
                self.say(f"  {line}")
            proof += self._container_proof(name, create, info)
        self.say("what the runtime says it runs:")
        for line in proof:
            self.say(f"  {line}")

    def _runc_state(self, handler: str, pod_id: str) -> str:
        if self.containerd is None or not handler:
            return ""
        root = self.containerd.runc_root(handler)
        return f"; runc keeps its state under that handler's root, {root}" if (root / "k8s.io" / pod_id).is_dir() \
            else ""

    def _running(self, runtime: CriClient, container_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_SECONDS
        request = api_pb2.ContainerStatusRequest(container_id=container_id, verbose=True)
        while True:
            response = _call(runtime, "ContainerStatus", request)
            if response.status.state == api_pb2.CONTAINER_RUNNING:
                return _json(response.info.get("info", "{}"))
            if response.status.state == api_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
                state = api_pb2.ContainerState.Name(response.status.state)
                raise StepFailed(f"container {container_id[:13]} is {state}, not running ({response.status.reason} "
                                 f"{response.status.message})".rstrip(), *self._logs())
            time.sleep(0.1)

    def _container_proof(self, name: str, create: api_pb2.CreateContainerRequest, info: dict[str, Any]) -> list[str]:
        spec = info.get("runtimeSpec", {}).get("linux", {})
        asked = create.config.linux.resources.memory_limit_in_bytes
        limit = spec.get("resources", {}).get("memory", {}).get("limit")
        lines = [f"container {name}: OCI spec linux.resources.memory.limit = {size(limit)}; the kubelet asked for "
                 f"{size(asked)}"]
        pid = int(info.get("pid", 0))
        limit_file = memory_limit_file(pid) if pid else None
        try:
            value = limit_file.read_text().strip() if limit_file is not None else None
        except OSError:
            value = None
        if limit_file is not None and value is not None:
            lines.append(f"container {name}: cgroup {limit_file} = {size(int(value)) if value.isdigit() else value}")
        else:
            lines.append(f"container {name}: its cgroup's memory limit is unreadable here (pid {pid})")
        seccomp = spec.get("seccomp", {}).get("defaultAction", "none (unconfined)")
        mode = _proc_status(pid, "Seccomp")
        meaning = {"0": "disabled", "1": "strict", "2": "filter"}.get(mode, "unknown")
        lines.append(f"container {name}: OCI spec linux.seccomp.defaultAction = {seccomp}; /proc/{pid}/status "
                     f"Seccomp: {mode} ({meaning})")
        return lines

    def _denied_pod(self, kubelet: CriClient, runtime: CriClient, plan: demo_pods.PodPlan) -> None:
        annotations = ", ".join(f"{k}: {v}" for k, v in plan.pod.metadata.get("annotations", {}).items())
        self.say(f"pod {plan.who}, annotated {annotations}:")
        try:
            pod_id = _call(kubelet, "RunPodSandbox", plan.sandbox, 60).pod_sandbox_id
        except grpc.RpcError as error:
            self.say("denied; the pod's events (kubectl describe pod) would show:")
            self.say(kubelet_event("RunPodSandbox", error.code(), error.details() or ""), indent=8)
        else:
            self.pods.append(pod_id)
            raise StepFailed(f"pod {plan.who} was not denied (sandbox {pod_id}): is this the repository's "
                             "policies.yaml?")
        listed = _call(runtime, "ListPodSandbox", api_pb2.ListPodSandboxRequest()).items
        names = {(p.metadata.namespace, p.metadata.name) for p in listed}
        if (plan.pod.namespace, plan.pod.name) in names:
            raise StepFailed(f"the runtime has a pod {plan.who}, which the proxy denied")
        self.say(f"the runtime never saw it: its ListPodSandbox has no pod {plan.who}")

    def _metrics(self) -> None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                text = response.read().decode()
        except OSError as error:
            raise StepFailed(f"GET {self.metrics_url}: {error}", *self._logs()) from None
        self.say(f"{self.metrics_url} (a few lines):")
        for line in metrics_excerpt(text):
            self.say(f"  {line}")

    def serve(self) -> None:
        assert self.proxy is not None
        socket = self.proxy.endpoint
        crictl = f"crictl --runtime-endpoint {socket} --image-endpoint {socket}"
        self.say(f"criproxy serves {socket}; try, in another terminal:")
        self.say(f"  {crictl} pods")
        self.say(f"  {crictl} inspectp {self.web_pod_id[:13]}    # its criproxy.io/applied annotation")
        self.say(f"  curl -s {self.metrics_url}")
        self.say(f"logs: {self.proxy.log} (criproxy), {self.dir.path / 'decisions.log'} (decisions)"
                 + (f", {self.containerd.log_path} (containerd)" if self.containerd is not None else ""))
        self.say("Ctrl-C (or SIGTERM) stops it and removes everything it made")
        while True:  # until a signal (Stop); a process that dies ends it too
            time.sleep(0.5)
            if not self.proxy.running():
                raise StepFailed(f"criproxy exited with status {self.proxy.stop()}", *self._logs())
            if self.containerd is not None and not self.containerd.running():
                raise StepFailed("containerd exited", *self._logs())

    # -- the end -------------------------------------------------------------------------------

    def cleanup(self) -> bool:
        """Remove every pod, process, mount, cgroup and file the demo made; True when all went."""
        started = time.monotonic()
        problems: list[str] = []
        done: list[str] = []
        if self.endpoint and (self.pods or self.imported):
            with CriClient(self.endpoint) as runtime:
                problems += remove_pods(runtime, self.pods, timeout=30)
            for image in self.imported:
                problem = remove_image_name(_socket_path(self.endpoint), image, 30)
                problems += [problem] if problem is not None else []
            done.append(f"removed {len(self.pods)} pod{'s' if len(self.pods) != 1 else ''}"
                        + (f" and image {', '.join(self.imported)}" if self.imported else ""))
        if self.proxy is not None:
            code = self.proxy.stop()
            if code not in (0, None):
                problems.append(f"criproxy exited with status {code}; its log: {self.proxy.log_tail(10)}")
            done.append("stopped criproxy")
        if self.containerd is not None:
            try:
                self.containerd.stop()
            except ContainerdError as error:
                problems.append(str(error))
            problems += remove_cgroups(CGROUP_PARENT)
            done.append("stopped containerd")
        problems += self.dir.release()
        done.append(f"removed {self.dir.path}")
        elapsed = time.monotonic() - started
        if problems:
            self.say(f"Cleaning up did not go cleanly ({elapsed:.1f} s):", indent=0)
            for problem in problems:
                self.say(problem)
            return False
        self.say(f"Cleaned up: {', '.join(done)} ({elapsed:.1f} s)", indent=0)
        return True


def _call(client: CriClient, method: str, request: Any, timeout: float = 30.0,
          service: Service = "RuntimeService") -> Any:
    """A CRI call whose response type depends on ``method``, hence Any."""
    return client.call(service, method, request, timeout=timeout)


def _has_image(client: CriClient, ref: str) -> bool:
    response = _call(client, "ImageStatus", api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)),
                     service="ImageService")
    return bool(response.HasField("image"))


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _proc_status(pid: int, field: str) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"
