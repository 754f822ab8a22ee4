"""Helpers shared by the test suites. The private containerd, the OCI image writer, the CRI client and
`criproxy serve` as a child process live in criproxy/demo/ (`criproxy demo` runs them too); the modules
here of those names re-export them."""
