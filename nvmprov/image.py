"""The built-in guest image: Debian 12 made with mmdebstrap from the recipe in templates/image/.

build() runs locally (mmdebstrap, mkfs.ext4 -d, qemu-img convert: no loop device, no mount),
then uploads three volumes through the storage API: the root filesystem as qcow2, the kernel
and the initrd (for direct kernel boot). Their names carry a digest of the recipe, so the image
is rebuilt only when the recipe changes, and is cached in the pool outside any checkout.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# libvirt (and storage, which needs it) only where a pool is touched, and shutil, subprocess,
# tempfile and state (~15 ms together) only where an image is built: `nvmprov render` reads
# builtin_volume_names() from here and must start fast (tests/unit/test_bench_cli_imports.py).
if TYPE_CHECKING:
    import libvirt
from nvmprov.errors import HostError
from nvmprov.resources import TEMPLATES_ROOT, require

RECIPE_DIR = TEMPLATES_ROOT / "image"
RECIPE_REQUIRED = ("packages.txt", "customize.sh")  # an empty or missing recipe must not digest quietly
SUITE = "bookworm"  # Debian 12
NAME_PREFIX = "nvmprov-debian12"

# Part of the digest: bump when the build steps below change what ends up in the image.
BUILD_STEPS_VERSION = "1"

MiB = 1 << 20
GiB = 1 << 30
ROOTFS_MIN_BYTES = 2 * GiB  # the overlay grows to the guest's disk size; nvmprov-seed resizes
ROOTFS_MARGIN_BYTES = 512 * MiB  # free space on top of what the files need
ROOTFS_ROUND_BYTES = 64 * MiB

# /var/tmp first: /tmp may be a small tmpfs (then tempfile.gettempdir(): see _build_dir_parent).
# mkdtemp makes a private (0700) directory there.
BUILD_PARENT_DIRS = ("/var/tmp",)  # noqa: S108
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

Progress = Callable[[str], None]


# ---------------------------------------------------------------- the recipe


def _recipe_files(recipe_dir: Path) -> list[Path]:
    """The recipe's files, without the bytecode Python leaves beside a .py file (pip compiles
    apply_seed.py when it installs the wheel; a test importing it does the same in a checkout)."""
    files = require(recipe_dir, *RECIPE_REQUIRED).rglob("*")
    return sorted(p for p in files if p.is_file() and "__pycache__" not in p.relative_to(recipe_dir).parts)


def stage_recipe(dest: Path, recipe_dir: Path | None = None) -> Path:
    """Copy exactly the files recipe_digest() digests to DEST (modes kept): what the image is made
    from is what its name says, whatever else lies beside the recipe."""
    import shutil

    recipe_dir = recipe_dir or RECIPE_DIR
    for path in _recipe_files(recipe_dir):
        target = dest / path.relative_to(recipe_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def recipe_digest(recipe_dir: Path | None = None) -> str:
    """sha256 over the recipe (RECIPE_DIR unless given): every file's relative path, executable
    bit and content. HostError when the recipe is missing (a non-editable install)."""
    recipe_dir = recipe_dir or RECIPE_DIR
    h = hashlib.sha256()
    h.update(f"nvmprov-image steps={BUILD_STEPS_VERSION} suite={SUITE}\n".encode())
    for path in _recipe_files(recipe_dir):
        rel = path.relative_to(recipe_dir).as_posix()
        executable = os.access(path, os.X_OK)
        data = path.read_bytes()
        h.update(f"{rel}\0{int(executable)}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def builtin_volume_names() -> tuple[str, str, str]:
    """(base qcow2, kernel, initrd) volume names of the image the current recipe makes."""
    prefix = f"{NAME_PREFIX}-{recipe_digest()[:12]}"
    return f"{prefix}.qcow2", f"{prefix}-vmlinuz", f"{prefix}-initrd.img"


_VOLUME = re.compile(rf"{NAME_PREFIX}-[0-9a-f]{{12}}(\.qcow2|-vmlinuz|-initrd\.img)")


def stale_volume_names(existing: Iterable[str]) -> list[str]:
    """Built-in image volumes of earlier recipes among EXISTING. The ledger never records image
    volumes: their name is the record, since the `nvmprov-` prefix is nvmprov's alone (a spec may
    not adopt such a volume, spec.py)."""
    current = set(builtin_volume_names())
    return sorted(v for v in existing if _VOLUME.fullmatch(v) and v not in current)


def packages(recipe_dir: Path | None = None) -> list[str]:
    recipe_dir = recipe_dir or RECIPE_DIR
    lines = (require(recipe_dir, "packages.txt") / "packages.txt").read_text(encoding="utf-8").splitlines()
    return [word for line in lines if (word := line.split("#", 1)[0].strip())]


def is_built(pool: libvirt.virStoragePool) -> bool:
    from nvmprov import storage

    return all(storage.volume_exists(pool, name) for name in builtin_volume_names())


# ---------------------------------------------------------------- the host's apt sources


def _one_line_entries(text: str, suite: str) -> list[str]:
    """`deb [opts] URI SUITE COMPONENTS` lines of a sources.list whose suite belongs to SUITE."""
    kept = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.split()
        if not words or words[0] != "deb":
            continue
        rest = words[1:]
        if rest and rest[0].startswith("["):  # options: [arch=amd64 signed-by=...]
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2 and _suite_matches(rest[1], suite):
            kept.append(line)
    return kept


def _suite_matches(name: str, suite: str) -> bool:
    return name == suite or name.startswith(f"{suite}-") or name.startswith(f"{suite}/")


def _deb822_stanzas(text: str, suite: str) -> list[str]:
    """Stanzas of a .sources file that are enabled, binary, and for SUITE (its suites only)."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key is not None:  # continuation line
                fields[key] += "\n" + line
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        lower = {k.lower(): k for k in fields}
        if fields.get(lower.get("enabled", ""), "yes").lower() == "no":
            continue
        if "deb" not in fields.get(lower.get("types", ""), "").split():
            continue
        suites = [s for s in fields.get(lower.get("suites", ""), "").split() if _suite_matches(s, suite)]
        if not suites:
            continue
        fields[lower["types"]] = "deb"
        fields[lower["suites"]] = " ".join(suites)
        kept.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
    return kept


