"""Policy reloads: serialised (the newest file content wins, swapped on the event loop), only for the
policy file itself and only when its content changed, and supervised."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import criproxy.policies.store as store_module
from criproxy.cri.annotations import Lookup
from criproxy.policies.store import PolicyStore
from criproxy.server import Proxy
from tests.support.loopthread import LoopThread

HEADER = "apiVersion: criproxy.io/v1alpha1\nkind: AnnotationPolicy\n"


def version(memory: str, marker: str = "") -> str:
    return HEADER + f"""# {marker}
rules:
  - name: v
    namespaces: [demo]
    settings:
      memory-limit: {{max: {memory}}}
"""


def identity(path: Path, text: str) -> str:
    return f"{path}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Recorder:
    """The store's apply and reload listener: what was applied, and on which thread."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.loads: list[tuple[bool, str]] = []
        self.threads: set[int] = set()

    def apply(self, policy: Any) -> None:
        self.threads.add(threading.get_ident())
        self.applied.append(policy.identity)

    def listen(self, ok: bool, what: str) -> None:
        self.threads.add(threading.get_ident())
        self.loads.append((ok, what))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir()
    return directory


def make_store(loop: LoopThread, path: Path, recorder: Recorder, *, watch: bool) -> PolicyStore:
    store = PolicyStore(path, Lookup(), recorder.apply)
    store.listeners.append(recorder.listen)
    recorder.applied.clear()
    recorder.threads.clear()
    if watch:
        async def start() -> None:
            store.start_watching()
            await asyncio.sleep(0.3)  # the watch is in place

        loop.run(start())
    return store


def loop_thread(loop: LoopThread) -> int:
    async def ident() -> int:
        return threading.get_ident()

    return loop.run(ident())


# ------------------------------------------------------------------ 9. serialised, newest wins, swapped on the loop

