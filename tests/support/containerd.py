"""The private containerd the end-to-end tests run. One copy serves the tests and `criproxy demo`:
criproxy/demo/containerd.py (and criproxy/demo/host.py for the host's settings, mounts, processes)."""

from criproxy.demo.containerd import (
    ALT_HANDLER,
    BUSYBOX_IMAGE,
    DEFAULT_HANDLER,
    LOG_TAIL_LINES,
    PAUSE_IMAGE,
    REQUIRED_COMMANDS,
    Containerd,
    ContainerdError,
    containerd_available,
    import_archive,
    kill_leftovers,
    remove_all_pods,
    unmount_all_under,
)

__all__ = [
    "ALT_HANDLER", "BUSYBOX_IMAGE", "DEFAULT_HANDLER", "LOG_TAIL_LINES", "PAUSE_IMAGE", "REQUIRED_COMMANDS",
    "Containerd", "ContainerdError", "containerd_available", "import_archive", "kill_leftovers", "remove_all_pods",
    "unmount_all_under",
]
