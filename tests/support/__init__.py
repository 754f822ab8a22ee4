"""Helpers shared by the test suites: OCI image writer, containerd harness, CRI test client."""
