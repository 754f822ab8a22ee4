"""The transport side: the native data plane's Python face, the runtime connection the proxy's
own calls use, the listening socket, and process-level plumbing (systemd, allocator tuning)."""