@dataclass(frozen=True)
class AptSources:
    one_line: tuple[str, ...]  # for a .list file
    deb822: tuple[str, ...]  # for a .sources file

    def __bool__(self) -> bool:
        return bool(self.one_line or self.deb822)


def host_sources(texts: Iterable[tuple[str, str]], suite: str = SUITE) -> AptSources:
    """From (file name, content) pairs of the host's apt sources: the Debian SUITE entries.

    Only what apt itself reads (sources.list, *.list, *.sources) counts; disabled stanzas,
    source-only entries and other distributions' or vendors' suites are left out.
    """
    one_line: list[str] = []
    deb822: list[str] = []
    for name, text in texts:
        if name.endswith(".sources"):
            deb822 += _deb822_stanzas(text, suite)
        elif name.endswith(".list"):
            one_line += _one_line_entries(text, suite)
    return AptSources(tuple(one_line), tuple(deb822))


def _read_host_sources() -> list[tuple[str, str]]:
    files: list[Path] = []
    for path in APT_SOURCES:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file())
        elif path.is_file():
            files.append(path)
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def _write_sources(sources: AptSources, build_dir: Path) -> list[str]:
    """mmdebstrap's MIRROR arguments: files whose content becomes the image's apt sources."""
    args = []
    if sources.deb822:
        path = build_dir / "debian.sources"
        path.write_text("\n\n".join(sources.deb822) + "\n", encoding="utf-8")
        args.append(str(path))
    if sources.one_line:
        path = build_dir / "debian.list"
        path.write_text("\n".join(sources.one_line) + "\n", encoding="utf-8")
        args.append(str(path))
    return args


# ---------------------------------------------------------------- running the tools


def _tail(lines: Iterable[str], n: int = 15) -> str:
    return "\n".join(list(lines)[-n:])


