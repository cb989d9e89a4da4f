"""Which hypervisor a connection reaches, whatever URI reached it.

A URI is only an address: `qemu:///system`, `qemu+unix:///system?socket=...` and
`qemu+ssh://root@127.0.0.1/system` reach one libvirtd, and on this libvirt root's `qemu:///session`
reaches the system daemon too (measured). Guest state, locks and ownership records are kept under
the identity of the daemon, never under the URI.

The issue asked for libvirt's host UUID (capabilities /host/uuid) plus the driver. Measured here
(2026-12-02): a host without readable SMBIOS (no /sys/class/dmi/id/product_uuid, no /dev/mem) and
no `host_uuid` in libvirtd.conf gets a random host UUID at every daemon start, for the system
daemon and for session daemons alike (a session daemon restarted: b2ce5a30-... then afffc913-...).
State keyed by it would be lost at each restart. So the identity is a mark the daemon itself keeps:
a libvirt secret (no value) with usage `tls` name `nvmprov-hypervisor-identity`, defined once by
the first nvmprov that connects, stored in the daemon's own configuration, the same through every
URI that reaches it and different for every daemon. The host UUID and the URI's driver are kept
beside it for people to read. Only libvirt's test driver (no secrets) falls back to host UUID +
driver; any other connection that cannot read or define the secret (read-only, no secret driver)
is a HostError, never a silent key that changes at the next daemon start.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET  # noqa: S405  (libvirt's own XML)
from dataclasses import dataclass
from urllib.parse import urlparse

import libvirt

from .errors import HostError

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MARK = "nvmprov-hypervisor-identity"
_MARK_XML = (f"<secret ephemeral='no' private='yes'><description>nvmprov: identity of this libvirt daemon "
             f"(no value; keep it: nvmprov keys guest state by its UUID)</description>"
             f"<usage type='tls'><name>{MARK}</name></usage></secret>")


@dataclass(frozen=True)
class Hypervisor:
    host_uuid: str
    driver: str        # system, session, ... from the URI (for people; root's session is the system daemon)
    uri: str           # how it was reached this time (messages, `list --all`); not part of the key
    mark: str | None = None  # the UUID of the daemon's identity secret

    @property
    def key(self) -> str:
        return f"libvirtd-{self.mark}" if self.mark else f"{self.host_uuid}-{self.driver}"


def host_uuid(capabilities_xml: str, uri: str) -> str:
    """/host/uuid of the capabilities; a driver that reports none (libvirt's test driver) is known
    by its URI instead."""
    found = (ET.fromstring(capabilities_xml).findtext("host/uuid") or "").strip().lower()  # noqa: S314 - libvirt's own XML
    if _UUID.fullmatch(found):
        return found
    return "uri-" + hashlib.sha256(uri.encode()).hexdigest()[:16]


def driver(uri: str) -> str:
    """system | session | the URI path's last part (test:///default -> default)."""
    path = urlparse(uri).path.strip("/") or "system"
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "system"


def _mark(conn: libvirt.virConnect) -> str:
    """The UUID of the daemon's identity secret, defining it when there is none. Raises the
    libvirtError of a daemon that keeps no secrets or may not define one (read-only)."""
    try:
        return str(conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_TLS, MARK).UUIDString())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
            raise
    try:
        return str(conn.secretDefineXML(_MARK_XML, 0).UUIDString())
    except libvirt.libvirtError:
        pass  # another nvmprov defined it first (its usage is taken): look it up again
    return str(conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_TLS, MARK).UUIDString())


def may_fall_back(uri: str) -> bool:
    """Only libvirt's test driver (no secrets, no daemon, in-process state) is known by host UUID +
    driver: a real daemon's host UUID may change at every start (above)."""
    return urlparse(uri).scheme.split("+")[0] == "test"


def of(conn: libvirt.virConnect) -> Hypervisor:
    """The hypervisor CONN reaches (a capabilities call and a secret lookup)."""
    try:
        caps = conn.getCapabilities()
        uri = conn.getURI()
    except libvirt.libvirtError as exc:
        raise HostError(f"reading libvirt's capabilities: {exc.get_error_message()}") from None
    try:
        mark: str | None = _mark(conn)
    except libvirt.libvirtError as exc:
        if not may_fall_back(uri):
            raise HostError(
                f"cannot read or define nvmprov's identity secret (usage tls {MARK}) on {uri}: "
                f"{exc.get_error_message() or exc}; nvmprov keeps guest state and volume ownership under it and "
                "will not guess (this daemon's host UUID may change at every start): connect read-write to a "
                "libvirtd with its secret driver (as root: qemu:///system)"
            ) from None
        mark = None
    return Hypervisor(host_uuid(caps, uri), driver(uri), uri, mark)
