"""libvirt side effects: connection, define/start/stop/undefine, metadata, hotplug.

Every libvirt failure leaves here as VirtError (or HostError for the connection) with the reason.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable, Iterable, Iterator

import libvirt

from . import domain
from .errors import HostError, VirtError

# libvirt prints every error to stderr by default; we raise instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

DEFAULT_URI = "qemu:///system"


def connect(uri: str) -> libvirt.virConnect:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostError(
            f"cannot connect to libvirt at {uri}: {first_line(exc.get_error_message())}; "
            "is libvirtd running? (scripts/setup.sh starts it)"
        ) from None
    if conn is None:  # older bindings returned None instead of raising
        raise HostError(f"cannot connect to libvirt at {uri}")
    return conn


def first_line(message: str | None, max_chars: int = 300) -> str:
    """libvirt's reason without what it quotes: a file it failed to parse is quoted on the lines
    after the first (`test:///etc/shadow` printed the file's first line, a password hash)."""
    line = (message or "").strip().splitlines()[:1]
    return line[0][:max_chars] if line else "no reason given"


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise VirtError(f"looking up domain {name!r}: {exc.get_error_message()}") from None


def require(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    dom = lookup(conn, name)
    if dom is None:
        raise VirtError(f"no domain named {name!r} on {conn.getURI()}; `nvmprov list` shows the guests")
    return dom


def _call(what: str, fn: Callable[[], object]) -> object:
    try:
        return fn()
    except libvirt.libvirtError as exc:
        raise VirtError(f"{what}: {exc.get_error_message()}") from None


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    return _call("defining the domain", lambda: conn.defineXML(xml))


def start(dom: libvirt.virDomain) -> None:
    _call(f"starting {dom.name()}", dom.create)


def is_active(dom: libvirt.virDomain) -> bool:
    return bool(_call(f"state of {dom.name()}", dom.isActive))


def power_off(dom: libvirt.virDomain) -> None:
    """Cut the power (virDomainDestroy): no flush, no clean shutdown."""
    if is_active(dom):
        _call(f"powering off {dom.name()}", dom.destroy)


def wait_inactive(dom: libvirt.virDomain, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_active(dom):
            return True
        time.sleep(0.5)
    return not is_active(dom)


def acpi_shutdown(dom: libvirt.virDomain) -> None:
    if is_active(dom):
        _call(f"sending ACPI shutdown to {dom.name()}", dom.shutdown)


def undefine(dom: libvirt.virDomain) -> None:
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    )
    _call(f"undefining {dom.name()}", lambda: dom.undefineFlags(flags))


def attach(dom: libvirt.virDomain, device_xml: str, *, live: bool, config: bool) -> None:
    flags = 0
    if live:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    if config:
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    _call(f"attaching a device to {dom.name()}", lambda: dom.attachDeviceFlags(device_xml, flags))


def xml_desc(dom: libvirt.virDomain, *, inactive: bool = False) -> str:
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return _call(f"reading the XML of {dom.name()}", lambda: dom.XMLDesc(flags))  # type: ignore[return-value]


def set_metadata(dom: libvirt.virDomain, inner_xml: str, *, key: str, uri: str) -> None:
    """Replace nvmprov's metadata element in the persistent config (and the live one when running)."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if is_active(dom):
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    _call(
        f"recording metadata on {dom.name()}",
        lambda: dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, inner_xml, key, uri, flags),
    )


def all_domains(conn: libvirt.virConnect) -> Iterator[libvirt.virDomain]:
    yield from _call("listing domains", conn.listAllDomains)  # type: ignore[misc]


def path_users(conn: libvirt.virConnect, paths: Iterable[str], *, exclude: str | None = None
               ) -> dict[str, list[str]]:
    """For each of PATHS, the sorted names of the domains (running or not, EXCLUDE left out) that use
    it: whatever domain.references reads in their live or persistent XML names it, as a file, in a
    <qemu:commandline> argument, or as a storage volume (resolved through the connection). The one
    answer to "which domains use this path", for create, attach, detach --purge, prune and image."""
    wanted = {p: posixpath.normpath(p) for p in paths}
    users: dict[str, list[str]] = {p: [] for p in wanted}
    resolved: dict[tuple[str, str], str | None] = {}
    volumes_at: dict[str, tuple[str, str] | None] = {}
    for dom in all_domains(conn):
        name = dom.name()
        if name == exclude:
            continue
        used: set[str] = set()
        for xml in _definitions(dom):
            refs = domain.references(xml)
            used |= refs.paths
            for ref in refs.volumes:
                path = _volume_path(conn, ref, resolved)
                if path:
                    used.add(posixpath.normpath(path))
                else:  # its pool inactive: compare with the volume libvirt has at each path
                    used |= {p for p in wanted if _volume_of_path(conn, p, volumes_at) == ref}
        for path, norm in wanted.items():
            if norm in used or path in used:
                users[path].append(name)
    return {p: sorted(names) for p, names in users.items()}


def _definitions(dom: libvirt.virDomain) -> list[str]:
    """The live XML and, when it differs, the persistent one; none of a domain that went away."""
    try:
        xmls = [dom.XMLDesc(0)]
        if dom.isActive() and dom.isPersistent():
            xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return []
        raise VirtError(f"reading the XML of {dom.name()}: {exc.get_error_message()}") from None
    return xmls


def _volume_of_path(conn: libvirt.virConnect, path: str, cache: dict[str, tuple[str, str] | None]
                    ) -> tuple[str, str] | None:
    """(pool, volume) of the volume at `path`, None when libvirt knows no volume there."""
    if path not in cache:
        try:
            vol = conn.storageVolLookupByPath(path)
            cache[path] = (vol.storagePoolLookupByVolume().name(), vol.name())
        except libvirt.libvirtError:
            cache[path] = None
    return cache[path]


def _volume_path(conn: libvirt.virConnect, ref: tuple[str, str], cache: dict[tuple[str, str], str | None]
                 ) -> str | None:
    """The path of volume ref[1] in pool ref[0]; None when the pool or volume is gone or inactive."""
    if ref not in cache:
        try:
            cache[ref] = conn.storagePoolLookupByName(ref[0]).storageVolLookupByName(ref[1]).path()
        except libvirt.libvirtError:
            cache[ref] = None
    return cache[ref]