def _run(argv: list[str], *, progress: Progress, label: str, stream: bool = False) -> None:
    """Run ARGV; with STREAM, its stderr lines become progress lines as they come.
    A failure raises HostError with the command, exit status and the stderr tail."""
    import subprocess

    tail: collections.deque[str] = collections.deque(maxlen=30)
    start = time.monotonic()
    proc = subprocess.Popen(  # noqa: S603 - argument list, no shell
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    with proc:
        for line in proc.stderr:
            line = line.rstrip()
            tail.append(line)
            if stream and line.startswith("I: "):
                progress(f"image: {label}: {line[3:]} ({time.monotonic() - start:.0f} s)")
    if proc.returncode != 0:
        raise HostError(f"image build: {label} failed (exit {proc.returncode}): {' '.join(argv)}\n{_tail(tail)}")


def _require_tools() -> None:
    import shutil

    missing = [t for t in ("mmdebstrap", "mkfs.ext4", "qemu-img") if shutil.which(t) is None]
    if missing:
        raise HostError(
            f"image build needs {', '.join(missing)}: run scripts/setup.sh "
            "(or apt-get install mmdebstrap e2fsprogs qemu-utils)"
        )
    if os.geteuid() != 0:
        raise HostError("image build runs mmdebstrap in root mode: run it as root (or use a pre-built image)")


def _used_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            total += st.st_blocks * 512
    return total


def rootfs_size_bytes(used_bytes: int) -> int:
    """Room for the files, a quarter more for ext4's metadata, and a margin; at least 2 GiB."""
    want = used_bytes + used_bytes // 4 + ROOTFS_MARGIN_BYTES
    rounded = -(-want // ROOTFS_ROUND_BYTES) * ROOTFS_ROUND_BYTES
    return max(ROOTFS_MIN_BYTES, rounded)


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise HostError(f"image build: expected one {pattern} in the image, found {[p.name for p in found]}")
    return found[0]


def _build_dir_parent() -> str:
    import tempfile

    for parent in (*BUILD_PARENT_DIRS, tempfile.gettempdir()):
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            return parent
    return tempfile.gettempdir()


@dataclass(frozen=True)
class LocalImage:
    qcow2: Path
    kernel: Path
    initrd: Path


def build_local(build_dir: Path, progress: Progress) -> LocalImage:
    """Make the image's three files in BUILD_DIR (an empty directory with a few GiB free)."""
    import shutil

    _require_tools()
    sources = host_sources(_read_host_sources())
    if not sources:
        raise HostError(
            f"image build: no enabled Debian '{SUITE}' entry in /etc/apt/sources.list or "
            "/etc/apt/sources.list.d/; the image is made from the host's own Debian 12 mirror: add one"
        )
    root = build_dir / "root"
    recipe = stage_recipe(build_dir / "recipe")
    hook = f'sh {_shq(str(recipe / "customize.sh"))} "$1" {_shq(str(recipe))}'
    t = time.monotonic()
    _run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=apt",
            f"--include={','.join(packages())}",
            f"--customize-hook={hook}",
            SUITE,
            str(root),
            *_write_sources(sources, build_dir),
        ],
        progress=progress,
        label="mmdebstrap",
        stream=True,
    )
    progress(f"image: root tree made in {time.monotonic() - t:.1f} s")

    kernel = shutil.copy2(_one(root, "boot/vmlinuz-*"), build_dir / "vmlinuz")
    initrd = shutil.copy2(_one(root, "boot/initrd.img-*"), build_dir / "initrd.img")

    t = time.monotonic()
    used = _used_bytes(root)
    size = rootfs_size_bytes(used)
    raw = build_dir / "rootfs.raw"
    with open(raw, "wb") as f:
        f.truncate(size)  # sparse: mke2fs writes only what it needs
    _run(
        ["mkfs.ext4", "-q", "-F", "-L", "nvmprov-root", "-d", str(root), str(raw)], progress=progress, label="mkfs.ext4"
    )
    progress(f"image: ext4 root filesystem of {size} bytes ({used} bytes of files) in {time.monotonic() - t:.1f} s")
    _remove_tree(root)

    t = time.monotonic()
    qcow2 = build_dir / "rootfs.qcow2"
    _run(
        ["qemu-img", "convert", "-O", "qcow2", "-o", "compat=1.1", str(raw), str(qcow2)],
        progress=progress,
        label="qemu-img convert",
    )
    raw.unlink()
    progress(f"image: qcow2 of {qcow2.stat().st_size} bytes in {time.monotonic() - t:.1f} s")
    return LocalImage(qcow2=qcow2, kernel=Path(kernel), initrd=Path(initrd))


