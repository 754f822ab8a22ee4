"""criproxy: an annotation-driven proxy between the kubelet and its CRI runtime."""

__version__ = "0.2.0"
