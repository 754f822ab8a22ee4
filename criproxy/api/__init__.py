"""Generated CRI protobuf modules (see scripts/genproto.py); do not edit by hand."""
