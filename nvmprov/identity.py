"""Which hypervisor a connection reaches: libvirt's host UUID plus the driver instance.

A URI is only an address: `qemu:///system` and `qemu+ssh://root@127.0.0.1/system` reach one
libvirtd. The host UUID (capabilities /host/uuid, from SMBIOS or libvirtd's host_uuid) names the
machine; the driver instance (system, or one user's session) names the libvirtd on it. Guest state,
locks and ownership records are kept under this key, never under the URI.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET  # noqa: S405  (libvirt's own XML)
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import libvirt

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Hypervisor:
    host_uuid: str
    driver: str        # "system", "session-<uid>" or the URI's driver path ("default" of test:///default)
    uri: str           # how it was reached this time (for messages and `list --all`; not part of the key)

    @property
    def key(self) -> str:
        return f"{self.host_uuid}-{self.driver}"


def host_uuid(capabilities_xml: str, uri: str) -> str:
    """/host/uuid of the capabilities; a driver that reports none (libvirt's test driver) is known
    by its URI instead (then aliases of that URI are not recognised as one)."""
    found = (ET.fromstring(capabilities_xml).findtext("host/uuid") or "").strip().lower()  # noqa: S314 - libvirt's own XML
    if _UUID.fullmatch(found):
        return found
    return "uri-" + hashlib.sha256(uri.encode()).hexdigest()[:16]


def driver(uri: str, session_uid: int | None = None) -> str:
    """system | session-UID | the URI path's last part (test:///default -> default)."""
    path = urlparse(uri).path.strip("/") or "system"
    part = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "system"
    if part == "session" and session_uid is not None:
        return f"session-{session_uid}"  # every user has a session libvirtd of their own
    return part


def of(conn: libvirt.virConnect) -> Hypervisor:
    """The hypervisor CONN reaches (one capabilities call)."""
    import libvirt

    from .errors import HostError

    try:
        caps = conn.getCapabilities()
        uri = conn.getURI()
    except libvirt.libvirtError as exc:
        raise HostError(f"reading libvirt's capabilities: {exc.get_error_message()}") from None
    uid = None
    if driver(uri) == "session":
        # the session daemon runs as the connecting user; remote sessions are rare (not keyed by user)
        import os

        uid = os.geteuid() if not urlparse(uri).hostname else None
    return Hypervisor(host_uuid(caps, uri), driver(uri, uid), uri)
