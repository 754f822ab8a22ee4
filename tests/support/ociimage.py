"""OCI image archives built from local files (no registry). One copy serves the tests and
`criproxy demo`: criproxy/demo/ociimage.py, with the pause image's source criproxy/demo/pause.c."""

from criproxy.demo.ociimage import (
    BUSYBOX_APPLETS,
    BUSYBOX_BINARY,
    PAUSE_SOURCE,
    Directory,
    FileSource,
    OciArchive,
    Symlink,
    busybox_image,
    elf_interpreter_problem,
    oci_architecture,
    pause_image,
    write_oci_archive,
)

__all__ = [
    "BUSYBOX_APPLETS", "BUSYBOX_BINARY", "PAUSE_SOURCE", "Directory", "FileSource", "OciArchive", "Symlink",
    "busybox_image", "elf_interpreter_problem", "oci_architecture", "pause_image", "write_oci_archive",
]
