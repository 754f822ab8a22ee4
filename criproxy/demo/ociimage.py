"""Write single-layer OCI image-layout archives that ``ctr images import`` accepts.

`criproxy demo` and the end-to-end tests use no registry, so they build the two images
they need (the pod "pause" image and a busybox image) from local files: ``pause.c`` beside
this module, compiled with ``gcc -static``, and the host's static busybox. The archive is
a plain tar holding ``oci-layout``, ``index.json`` and ``blobs/sha256/*``; the single layer
is stored uncompressed and every tar header is normalised (owner root, mtime 0) so the same
inputs always give the same digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import stat
import struct
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.v1.tar"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

DEFAULT_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)

BUSYBOX_BINARY = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "cat",
    "echo",
    "env",
    "false",
    "grep",
    "hostname",
    "id",
    "ls",
    "mkdir",
    "ps",
    "rm",
    "sh",
    "sleep",
    "test",
    "touch",
    "true",
    "wc",
)

PAUSE_SOURCE = Path(__file__).with_name("pause.c")

# Python's platform.machine() spelling -> the GOARCH spelling OCI configs use.
_GO_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Symlink:
    """A symbolic link in the layer, pointing at ``target`` (stored verbatim)."""

    target: str


@dataclass(frozen=True)
class Directory:
    """An explicit directory in the layer (parents of files are added as 0755 automatically)."""

    mode: int = 0o755


# bytes: a 0644 regular file with that content; Path: a copy of that host file, keeping its permission bits.
FileSource = bytes | Path | Symlink | Directory


@dataclass(frozen=True)
class OciArchive:
    """What :func:`write_oci_archive` wrote."""

    path: Path
    ref: str
    manifest_digest: str
    # The config digest is what containerd's CRI reports as the image id.
    config_digest: str


def oci_architecture(machine: str | None = None) -> str:
    """The OCI/GOARCH architecture name of ``machine`` (default: this host)."""
    name = machine if machine is not None else platform.machine()
    try:
        return _GO_ARCH[name]
    except KeyError:
        raise ValueError(f"no OCI architecture name known for machine type {name!r}") from None


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _layer_member_name(path: str) -> str:
    pure = PurePosixPath("/", path)
    if ".." in pure.parts:
        raise ValueError(f"image path {path!r} must not contain '..'")
    relative = pure.relative_to("/")
    if str(relative) == ".":
        raise ValueError("the image root itself cannot be a layer entry")
    return str(relative)


def _tar_info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _layer_tar(files: Mapping[str, FileSource]) -> bytes:
    entries = {_layer_member_name(path): source for path, source in files.items()}
    parents = {str(parent) for name in entries for parent in PurePosixPath(name).parents if str(parent) != "."}
    for parent in parents - entries.keys():
        entries[parent] = Directory()

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # Sorted order puts every directory before its contents.
        for name in sorted(entries):
            source = entries[name]
            if isinstance(source, Directory):
                tar.addfile(_tar_info(name, tarfile.DIRTYPE, source.mode))
            elif isinstance(source, Symlink):
                info = _tar_info(name, tarfile.SYMTYPE, 0o777)
                info.linkname = source.target
                tar.addfile(info)
            elif isinstance(source, Path):
                data = source.read_bytes()
                mode = stat.S_IMODE(source.stat().st_mode)
                tar.addfile(_tar_info(name, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
            else:
                tar.addfile(_tar_info(name, tarfile.REGTYPE, 0o644, len(source)), io.BytesIO(source))
    return buffer.getvalue()


def _add_blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = _digest(data)
    info = _tar_info("blobs/sha256/" + digest.removeprefix("sha256:"), tarfile.REGTYPE, 0o644, len(data))
    tar.addfile(info, io.BytesIO(data))
    return digest


def write_oci_archive(
    dest: Path,
    ref: str,
    files: Mapping[str, FileSource],
    *,
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = (),
    env: Sequence[str] = DEFAULT_ENV,
    architecture: str | None = None,
) -> OciArchive:
    """Write a one-layer image named ``ref`` holding ``files`` (image path -> source) to ``dest``."""
    arch = architecture if architecture is not None else oci_architecture()
    layer = _layer_tar(files)
    config = _canonical_json(
        {
            "architecture": arch,
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {"Env": list(env), "Entrypoint": list(entrypoint), "Cmd": list(cmd), "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "criproxy.demo.ociimage"}],
        }
    )
    manifest = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": MEDIA_TYPE_LAYER, "digest": _digest(layer), "size": len(layer)}],
        }
    )
    index = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [
                {
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {ANNOTATION_REF_NAME: ref, ANNOTATION_CONTAINERD_NAME: ref},
                }
            ],
        }
    )

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        layout = _canonical_json({"imageLayoutVersion": "1.0.0"})
        tar.addfile(_tar_info("oci-layout", tarfile.REGTYPE, 0o644, len(layout)), io.BytesIO(layout))
        tar.addfile(_tar_info("index.json", tarfile.REGTYPE, 0o644, len(index)), io.BytesIO(index))
        tar.addfile(_tar_info("blobs", tarfile.DIRTYPE, 0o755))
        tar.addfile(_tar_info("blobs/sha256", tarfile.DIRTYPE, 0o755))
        for blob in (layer, config, manifest):
            _add_blob(tar, blob)
    return OciArchive(path=dest, ref=ref, manifest_digest=_digest(manifest), config_digest=_digest(config))


def elf_interpreter_problem(path: Path) -> str | None:
    """Why ``path`` cannot run in an empty image: not a 64-bit little-endian ELF, or dynamically linked."""
    try:
        with path.open("rb") as binary:
            header = binary.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF":
                return f"{path} is not an ELF executable"
            if header[4] != 2 or header[5] != 1:
                return f"{path} is not a 64-bit little-endian ELF executable"
            (phoff,) = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            binary.seek(phoff)
            table = binary.read(phentsize * phnum)
    except OSError as error:
        return f"cannot read {path}: {error}"
    pt_interp = 3
    for offset in range(0, len(table) - 3, phentsize):
        (p_type,) = struct.unpack_from("<I", table, offset)
        if p_type == pt_interp:
            return f"{path} is dynamically linked (install the static build, e.g. Debian's busybox-static)"
    return None


def busybox_image(dest: Path, ref: str) -> OciArchive:
    """An image with the host's static busybox at /bin/busybox and applet symlinks in /bin."""
    problem = elf_interpreter_problem(BUSYBOX_BINARY)
    if problem is not None:
        raise RuntimeError(f"cannot build the busybox image: {problem}")
    files: dict[str, FileSource] = {"bin/busybox": BUSYBOX_BINARY, "tmp": Directory(0o1777)}
    files.update({f"bin/{applet}": Symlink("busybox") for applet in BUSYBOX_APPLETS})
    return write_oci_archive(dest, ref, files, cmd=["/bin/sh"])


def pause_image(dest: Path, ref: str, workdir: Path) -> OciArchive:
    """An image whose only file is /pause, built from ``pause.c`` with ``gcc -static`` in ``workdir``."""
    binary = workdir / "pause"
    workdir.mkdir(parents=True, exist_ok=True)
    command = ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(PAUSE_SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the pause image failed: {' '.join(command)}\n{result.stderr}")
    return write_oci_archive(dest, ref, {"pause": binary}, entrypoint=["/pause"])
