"""nvmprov's guests as libvirt records them: a domain is nvmprov's when it carries nvmprov's
metadata, which holds the spec it was made with (so its plan can be rebuilt) and every volume
nvmprov made for it. The lookups verify, attach, show, start and the API share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import domain, host, identity, image, state, storage, virt
from . import plan as planmod
from .errors import HostError, UsageError
from .progress import Progress
from .report import SshInfo
from .spec import load_recorded
from .uris import effective_uri

if TYPE_CHECKING:
    import libvirt

    from .plan import Plan

def ssh_coordinates(files: state.GuestFiles, port: int, user: str) -> SshInfo:
    """How to reach a guest nvmprov made: the one place these are put together (reports, `list`,
    `show`, `nvmprov ssh` and the proof's own session all read them from here)."""
    return SshInfo(host=domain.SSH_FORWARD_HOST, port=port, user=user, identity_file=str(files.client_key),
                   known_hosts=str(files.known_hosts))


@dataclass
class Managed:
    dom: libvirt.virDomain
    md: domain.Metadata
    plan: Plan
    files: state.GuestFiles   # under the hypervisor's identity (moved there from the old layout)

    @property
    def ssh(self) -> SshInfo:
        return ssh_coordinates(self.files, self.md.ssh_port, self.md.ssh_user)


@contextmanager
def connection(connect: str | None) -> Iterator[libvirt.virConnect]:
    """A connection to --connect's URI (or the default), closed after the block."""
    conn = virt.connect(effective_uri(virt.DEFAULT_URI, connect))
    try:
        yield conn
    finally:
        conn.close()


def guest(conn: libvirt.virConnect, name: str, hv: identity.Hypervisor | None = None) -> Managed:
    """nvmprov's guest NAME on CONN (HV: its hypervisor, when the caller already asked)."""
    dom = virt.require(conn, state.check_name(name))
    md = domain.parse_metadata(virt.xml_desc(dom, inactive=True))
    if md is None:
        raise UsageError(f"domain {name!r} was not made by nvmprov (no nvmprov metadata); nothing done")
    files = state.adopt_legacy(name, hv or identity.of(conn), dom.UUIDString())
    return Managed(dom, md, plan_from_metadata(conn, md), files)


def check_same_domain(files: state.GuestFiles, dom: libvirt.virDomain) -> None:
    """The keys kept here are for the domain nvmprov made; refuse one replaced under its name."""
    recorded = state.recorded_domain_uuid(files)
    if recorded is not None and recorded != dom.UUIDString():
        raise HostError(
            f"domain {dom.name()} on {dom.connect().getURI()} is not the one nvmprov made and keeps keys for "
            f"(domain uuid {dom.UUIDString()}, recorded {recorded}): it was replaced outside this nvmprov; "
            f"`nvmprov destroy {dom.name()}` and create it again"
        )


def plan_from_metadata(conn: libvirt.virConnect, md: domain.Metadata) -> Plan:
    """Rebuild the plan from the spec recorded in the domain: same spec + same host -> same plan."""
    if md.spec_json is None:
        raise HostError(f"the nvmprov metadata of this domain holds no spec (made by nvmprov {md.version}?)")
    try:
        spec, broken = load_recorded(json.loads(md.spec_json))
    except ValueError:
        raise HostError("the spec in this domain's nvmprov metadata is not JSON; recreate the guest") from None
    for rule in broken:  # made before the rule: warned about, used as it is, nothing changed
        Progress(prefix=f"{spec.name}: ").line(f"warning: the spec this guest was made with breaks a rule added "
                                               f"since: {rule}; the guest is left as it is")
    pool = storage.pool_of(conn, spec.pool)
    facts = host.facts(conn, storage.pool_path(pool))
    if spec.image == "builtin":
        facts = replace(facts, builtin_volumes=image.builtin_volume_names())
    return with_recorded_volumes(planmod.build(spec, facts), md)


def with_recorded_volumes(the_plan: Plan, md: domain.Metadata) -> Plan:
    """The plan with each region's volume as the metadata recorded it: a guest made under an earlier
    naming (naming.py) keeps its volumes."""
    recorded = {r.name: r.volume for r in md.regions if r.volume}
    regions = tuple(replace(r, volume=recorded.get(r.name, r.volume)) for r in the_plan.regions)
    return replace(the_plan, regions=regions)