def test_an_older_read_is_never_applied_after_a_newer_one(loop: LoopThread, policy_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = policy_dir / "policies.yaml"
    path.write_text(version("256Mi"))
    recorder = Recorder()
    store = make_store(loop, path, recorder, watch=False)
    real = store_module.parse_policy

    def slow_for_the_marked(text: bytes, file: str) -> Any:
        if b"# slow" in text:
            time.sleep(0.6)  # a large file: checking it takes a while
        return real(text, file)

    monkeypatch.setattr(store_module, "parse_policy", slow_for_the_marked)
    try:
        path.write_text(version("512Mi", "slow"))
        loop.loop.call_soon_threadsafe(store.reload_soon, "SIGHUP")
        time.sleep(0.2)  # the first reload read the file and is checking it
        newest = version("1Gi")
        path.write_text(newest)
        loop.loop.call_soon_threadsafe(store.reload_soon, "the file changed")
        wait_until(lambda: store.current.identity == identity(path, newest), "the newest version never came")
        time.sleep(0.8)  # the slow, older reload has long finished
        assert store.current.identity == identity(path, newest), "an older read was applied after the newest"
        assert recorder.applied[-1] == identity(path, newest)
        assert recorder.threads == {loop_thread(loop)}, "the policy was swapped off the event loop"
    finally:
        loop.run(store.stop())


def test_reload_requests_during_a_reload_coalesce(loop: LoopThread, policy_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = policy_dir / "policies.yaml"
    path.write_text(version("256Mi"))
    recorder = Recorder()
    store = make_store(loop, path, recorder, watch=False)
    real = store_module.parse_policy

    def slow(text: bytes, file: str) -> Any:
        time.sleep(0.3)
        return real(text, file)

    monkeypatch.setattr(store_module, "parse_policy", slow)
    try:
        for _ in range(20):
            loop.loop.call_soon_threadsafe(store.reload_soon, "SIGHUP")
        time.sleep(1.2)
        assert 1 <= len(recorder.loads) <= 2, recorder.loads
    finally:
        loop.run(store.stop())


# ------------------------------------------------------------------ 10. only the policy file, only a new content

def test_files_beside_the_policy_do_not_reload_it(loop: LoopThread, policy_dir: Path) -> None:
    path = policy_dir / "policies.yaml"
    path.write_text(version("256Mi"))
    recorder = Recorder()
    store = make_store(loop, path, recorder, watch=True)
    try:
        log = policy_dir / "criproxy.log"
        with log.open("a") as f:
            for i in range(30):
                f.write(f"line {i}\n")
                f.flush()
                time.sleep(0.03)
        (policy_dir / "policies.yaml.swp").write_text("editor state")
        time.sleep(0.8)
        assert recorder.loads == [], "a write beside the policy reloaded it"
        assert store.watch_events["ignored"] >= 1 and store.watch_events["reloaded"] == 0
    finally:
        loop.run(store.stop())


def test_the_same_content_again_is_not_a_reload(loop: LoopThread, policy_dir: Path) -> None:
    path = policy_dir / "policies.yaml"
    text = version("256Mi")
    path.write_text(text)
    recorder = Recorder()
    store = make_store(loop, path, recorder, watch=True)
    try:
        for _ in range(3):
            aside = policy_dir / "policies.new"
            aside.write_text(text)
            os.rename(aside, path)
            path.touch()
            time.sleep(0.4)
        assert recorder.loads == [], "rewriting the same content reloaded the policy"
        assert store.watch_events["unchanged"] >= 1
        path.write_text(version("1Gi"))
        wait_until(lambda: store.generation == 2, "a new content was not reloaded")
        assert recorder.loads == [(True, identity(path, version("1Gi")))]
        assert store.watch_events["reloaded"] == 1
    finally:
        loop.run(store.stop())


def configmap_version(directory: Path, name: str, text: str) -> None:
    """Lay a new ConfigMap version as the kubelet does: a timestamped directory, then `..data` swapped
    to it by a rename, then the old directory removed."""
    (directory / name).mkdir()
    (directory / name / "policies.yaml").write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    os.symlink(name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    if old is not None:
        (directory / old / "policies.yaml").unlink()
        (directory / old).rmdir()


def test_a_configmap_update_reloads_through_its_symlinks(loop: LoopThread, policy_dir: Path) -> None:
    configmap_version(policy_dir, "..2026_01_01_00_00_00.1", version("256Mi"))
    os.symlink("..data/policies.yaml", policy_dir / "policies.yaml")
    path = policy_dir / "policies.yaml"
    recorder = Recorder()
    store = make_store(loop, path, recorder, watch=True)
    try:
        (policy_dir / "unrelated.log").write_text("noise")
        time.sleep(0.5)
        assert recorder.loads == []
        configmap_version(policy_dir, "..2026_01_01_00_01_00.2", version("1Gi"))
        wait_until(lambda: store.generation == 2, "the ConfigMap update was not reloaded")
        assert store.current.policies.digest == hashlib.sha256(version("1Gi").encode()).hexdigest()[:16]
        configmap_version(policy_dir, "..2026_01_01_00_02_00.3", version("2Gi"))
        wait_until(lambda: store.generation == 3, "the second ConfigMap update was not reloaded")
    finally:
        loop.run(store.stop())


def test_a_policy_linked_from_another_directory_reloads_when_its_target_changes(
        loop: LoopThread, policy_dir: Path, tmp_path: Path) -> None:
    # /etc/criproxy/policies.yaml -> /srv/policies/prod.yaml: the target is edited where it lives.
    elsewhere = tmp_path / "srv" / "policies"
    elsewhere.mkdir(parents=True)
    target = elsewhere / "prod.yaml"
    target.write_text(version("256Mi"))
    os.symlink(target, policy_dir / "policies.yaml")
    recorder = Recorder()
    store = make_store(loop, policy_dir / "policies.yaml", recorder, watch=True)
    try:
        (elsewhere / "notes.txt").write_text("noise beside the target")
        time.sleep(0.5)
        assert store.generation == 1
        target.write_text(version("1Gi"))
        wait_until(lambda: store.generation == 2, "an edit of the symlink's target was not reloaded")
        assert store.current.policies.digest == hashlib.sha256(version("1Gi").encode()).hexdigest()[:16]
        # Relinked to a third directory: that one is watched from then on.
        third = tmp_path / "opt"
        third.mkdir()
        (third / "next.yaml").write_text(version("2Gi"))
        os.symlink(third / "next.yaml", policy_dir / "policies.yaml.new")
        os.replace(policy_dir / "policies.yaml.new", policy_dir / "policies.yaml")
        wait_until(lambda: store.generation == 3, "the relinked policy was not reloaded")
        (third / "next.yaml").write_text(version("4Gi"))
        wait_until(lambda: store.generation == 4, "an edit in the newly linked directory was not reloaded")
    finally:
        loop.run(store.stop())


# ------------------------------------------------------------------ 8. the policy store's tasks are supervised

def test_a_bug_in_a_reload_is_logged_counted_reported_and_survived(
        configured: Callable[[str], Proxy], sockdir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import criproxy.supervise

    monkeypatch.setattr(criproxy.supervise, "HEALTHY_AFTER_S", 1.0)
    policy_file = sockdir / "etc" / "policies.yaml"
    policy_file.parent.mkdir()
    policy_file.write_text(version("256Mi"))
    proxy = configured(f"policies: {policy_file}\n")
    assert proxy.policies is not None and proxy.observability is not None and proxy.observability.http is not None
    port = proxy.observability.http.port
    real = store_module.parse_policy
    raised: list[bool] = []

    def buggy_once(text: bytes, file: str) -> Any:
        if not raised:
            raised.append(True)
            raise RuntimeError("a bug in the policy checker")
        return real(text, file)

    monkeypatch.setattr(store_module, "parse_policy", buggy_once)
    caplog.set_level(logging.INFO, logger="criproxy")
    policy_file.write_text(version("512Mi"))
    wait_until(lambda: bool(raised), "the change was not reloaded")
    wait_until(lambda: get(port, "/readyz")[0] == 503, "/readyz did not report the failing task")
    text = get(port, "/readyz")[1]
    assert "policy-reload" in text and "a bug in the policy checker" in text, text
    failures = [r for r in caplog.records if r.name == "criproxy.supervise" and r.levelno == logging.ERROR]
    assert failures and failures[0].exc_info is not None
    assert 'criproxy_background_task_failures_total{task="policy-reload"} 1.0' in get(port, "/metrics")[1]
    newest = version("1Gi")
    policy_file.write_text(newest)
    wait_until(lambda: proxy.policies is not None and proxy.policies.current.identity == identity(policy_file, newest),
               "the reloader did not come back")
    wait_until(lambda: get(port, "/readyz")[0] == 200, "still not ready after the reloader recovered")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