def _mounts_under(path: Path) -> list[str]:
    base = str(path.resolve())
    prefix = base.rstrip("/") + "/"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f if line.strip()]
    return [p for p in points if p != base and p.startswith(prefix)]


def _remove_tree(path: Path) -> None:
    """rm -r PATH, unless something is still mounted inside (an interrupted mmdebstrap may leave
    /dev or /proc bind mounts in the chroot: deleting through them would hit the host's)."""
    mounted = _mounts_under(path)
    if mounted:
        raise HostError(
            f"image build: {path} still has mounts inside ({', '.join(mounted)}); "
            f"unmount them (umount -R {path}/root) and remove {path} by hand"
        )
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _shq(s: str) -> str:
    import shlex

    return shlex.quote(s)


# ---------------------------------------------------------------- into the pool


def _refuse_if_in_use(conn: libvirt.virConnect, pool: libvirt.virStoragePool, names: Iterable[str]) -> None:
    from nvmprov import storage, virt

    for name in names:
        vol = storage.lookup(pool, name)
        if vol is None:
            continue
        users = virt.path_users(conn, [vol.path()])[vol.path()]
        if users:
            raise HostError(
                f"cannot rebuild the built-in image: volume {name} is used by domain(s) {', '.join(users)}; "
                "destroy those guests first (their overlays sit on this image)"
            )


def _upload_all(
    pool: libvirt.virStoragePool, image: LocalImage, names: tuple[str, str, str], progress: Progress
) -> None:
    """Kernel and initrd first, the qcow2 last; on failure, remove what this run uploaded."""
    from nvmprov import storage

    base, kernel, initrd = names
    done: list[str] = []
    try:
        for name, path, fmt in (
            (kernel, image.kernel, "raw"),
            (initrd, image.initrd, "raw"),
            (base, image.qcow2, "qcow2"),
        ):
            t = time.monotonic()
            storage.upload(pool, name, path, fmt, mode=0o644)  # the image holds no secrets
            done.append(name)
            progress(f"image: uploaded {name} ({path.stat().st_size} bytes) in {time.monotonic() - t:.1f} s")
    except BaseException:
        for name in done:
            storage.delete(pool, name)
        raise


def build(
    conn: libvirt.virConnect,
    pool_name: str = "nvmprov",  # storage.DEFAULT_POOL
    *,
    force: bool = False,
    progress: Progress = lambda s: None,
) -> tuple[str, str, str]:
    """Build the built-in image unless the pool already holds it (or FORCE), and return its
    (base qcow2, kernel, initrd) volume names. The pool must exist (storage.ensure_pool)."""
    import tempfile

    from nvmprov import state, storage

    names = builtin_volume_names()
    pool = storage.pool_of(conn, pool_name)
    with state.host_lock("image-build"):  # a second build waits, then finds the image made
        if is_built(pool) and not force:
            progress(f"image: {names[0]} already in pool {pool_name}")
            return names
        _refuse_if_in_use(conn, pool, names)
        start = time.monotonic()
        progress(f"image: building {names[0]} (Debian 12 with mmdebstrap; a few minutes)")
        tmp = Path(tempfile.mkdtemp(prefix="nvmprov-image-", dir=_build_dir_parent()))
        try:
            image = build_local(tmp, progress)
            for name in names:  # leftovers of a forced rebuild or of a killed run
                storage.delete(pool, name)
            _upload_all(pool, image, names, progress)
        finally:
            _remove_tree(tmp)
        progress(f"image: built {names[0]} in {time.monotonic() - start:.0f} s")
    return names
