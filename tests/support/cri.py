"""The tests' CRI client. One copy serves the tests and `criproxy demo`: criproxy/demo/cri.py."""

from criproxy.demo.cri import DEFAULT_TIMEOUT, ApiVersion, CriClient, Metadata, Service, api_module

__all__ = ["DEFAULT_TIMEOUT", "ApiVersion", "CriClient", "Metadata", "Service", "api_module"]
