"""The guest file: safe YAML with positions -> validated pydantic models.

Pure: no libvirt, no network. Every problem becomes one SpecError with FILE:LINE:COL, the
field path, what is wrong and what would be right. Defaults and rules: docs/spec.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal, get_args, get_origin
from urllib.parse import unquote

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .diskimage import file_kind
from .errors import HostError, SpecError, UsageError
from .naming import backing_volume, shared_paths
from .sizes import (
    DIMM_ALIGN_BYTES,
    LABELLED_NS_ALIGN_BYTES,
    GiB,
    KiB,
    MiB,
    TiB,
    align_down,
    backing_bytes_for,
    expected_usable_bytes,
    format_size,
    labelled_available_bytes,
    namespace_usable_bytes,
    round_up,
)
from .uris import pool_dir_for

MAX_SIZE_BYTES = 16 * TiB          # far above any host here; catches unit typos such as 1000TiB
MAX_FILE_BYTES = 1 * MiB           # a guest file is a few hundred bytes; refuse to parse megabytes
MAX_YAML_NODES = 20_000            # with aliases refused this only bounds absurd files
MAX_YAML_DEPTH = 32                # a fleet file nests 5 levels; Python's recursion limit is far deeper
MAX_SIZE_DIGITS = 20               # 16TiB has 14 digits in bytes; Python refuses ints of 4300+ digits
MIN_MEMORY_BYTES = 256 * MiB       # a Debian cloud image with cloud-init does not boot in less
MIN_DISK_BYTES = 1 * GiB
MIN_REGION_BYTES = 16 * MiB        # one fsdax namespace alignment: less leaves nothing usable
MIN_LABEL_BYTES = 128 * KiB        # QEMU's minimum label-size
LABEL_MULTIPLE_BYTES = 4 * KiB
XFS_MIN_USABLE_BYTES = 300 * MiB   # Debian 12's mkfs.xfs refuses smaller filesystems
MAX_MEMORY_SLOTS = 256             # QEMU's limit of memory slots on x86
MAX_VIRTIO_PMEM = 14               # each gets a pcie-root-port on pcie.0 slots 0x10..0x1d
MAX_NUMA_NODES = 8                 # a test topology; QEMU allows 128, TCG on 2 cores wants few
NUMA_NODE_RAM_ALIGN_BYTES = 2 * MiB  # each node's RAM is a backend of its own, in whole 2MiB blocks
MIN_NUMA_NODE_RAM_BYTES = 128 * MiB  # a node's RAM share: the kernel boots on node 0's alone
DEVDAX_ALIGNS = (4 * KiB, 2 * MiB)  # what a devdax namespace takes here (1GiB: see _check_mode)
DEFAULT_DEVDAX_ALIGN = 2 * MiB
# CXL (issue 20, measured in docs/performance.md): a cxl-type3 device reports its capacity in 256MiB
# units (a 384MiB memdev gives no mem0 in the guest at all); one region per guest is what was measured.
CXL_GRANULE_BYTES = 256 * MiB
MAX_CXL_REGIONS = 1
MAX_NAMESPACES = 8                 # per split region: a handful; each is a round of the agent's work

_UNITS = {"b": 1, "k": KiB, "kib": KiB, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB, "t": TiB, "tib": TiB}
_DECIMAL_UNITS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}
_SIZE_RE = re.compile(r"(?P<sign>[-+]?)(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]*))?[ ]?(?P<unit>[A-Za-z]*)")
_UNIT_HELP = "B, KiB, MiB, GiB or TiB (K, M, G, T mean the same)"

GUEST_NAME_MAX = 63
REGION_NAME_MAX = 32               # keeps "<guest>-pmem-<region>.raw" and "ua-pmem-<region>" short
_NAME_CHARS = re.compile(r"[a-z0-9-]")
_PATH_CHARS = re.compile(r"[A-Za-z0-9._/+-]")
_POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VOLUME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_URI_RE = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\x00-\x1f\x7f]{0,500}")
# A spec file is shared: its `connect` must not make libvirt (or nvmprov's own ProxyCommand) run a
# program of the file's choosing. qemu+ext runs ?command=, the ssh transport runs ?command= as its
# ssh and ?netcat= on the hypervisor; such URIs are for --connect, which the user types themselves.
# Nor may it name a local file (the test driver reads any file as XML and libvirt's error quoted its
# first line: `test:///etc/shadow` printed a password hash) or lower the transport's trust (host
# keys not checked, keys or sockets of its choosing, unencrypted +tcp). Issue 12.
_URI_DRIVERS = ("qemu", "test")          # test:///default: libvirt's in-process test driver
_URI_TRANSPORTS = ("", "unix", "ssh", "tls")
_URI_PROGRAM_PARAMS = ("command", "netcat")
_URI_TRUST_PARAMS = ("socket", "keyfile", "known_hosts", "known_hosts_verify", "no_verify", "pkipath", "tls_priority")
_URI_PARAMS = ("no_tty", "sshauth", "mode", "proxy")
_QEMU_PATHS = ("/system", "/session")
RULE_CONNECT = "a spec's connect names no local file and lowers no transport trust"
_CONNECT_ELSEWHERE = "pass such a URI with --connect on the command line instead"
_IMAGE_SUFFIXES = (".qcow2", ".img", ".raw")

# Mounting over these would hide or break the guest's own system (S108: a denylist, no temp files).
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                 "/run", "/sbin", "/sys", "/usr")
_SYSTEM_DIRS = frozenset(("/", "/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var",  # noqa: S108
                          "/var/cache", "/var/lib", "/var/log", "/var/spool", "/var/tmp", *_SYSTEM_TREES))  # noqa: S108


# ---------------------------------------------------------------------------------------------
# rules added when specs became untrusted input (issue 12)

RECORDED = "nvmprov.recorded"   # validation context key: the warnings list of a recorded spec


class _TrustRule(ValueError):
    """A rule added in issue 12. A new spec that breaks it is refused; the spec recorded in an
    existing guest's metadata (made before the rule) still loads, with a warning naming RULE."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _recorded_warnings(info: ValidationInfo | None) -> list[str] | None:
    context = info.context if info is not None else None
    return context.get(RECORDED) if isinstance(context, dict) else None


def _lenient(check: Callable[[Any], Any]) -> Callable[[Any, ValidationInfo], Any]:
    """CHECK as a field validator whose _TrustRule refusals become warnings for a recorded spec."""

    def run(value: Any, info: ValidationInfo) -> Any:
        try:
            return check(value)
        except _TrustRule as e:
            warnings = _recorded_warnings(info)
            if warnings is None:
                raise
            warnings.append(f"{e.rule!r}: {e}")
            return value

    return run


# ---------------------------------------------------------------------------------------------
# sizes


def _example(minimum: int) -> str:
    """A size to suggest where any would do: 512MiB, or the smallest allowed when that is more."""
    return format_size(max(512 * MiB, round_up(minimum, MiB)))


def _with_unit(digits: str, minimum: int) -> str:
    """The fix for a size written without a unit: NMiB, NGiB or NB, the first that is allowed here."""
    n = int(digits)
    for unit, factor in (("MiB", MiB), ("GiB", GiB), ("B", 1)):
        if minimum <= n * factor <= MAX_SIZE_BYTES:
            return f"{n}{unit}"
    return _example(minimum)


def parse_size(text: str | int, *, what: str = "size", allow_zero: bool = False, minimum: int = 1) -> int:
    """Bytes of a size with a binary unit: "512MiB", "1G", "4096B" (B = bytes, explicitly).

    Refused: no unit (YAML 1024 and "1024" alike: bytes or MiB? QEMU guesses, we don't), decimal
    units (1GB), fractions (1.5GiB: write 1536MiB), zero (unless allow_zero: then "0" needs no
    unit), negatives, and anything above MAX_SIZE_BYTES. Raises ValueError with the fix.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"{what} must be a size such as 512MiB, not {_describe(text)}")
    if isinstance(text, int):
        return _int_size(text, what=what, allow_zero=allow_zero, minimum=minimum)
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{what} {text!r} is not a size; write a whole number and a unit, e.g. 512MiB")
    if len(m["int"].lstrip("0")) > MAX_SIZE_DIGITS:
        raise ValueError(f"{what} {text[:12]!r}... ({len(m['int'])} digits) is larger than "
                         f"{format_size(MAX_SIZE_BYTES)}; check the unit")
    number = Fraction(int(m["int"]))
    if m["frac"]:
        number += Fraction(int(m["frac"]), 10 ** len(m["frac"]))
    if m["sign"] == "-" and number != 0:
        raise ValueError(f"{what} {text!r} is negative; sizes are positive, e.g. {_example(minimum)}")
    if number == 0:
        if allow_zero:
            return 0
        raise ValueError(f"{what} {text!r} is zero; give a positive size, e.g. {_example(minimum)}")
    exact = number * _unit_bytes(text, m, what=what, minimum=minimum)
    if m["frac"] is not None:
        fix = f"write {format_size(int(exact))}" if exact.denominator == 1 else "give a whole number of bytes"
        raise ValueError(f"{what} {text!r} is fractional; {fix}")
    n_bytes = int(exact)
    if n_bytes > MAX_SIZE_BYTES:
        raise ValueError(f"{what} {text!r} is larger than {format_size(MAX_SIZE_BYTES)}; check the unit")
    return n_bytes


def _int_size(n: int, *, what: str, allow_zero: bool, minimum: int) -> int:
    """A bare YAML integer: only 0 (where zero is allowed) stands without a unit."""
    if n == 0 and allow_zero:
        return 0
    if n == 0:
        raise ValueError(f"{what} 0 is zero; give a positive size, e.g. {_example(minimum)}")
    if n < 0:
        raise ValueError(f"{what} {n} is negative; sizes are positive, e.g. {_example(minimum)}")
    if n >= 10**MAX_SIZE_DIGITS:
        raise ValueError(f"{what} is larger than {format_size(MAX_SIZE_BYTES)}; check the unit")
    raise ValueError(f"{what} {n} has no unit; write it with one of {_UNIT_HELP}, e.g. {_with_unit(str(n), minimum)}")


def _unit_bytes(text: str, m: re.Match[str], *, what: str, minimum: int) -> int:
    """Bytes per unit of a matched size; a missing, decimal or unknown unit is refused with the fix."""
    unit = m["unit"].lower()
    if not unit:
        raise ValueError(f"{what} {text!r} has no unit; write it with one of {_UNIT_HELP}, "
                         f"e.g. {_with_unit(m['int'], minimum)}")
    if unit in _DECIMAL_UNITS:
        raise ValueError(
            f"{what} {text!r} uses a decimal unit; nvmprov sizes are binary: write {m['int']}{_DECIMAL_UNITS[unit]}"
        )
    if unit not in _UNITS:
        raise ValueError(f"{what} {text!r} has an unknown unit {m['unit']!r}; use {_UNIT_HELP}")
    return _UNITS[unit]


def _describe(value: object) -> str:
    if value is None:
        return "an empty value"
    shown = repr(value) if not isinstance(value, int) or abs(value) < 10**MAX_SIZE_DIGITS else "(a huge number)"
    if len(shown) > 40:  # never echo a long value back at length
        shown = f"{shown[:24]}... ({len(shown)} characters)"
    return f"{type(value).__name__} {shown}"


def _size(what: str, *, minimum: int = 1, multiple: int = 1, allow_zero: bool = False) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        n = parse_size(value, what=what, allow_zero=allow_zero, minimum=minimum)
        if n == 0:
            return n
        if n < minimum:
            raise ValueError(f"{what} {format_size(n)} is too small; use at least {format_size(minimum)}")
        if n % multiple:
            raise ValueError(
                f"{what} {format_size(n)} is not a multiple of {format_size(multiple)}; "
                f"use {format_size(round_up(n, multiple))}"
            )
        return n

    return check


def _optional_size(what: str, **kw: Any) -> Callable[[Any], int | None]:
    check = _size(what, **kw)
    return lambda value: None if value is None else check(value)


_Ser = PlainSerializer(format_size, return_type=str)
_OptSer = PlainSerializer(lambda n: None if n is None else format_size(n), return_type=str | None)


# ---------------------------------------------------------------------------------------------
# names and paths


def _show_char(ch: str) -> str:
    if ch.isascii() and ch.isprintable():
        return repr(ch)
    return f"{ch!r} (U+{ord(ch):04X})"


def _name_checker(what: str, max_len: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(value) > max_len:
            raise ValueError(f"{what} is {len(value)} characters long; use at most {max_len}")
        if not value:
            raise ValueError(f"{what} is empty; use lowercase letters, digits and '-', e.g. demo")
        bad = next((c for c in value if not _NAME_CHARS.fullmatch(c)), None)
        if bad is not None:
            raise ValueError(
                f"{what} {value!r} contains {_show_char(bad)}; use only lowercase letters a-z, digits and '-'"
            )
        if value.startswith("-"):
            raise ValueError(f"{what} {value!r} starts with '-'; start with a letter or digit")
        return value

    return check


def _check_abs_path(value: str, what: str, example: str) -> None:
    bad = next((c for c in value if not _PATH_CHARS.fullmatch(c)), None)
    if bad is not None:
        raise ValueError(
            f"{what} {value!r} contains {_show_char(bad)}; use letters, digits, '.', '_', '+', '-' and '/'"
        )
    if not value.startswith("/"):
        raise ValueError(f"{what} {value!r} is not absolute; use a path such as {example}")
    norm = posixpath.normpath(value)
    if norm != value or value.startswith("//"):
        raise ValueError(f"{what} {value!r} is not normalized; write {norm}")
    if len(value) > 255:
        raise ValueError(f"{what} is {len(value)} characters long; use at most 255")


RULE_MOUNT = "no mount over /root or the login user's home"


def _under(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree + "/")


def _check_mount(value: str | None) -> str | None:
    if value is None:
        return None
    _check_abs_path(value, "mount", "/mnt/data")
    if value in _SYSTEM_DIRS or any(value.startswith(t + "/") for t in _SYSTEM_TREES):
        raise ValueError(f"mount {value!r} is a system directory; use a directory of its own, e.g. /mnt/data")
    if _under(value, "/root"):  # /root/.ssh/authorized_keys would be hidden at the next boot
        raise _TrustRule(RULE_MOUNT, f"mount {value!r} is root's home (or in it); a filesystem there hides its "
                         "files, such as .ssh/authorized_keys; use a directory of its own, e.g. /mnt/data")
    return value


def _check_image(value: str) -> str:
    if value == "builtin":
        return value
    _check_abs_path(value, "image", "/var/lib/images/debian-12.qcow2")
    if not value.endswith(_IMAGE_SUFFIXES):
        raise ValueError(f"image {value!r} is neither builtin nor a .qcow2, .img or .raw file; use one of those")
    return value


def _regex_checker(pattern: re.Pattern[str], what: str, hint: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} {value!r} is not valid; {hint}")
        return value

    return check


def check_connect(value: str) -> str:
    """A libvirt URI a spec file may name: the qemu driver (or test:///default) over a transport
    that runs no program of the URI's choosing, names no local file and lowers no trust."""
    _regex_checker(_URI_RE, "connect", "use a libvirt URI such as qemu:///system")(value)
    scheme, rest = value.split("://", 1)
    driver, _, transport = scheme.partition("+")
    if driver not in _URI_DRIVERS:
        raise ValueError(f"connect {value!r} uses libvirt driver {driver!r}; nvmprov drives QEMU: "
                         "use qemu:///system, qemu:///session or qemu+ssh://host/system")
    if transport == "ext":
        raise ValueError(f"connect {value!r} uses transport 'ext', which runs the program named by command=; "
                         f"a spec file may not name programs: {_CONNECT_ELSEWHERE}")
    authority = rest.split("/", 1)[0].rpartition("@")
    if any(part.startswith("-") for part in (authority[0], authority[2])):
        raise ValueError(f"connect {value!r} has a user or host starting with '-' (it would reach ssh as an "
                         "option); write the host name, e.g. qemu+ssh://root@host/system")
    query = rest.partition("?")[2].partition("#")[0]
    # libvirt splits parameters at '&' or ';', percent-decodes their names and ignores their case
    params = [unquote(item.partition("=")[0]).lower() for item in re.split(r"[&;]", query)] if query else []
    for param in params:
        if param in _URI_PROGRAM_PARAMS:
            raise ValueError(f"connect {value!r} sets {param}=, which makes libvirt run that program; "
                             f"a spec file may not name programs: {_CONNECT_ELSEWHERE}")
    for param in params:
        if param not in _URI_PARAMS + _URI_TRUST_PARAMS:
            raise ValueError(f"connect {value!r} sets {param!r}, which a spec file may not set; "
                             f"use only {', '.join(_URI_PARAMS)}, or {_CONNECT_ELSEWHERE}")
    _check_connect_trust(value, driver, transport, rest, params)
    return value


def _check_connect_trust(value: str, driver: str, transport: str, rest: str, params: list[str]) -> None:
    """RULE_CONNECT, the rules added in issue 12 (a recorded spec that breaks them still loads)."""
    path = "/" + rest.partition("?")[0].partition("#")[0].split("/", 1)[-1] if "/" in rest else ""
    if driver == "test" and value != "test:///default":
        raise _TrustRule(RULE_CONNECT, f"connect {value!r}: of the test driver a spec file may name only "
                         "test:///default (any other path is a file libvirt reads); use test:///default")
    if driver == "qemu" and path.rstrip("/") not in _QEMU_PATHS:
        raise _TrustRule(RULE_CONNECT, f"connect {value!r} names the path {path or '(none)'!r}; the QEMU driver "
                         "has /system and /session: use qemu:///system or qemu+ssh://host/system")
    if transport == "tcp":
        raise _TrustRule(RULE_CONNECT, f"connect {value!r} uses +tcp, which is neither encrypted nor authenticated; "
                         f"use qemu+ssh://host/system or qemu+tls://host/system, or {_CONNECT_ELSEWHERE}")
    if transport not in _URI_TRANSPORTS:
        raise ValueError(f"connect {value!r} uses transport {transport!r}; a spec file may use {driver}:// or "
                         f"{driver}+unix://, +ssh://, +tls://, or {_CONNECT_ELSEWHERE}")
    for param in params:
        if param in _URI_TRUST_PARAMS:
            raise _TrustRule(RULE_CONNECT, f"connect {value!r} sets {param}=, which names a local file or lowers "
                             "the transport's trust (host keys, certificates, keys, sockets); a spec file may not "
                             f"set it: drop it and use ~/.ssh/config for the hypervisor, or {_CONNECT_ELSEWHERE}")


# RULE_USER: the login user is made (or, when it exists, given nvmprov's key and sudo) by the seed.
# A system account there gets a login shell's key and sudo: refused are the names Debian's
# base-passwd reserves (passwd.master and group.master), the accounts the packages of the built-in
# image and of common cloud images create, and every name in the system-account conventions
# `_name` and `systemd-name`.
RULE_USER = "ssh.user is no system account"
_SYSTEM_USERS = frozenset((
    # base-passwd 3.6 (Debian 12) passwd.master and group.master
    "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data", "backup",
    "list", "irc", "gnats", "nobody", "adm", "tty", "disk", "kmem", "dialout", "fax", "voice", "cdrom", "floppy",
    "tape", "sudo", "audio", "dip", "operator", "src", "shadow", "utmp", "video", "sasl", "plugdev", "staff",
    "users", "nogroup",
    # made by packages: openssh-server, dbus, systemd, polkitd, tpm2, uuid-runtime, rpcbind, nfs, exim,
    # dnsmasq, rsyslog, ntp, postfix, chrony, qemu-guest-agent's and cloud images' usual extras
    "sshd", "messagebus", "polkitd", "tss", "uuidd", "statd", "Debian-exim", "dnsmasq", "syslog", "ntp", "ntpsec",
    "postfix", "tcpdump", "avahi", "colord", "usbmux", "landscape", "pollinate", "lxd", "dhcpcd", "libvirt-qemu",
    "libvirt-dnsmasq", "nvmprov-seed",
))


def _check_user(value: str) -> str:
    _regex_checker(_USER_RE, "user", "use a Linux user name: a-z, 0-9, '_' or '-', up to 32")(value)
    if value == "root":
        raise ValueError("user 'root' is not allowed; nvmprov makes its own login user with sudo, e.g. nvmprov")
    if value in _SYSTEM_USERS or value.startswith(("_", "systemd-")):
        raise _TrustRule(RULE_USER, f"user {value!r} is a system account (Debian's base-passwd reserves it, or a "
                         "package makes it) and would get a login key and sudo; use a user of its own, e.g. nvmprov")
    return value


# ---------------------------------------------------------------------------------------------
# models


class _Problem(ValueError):
    """A cross-field problem that points at a field below the model that found it."""

    def __init__(self, message: str, *loc: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc


# Built at the end of the models, by _build_models (defer_build: not one by one as each class is made).
_CONFIG = ConfigDict(extra="forbid", strict=True, defer_build=True)

GuestName = Annotated[str, AfterValidator(_name_checker("name", GUEST_NAME_MAX))]
RegionName = Annotated[str, AfterValidator(_name_checker("name", REGION_NAME_MAX))]
PoolName = Annotated[str, AfterValidator(_regex_checker(_POOL_RE, "name", "use letters, digits, '_', '.', '-'"))]


def _check_volume(value: str | None) -> str | None:
    """An existing volume of the guest's pool that a region adopts (a name in the pool, no path)."""
    if value is None:
        return None
    _regex_checker(_VOLUME_RE, "volume", "name a volume of the pool: letters, digits, '_', '.', '+', '-'")(value)
    if value.startswith("nvmprov-"):
        raise ValueError(f"volume {value!r}: names starting with nvmprov- are nvmprov's own (image, ledger); "
                         "name another volume")
    return value


class SshSpec(BaseModel):
    model_config = _CONFIG
    user: Annotated[str, AfterValidator(_lenient(_check_user))] = "nvmprov"


class NetworkSpec(BaseModel):
    model_config = _CONFIG
    mode: Literal["user", "network"] = "user"
    outbound: bool = False
    name: PoolName | None = None

    @model_validator(mode="after")
    def _mode_rules(self) -> NetworkSpec:
        if self.mode == "network" and self.name is None:
            raise _Problem("mode: network needs the libvirt network's name; add name: <network>", "name")
        if self.mode == "user" and self.name is not None:
            raise _Problem("name is only used with mode: network; remove it or set mode: network", "name")
        if self.mode == "network" and self.outbound:
            raise _Problem("outbound only applies to mode: user; remove it", "outbound")
        return self


class HotplugSpec(BaseModel):
    model_config = _CONFIG
    slots: int = Field(4, ge=0, le=255)
    headroom_bytes: Annotated[int, BeforeValidator(_size("headroom", allow_zero=True)), _Ser] = Field(
        8 * GiB, alias="headroom"
    )


class TimeoutsSpec(BaseModel):
    model_config = _CONFIG
    boot_s: int = Field(600, ge=1, le=86_400)
    ssh_s: int = Field(600, ge=1, le=86_400)


class _DevdaxAlign:
    """A devdax alignment, shared by a region and a namespace of a split region: the default
    (2MiB) is not written out, and devdax_align_bytes gives the effective one."""

    if TYPE_CHECKING:  # the fields of the models that use it (not pydantic fields of its own)
        mode: str | None
        align_bytes: int | None

    @property
    def devdax_align_bytes(self) -> int | None:
        return (self.align_bytes or DEFAULT_DEVDAX_ALIGN) if self.mode == "devdax" else None

    def _leave_default_align_unwritten(self) -> None:
        if self.mode == "devdax" and self.align_bytes == DEFAULT_DEVDAX_ALIGN:
            self.align_bytes = None


class NamespaceSpec(_DevdaxAlign, BaseModel):
    """One namespace of a labelled region split in several (`namespaces:`, issue 19). Each follows
    the rules of a region of its mode; its size must fit the region (GuestSpec checks the sum)."""

    model_config = _CONFIG
    name: RegionName
    size_bytes: Annotated[int, BeforeValidator(_size("size", minimum=LABELLED_NS_ALIGN_BYTES)), _Ser] = Field(
        alias="size"
    )
    mode: Literal["fsdax", "devdax", "sector", "raw"] = "fsdax"
    align_bytes: Annotated[int | None, BeforeValidator(_optional_size("align")), _OptSer] = Field(None, alias="align")
    # None: ext4, or none for devdax
    filesystem: Literal["ext4", "xfs", "none"] | None = None
    # None: /mnt/REGION-NAME, set by the region (it knows its own name)
    mount: Annotated[str | None, AfterValidator(_lenient(_check_mount))] = None

    @model_validator(mode="after")
    def _namespace_rules(self) -> NamespaceSpec:
        if self.size_bytes % LABELLED_NS_ALIGN_BYTES:
            down, up = align_down(self.size_bytes, LABELLED_NS_ALIGN_BYTES), round_up(self.size_bytes,
                                                                                      LABELLED_NS_ALIGN_BYTES)
            raise _Problem(f"size {format_size(self.size_bytes)} is not a multiple of "
                           f"{format_size(LABELLED_NS_ALIGN_BYTES)}, the alignment of a labelled region's namespaces "
                           f"(ndctl refuses it as misaligned); use {format_size(up)} or {format_size(down)}", "size")
        if self.mode == "devdax" and self.filesystem not in (None, "none"):
            raise _Problem(f"devdax is a character device (/dev/daxN.M) and takes no filesystem, not "
                           f"{self.filesystem}; remove filesystem, or use mode: fsdax for a DAX filesystem",
                           "filesystem")
        _check_align(self.align_bytes, self.mode)
        if self.filesystem is None:
            self.filesystem = "none" if self.mode == "devdax" else "ext4"
        if self.filesystem == "none" and self.mount is not None:
            fix = "use mode: fsdax" if self.mode == "devdax" else "set filesystem: ext4"
            raise _Problem(f"a namespace without a filesystem cannot be mounted; remove mount or {fix}", "mount")
        usable = namespace_usable_bytes(self.size_bytes, self.mode)
        if self.filesystem == "xfs" and usable < XFS_MIN_USABLE_BYTES:
            size = LABELLED_NS_ALIGN_BYTES
            while namespace_usable_bytes(size, self.mode) < XFS_MIN_USABLE_BYTES:
                size += LABELLED_NS_ALIGN_BYTES
            raise _Problem(f"xfs needs at least 300MiB but a {format_size(self.size_bytes)} {self.mode} namespace "
                           f"leaves {usable} bytes usable; use size >= {format_size(size)} or filesystem: ext4",
                           "filesystem")
        self._leave_default_align_unwritten()
        return self


def _check_align(align_bytes: int | None, mode: str) -> None:
    """align: devdax only, one of DEVDAX_ALIGNS (a region's and a namespace's rule alike)."""
    if align_bytes is None:
        return
    align = format_size(align_bytes)
    if mode != "devdax":
        raise _Problem(f"align is for mode: devdax only (nvmprov makes {mode} with the kernel's "
                       "alignment); remove align, or set mode: devdax", "align")
    if align_bytes == GiB:
        raise _Problem("align 1GiB needs 1GiB pages (pdpe1gb), which the guest CPU nvmprov uses under TCG "
                       "(Nehalem) does not offer, and a region of more than 1GiB; use align: 2MiB or 4KiB",
                       "align")
    if align_bytes not in DEVDAX_ALIGNS:
        raise _Problem(f"align {align} is not one a devdax namespace takes; use 2MiB (the default) or 4KiB",
                       "align")


class RegionSpec(_DevdaxAlign, BaseModel):
    model_config = _CONFIG
    name: RegionName
    size_bytes: Annotated[int, BeforeValidator(_size("size", minimum=MIN_REGION_BYTES)), _Ser] = Field(
        alias="size"
    )
    model: Literal["nvdimm", "virtio-pmem", "cxl"] = "nvdimm"
    label_bytes: Annotated[
        int | None, BeforeValidator(_optional_size("label", minimum=MIN_LABEL_BYTES, multiple=LABEL_MULTIPLE_BYTES)),
        _OptSer,
    ] = Field(None, alias="label")
    allocation: Literal["full", "sparse"] = "full"
    readonly: bool = False
    host_pmem: bool = False
    # None: the default, fsdax (raw when readonly); a value equal to the default is stored as None,
    # so specs written before modes existed keep their digest (see GuestSpec.canonical).
    mode: Literal["fsdax", "devdax", "sector", "raw"] | None = None
    align_bytes: Annotated[int | None, BeforeValidator(_optional_size("align")), _OptSer] = Field(None, alias="align")
    # None: ext4, or none for devdax (a character device takes no filesystem)
    filesystem: Literal["ext4", "xfs", "none"] | None = None
    mount: Annotated[str | None, AfterValidator(_lenient(_check_mount))] = None
    # An existing volume of the pool to use as the backing (adopt): nvmprov never deletes it unless
    # told to (destroy/detach --purge-adopted). None: nvmprov makes and owns GUEST-pmem-REGION.raw.
    volume: Annotated[str | None, AfterValidator(_check_volume)] = None
    # The guest NUMA node the region sits on (nvdimm <target><node>); < the guest's numa_nodes.
    numa_node: int = Field(0, ge=0, le=MAX_NUMA_NODES - 1)
    # A labelled nvdimm split into several namespaces (issue 19); None: one namespace, the region's keys.
    namespaces: list[NamespaceSpec] | None = None

    @property
    def namespace_mode(self) -> str | None:
        """The namespace mode nvmprov makes (None: virtio-pmem, which has no namespaces to choose)."""
        if self.model == "virtio-pmem":
            return None
        return self.mode or ("raw" if self.readonly else "fsdax")

    @model_validator(mode="after")
    def _region_rules(self) -> RegionSpec:
        self._check_model_rules()
        self._check_label()
        if self.namespaces is not None:
            self._check_namespaces()
            return self
        self._check_mode()
        if self.filesystem is None:
            self.filesystem = "none" if self.mode == "devdax" else "ext4"
        self._check_filesystem()
        if self.filesystem != "none" and self.mount is None:
            self.mount = f"/mnt/{self.name}"
        if self.mode == ("raw" if self.readonly else "fsdax"):
            self.mode = None  # the default, written out
        self._leave_default_align_unwritten()
        return self

    def _check_mode(self) -> None:
        """Modes and alignments a region can take (docs/spec.md, "Namespace modes")."""
        if self.model == "virtio-pmem":
            for key in ("mode", "align"):
                if getattr(self, "align_bytes" if key == "align" else key) is not None:
                    raise _Problem(f"{key} is for nvdimm only: virtio-pmem has no namespaces to choose from (the guest "
                                   "sees one pmem device: DAX, but no MAP_SYNC); remove it or use model: nvdimm", key)
            return
        if self.readonly and self.mode not in (None, "raw"):
            raise _Problem(f"a readonly region cannot be made {self.mode} (creating the namespace writes its info "
                           "block); use mode: raw (or remove mode), or readonly: false", "mode")
        if self.mode == "devdax" and self.filesystem not in (None, "none"):
            raise _Problem(f"devdax is a character device (/dev/daxN.M) and takes no filesystem, not "
                           f"{self.filesystem}; remove filesystem, or use mode: fsdax for a DAX filesystem",
                           "filesystem")
        _check_align(self.align_bytes, self.namespace_mode or "fsdax")

    def _check_namespaces(self) -> None:
        """A split region: labelled nvdimm, written, its own keys left to the namespaces; they fit."""
        if self.model != "nvdimm" or self.label_bytes is None or self.readonly:
            why = ("virtio-pmem has no namespaces to choose from" if self.model == "virtio-pmem" else
                   "splitting a CXL region is not measured here" if self.model == "cxl" else
                   "a readonly region cannot be written (namespaces live in its labels)" if self.readonly else
                   "namespaces are kept in the region's label area and a label-less region has one namespace")
            fix = ("use model: nvdimm with label: 128KiB" if self.model != "nvdimm" else
                   "remove readonly" if self.readonly else "add label: 128KiB")
            raise _Problem(f"only a labelled, writable nvdimm can be split into namespaces: {why}; {fix}",
                           "namespaces")
        # filesystem: none is what the region itself holds (the recorded spec says so): not refused
        for key, value in (("mode", self.mode), ("align", self.align_bytes),
                           ("filesystem", None if self.filesystem == "none" else self.filesystem),
                           ("mount", self.mount)):
            if value is not None:
                raise _Problem(f"{key} belongs to each namespace of a split region; move it into its namespace "
                               "(namespaces: [{name: ..., size: ..., " + key + ": ...}])", key)
        if not 1 <= len(self.namespaces or ()) <= MAX_NAMESPACES:
            raise _Problem(f"give 1 to {MAX_NAMESPACES} namespaces, not {len(self.namespaces or ())}", "namespaces")
        self.filesystem = "none"  # the region itself holds none: its namespaces do
        names: dict[str, int] = {}
        for i, ns in enumerate(self.namespaces or ()):
            if ns.name in names:
                raise _Problem(f"namespace name {ns.name!r} is used twice (also namespaces[{names[ns.name]}]); "
                               "give each namespace its own name", "namespaces", i, "name")
            names[ns.name] = i
            if ns.filesystem != "none" and ns.mount is None:
                ns.mount = f"/mnt/{self.name}-{ns.name}"
        self._check_namespaces_fit()

    def _check_namespaces_fit(self) -> None:
        """The sizes must fit what the region offers after its label and the 16MiB alignment
        (measured: 512MiB with a 128KiB label -> a 510MiB region, 496MiB available)."""
        sizes = [ns.size_bytes for ns in self.namespaces or ()]
        label = round_up(self.label_bytes or 0, DIMM_ALIGN_BYTES)
        available = labelled_available_bytes(backing_bytes_for(self.size_bytes), label)
        if sum(sizes) <= available:
            return
        fix = f"use size: {format_size(sum(sizes) + label)}"
        last = available - sum(sizes[:-1])
        if last >= LABELLED_NS_ALIGN_BYTES:
            fix += f" or make the last namespace {format_size(last)}"
        raise _Problem(f"the namespaces take {format_size(sum(sizes))} but the {format_size(self.size_bytes)} region "
                       f"offers {format_size(available)} after its {format_size(label)} label and the "
                       f"{format_size(LABELLED_NS_ALIGN_BYTES)} alignment; {fix}", "namespaces")

    def _check_model_rules(self) -> None:
        if self.model == "cxl":
            self._check_cxl()
            return
        if self.model != "virtio-pmem":
            return
        if self.label_bytes is not None:
            raise _Problem("label is for nvdimm only; remove it or use model: nvdimm", "label")
        if self.readonly:
            raise _Problem("readonly is for nvdimm only (libvirt has no read-only virtio-pmem); use model: nvdimm",
                           "readonly")
        if self.host_pmem:
            raise _Problem("host_pmem is for nvdimm only; use model: nvdimm", "host_pmem")
        if self.numa_node != 0:
            # libvirt 9.0 refuses <target><node> on virtio-pmem ("virtio-pmem does not support NUMA
            # nodes", measured with virsh define) and QEMU 7.2's virtio-pmem-pci has no node property.
            raise _Problem("only an nvdimm takes a NUMA node: libvirt 9.0 refuses a NUMA node on virtio-pmem "
                           "('virtio-pmem does not support NUMA nodes'; QEMU 7.2's virtio-pmem-pci has none); "
                           "remove numa_node or use model: nvdimm", "numa_node")

    def _check_cxl(self) -> None:
        """What a CXL pmem region cannot be on this stack (QEMU 7.2 cxl-type3, guest kernel 6.1)."""
        if self.size_bytes % CXL_GRANULE_BYTES:
            raise _Problem(f"size {format_size(self.size_bytes)} is not a multiple of 256MiB: a CXL memory device "
                           "reports its capacity in 256MiB units (a 384MiB one shows no memdev in the guest); use "
                           f"size: {format_size(round_up(self.size_bytes, CXL_GRANULE_BYTES))}", "size")
        refusals = (
            ("readonly", self.readonly, "QEMU 7.2's cxl-type3 has no read-only mode; remove readonly or use model: "
             "nvdimm"),
            ("label", self.label_bytes is not None, "a CXL device keeps its labels in its own label storage area "
             "(a 1MiB volume nvmprov makes beside the backing); remove label"),
            ("host_pmem", self.host_pmem, "QEMU 7.2's cxl-type3 has no pmem=on (that is an nvdimm's, on real host "
             "pmem); remove host_pmem or use model: nvdimm"),
            ("numa_node", self.numa_node != 0, "the CXL window's node comes from the firmware's CEDT, not from "
             "the spec; remove numa_node or use model: nvdimm"),
            ("volume", self.volume is not None, "a CXL region's volumes are named on QEMU's command line, which "
             "libvirt neither chowns nor labels, so nvmprov makes them owned by QEMU's user and cannot adopt a "
             "volume made elsewhere; remove volume"),
            ("mode", self.mode not in (None, "fsdax"), f"mode {self.mode} on CXL is not measured here (fsdax is); "
             "remove mode or use model: nvdimm"),
        )
        for key, refused, why in refusals:
            if refused:
                raise _Problem(why, key)

    def _check_label(self) -> None:
        if self.label_bytes is None:
            return
        size, label = format_size(self.size_bytes), format_size(self.label_bytes)
        if self.label_bytes >= self.size_bytes:
            fix = "use 128KiB"  # ... and a size that leaves a whole region beside it (a hint must be right)
            if self.size_bytes - MIN_LABEL_BYTES < MIN_REGION_BYTES:
                fix += f" with size >= {format_size(MIN_REGION_BYTES + MIN_LABEL_BYTES)}"
            raise _Problem(f"label {label} is not smaller than size {size}; the label is carved out of the region: "
                           f"{fix}", "label")
        if self.size_bytes - self.label_bytes < MIN_REGION_BYTES:
            fix = f"use size >= {format_size(self.label_bytes + MIN_REGION_BYTES)}"
            if self.label_bytes > MIN_LABEL_BYTES:
                fix += f" or a label of {format_size(MIN_LABEL_BYTES)}"
            raise _Problem(f"label {label} leaves less than {format_size(MIN_REGION_BYTES)} of the {size} region; "
                           f"{fix}", "label")

    def _check_filesystem(self) -> None:
        if self.readonly and self.filesystem != "none":
            raise _Problem(f"a readonly region cannot be formatted with {self.filesystem}; "
                           "set filesystem: none (or readonly: false)", "readonly")
        if self.filesystem == "none" and self.mount is not None:
            fix = "use mode: fsdax" if self.mode == "devdax" else "set filesystem: ext4"
            raise _Problem(f"a region without a filesystem cannot be mounted; remove mount or {fix}", "mount")
        if self.filesystem == "xfs":
            usable = _usable(self.model, self.size_bytes, self.label_bytes, self.namespace_mode)
            if usable < XFS_MIN_USABLE_BYTES:
                raise _Problem(
                    f"xfs needs at least 300MiB but a {format_size(self.size_bytes)} {self.model} region "
                    f"leaves {usable} bytes usable; use size >= {format_size(_min_size_for_xfs(self))} "
                    "or filesystem: ext4", "filesystem")


def _usable(model: str, size_bytes: int, label_bytes: int | None, mode: str | None = None) -> int:
    return expected_usable_bytes(model, backing_bytes_for(size_bytes), label_bytes,  # type: ignore[arg-type]
                                 mode=mode)


def _display_loc(loc: tuple[str | int, ...]) -> str:
    """("pmem", 0, "namespaces", 1) -> pmem[0].namespaces[1]"""
    text = ""
    for part in loc:
        text = _join(text, part)
    return text


def _min_size_for_xfs(region: RegionSpec) -> int:
    size = round_up(XFS_MIN_USABLE_BYTES, 2 * MiB)
    while _usable(region.model, size, region.label_bytes, region.namespace_mode) < XFS_MIN_USABLE_BYTES:
        size += 2 * MiB
    return size


_ADDED_REGION_KEYS = ("mode", "align", "volume", "namespaces")  # issues 17, 15 and 19


class GuestSpec(BaseModel):
    """One guest, fully defaulted. YAML keys are the aliases (memory, disk, size, ...)."""

    model_config = _CONFIG
    name: GuestName
    memory_bytes: Annotated[int, BeforeValidator(_size("memory", minimum=MIN_MEMORY_BYTES, multiple=MiB)), _Ser] = (
        Field(1 * GiB, alias="memory")
    )
    # One vCPU: TCG runs each vCPU as a host thread and these CI hosts have 2 cores for several guests.
    vcpus: int = Field(1, ge=1, le=64)
    # Guest NUMA nodes; RAM and vCPUs are spread over them by numa_layout() (docs/spec.md).
    numa_nodes: int = Field(1, ge=1, le=MAX_NUMA_NODES)
    disk_bytes: Annotated[int, BeforeValidator(_size("disk", minimum=MIN_DISK_BYTES, multiple=MiB)), _Ser] = Field(
        8 * GiB, alias="disk"
    )
    image: Annotated[str, AfterValidator(_check_image)] = "builtin"
    firmware: Literal["auto", "direct", "bios", "efi"] = "auto"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    connect: Annotated[str, AfterValidator(_lenient(check_connect))] = "qemu:///system"
    pool: PoolName = "nvmprov"
    ssh: SshSpec = Field(default_factory=SshSpec)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    hotplug: HotplugSpec = Field(default_factory=lambda: HotplugSpec.model_validate({}))
    timeouts: TimeoutsSpec = Field(default_factory=lambda: TimeoutsSpec.model_validate({}))
    pmem: list[RegionSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _guest_rules(self, info: ValidationInfo) -> GuestSpec:
        if self.firmware == "direct" and self.image != "builtin":
            raise _Problem("direct kernel boot needs image: builtin (a user image boots its own kernel); "
                           "use firmware: auto, bios or efi", "firmware")
        self._check_regions()
        self._check_numa()
        self._check_home_mounts(_recorded_warnings(info))
        return self

    def _check_numa(self) -> None:
        """The rule of numa_layout() must be able to place the RAM; each region on an existing node."""
        n = self.numa_nodes
        if n > 1:
            share, align = self.memory_bytes // n, NUMA_NODE_RAM_ALIGN_BYTES
            if self.memory_bytes % (n * align) or share < MIN_NUMA_NODE_RAM_BYTES:
                fix = max(round_up(self.memory_bytes, n * align), n * MIN_NUMA_NODE_RAM_BYTES)
                raise _Problem(
                    f"{n} nodes cannot share memory {format_size(self.memory_bytes)}: each node takes an equal "
                    f"share in whole {format_size(align)} blocks and at least {format_size(MIN_NUMA_NODE_RAM_BYTES)}; "
                    f"use memory: {format_size(fix)} or fewer numa_nodes", "numa_nodes")
        for i, r in enumerate(self.pmem):
            if r.numa_node >= n:
                raise _Problem(f"numa_node {r.numa_node} does not exist: the guest has numa_nodes: {n} "
                               f"(nodes 0..{n - 1}); use numa_node: {n - 1} or numa_nodes: {r.numa_node + 1}",
                               "pmem", i, "numa_node")

    def _check_home_mounts(self, warnings: list[str] | None) -> None:
        """RULE_MOUNT for the login user's home: nvmprov logs in with the key kept there."""
        home = f"/home/{self.ssh.user}"
        for mount, loc in self._mounts():
            if not _under(mount, home):
                continue
            message = (f"mount {mount!r} is the login user's home ({home}) or in it; a filesystem there hides "
                       "its .ssh/authorized_keys and nvmprov cannot log in after the next boot; "
                       "use a directory of its own, e.g. /mnt/data")
            if warnings is None:
                raise _Problem(message, *loc)
            warnings.append(f"{RULE_MOUNT!r}: {message}")

    def _mounts(self) -> Iterator[tuple[str, tuple[str | int, ...]]]:
        """Every mount point of the guest (regions' and their namespaces'), with where it is written."""
        for i, r in enumerate(self.pmem):
            if r.mount is not None:
                yield r.mount, ("pmem", i, "mount")
            for j, ns in enumerate(r.namespaces or ()):
                if ns.mount is not None:
                    yield ns.mount, ("pmem", i, "namespaces", j, "mount")

    def _check_regions(self) -> None:
        names: dict[str, int] = {}
        mounts: dict[str, str] = {}
        volumes: dict[str, int] = {}
        for i, r in enumerate(self.pmem):
            if r.name in names:
                raise _Problem(f"region name {r.name!r} is used twice (also pmem[{names[r.name]}]); "
                               "give each region its own name", "pmem", i, "name")
            names[r.name] = i
            volume = self.volume_of(r)
            if volume in (f"{self.name}-root.qcow2", f"{self.name}-seed.iso"):
                raise _Problem(f"{volume!r} is this guest's own root disk or seed; name another volume",
                               "pmem", i, "volume")
            if volume in volumes:
                raise _Problem(f"volume {volume!r} is also the backing of pmem[{volumes[volume]}]; a volume backs one "
                               "region: name another volume", "pmem", i, "volume")
            volumes[volume] = i
        self._check_cxl_regions()
        for mount, loc in self._mounts():
            for other, where in mounts.items():
                if other == mount:
                    raise _Problem(f"mount {mount!r} is used twice (also {where}); give each region its own", *loc)
                if mount.startswith(other + "/") or other.startswith(mount + "/"):
                    raise _Problem(f"mount {mount!r} nests with {other!r} of {where}; use separate directories", *loc)
            mounts[mount] = _display_loc(loc[:-1])
        n_virtio = sum(1 for r in self.pmem if r.model == "virtio-pmem")
        if n_virtio > MAX_VIRTIO_PMEM:
            raise _Problem(f"{n_virtio} virtio-pmem regions; at most {MAX_VIRTIO_PMEM} fit (one PCIe port each)",
                           "pmem")
        total = len(self.pmem) + self.hotplug.slots
        if len(self.pmem) > MAX_MEMORY_SLOTS:
            raise _Problem(f"{len(self.pmem)} regions; QEMU allows {MAX_MEMORY_SLOTS} memory slots: use at most "
                           f"{MAX_MEMORY_SLOTS} regions, with hotplug: {{slots: 0}}", "pmem")
        if total > MAX_MEMORY_SLOTS:
            raise _Problem(f"{len(self.pmem)} regions + {self.hotplug.slots} hotplug slots = {total} memory slots; "
                           f"QEMU allows {MAX_MEMORY_SLOTS}: use slots <= {MAX_MEMORY_SLOTS - len(self.pmem)}",
                           "hotplug", "slots")

    def _check_cxl_regions(self) -> None:
        cxl = [i for i, r in enumerate(self.pmem) if r.model == "cxl"]
        if len(cxl) > MAX_CXL_REGIONS:
            raise _Problem(f"{len(cxl)} cxl regions; one per guest is what is measured here (one type-3 device "
                           "behind a host bridge with two root ports): keep one, make the others nvdimm",
                           "pmem", cxl[MAX_CXL_REGIONS], "model")
        if cxl and self.accel == "kvm":
            raise _Problem("accel: kvm with a cxl region is unmeasured here (this host has no usable KVM; QEMU may "
                           "emulate CXL memory as I/O memory, which KVM cannot map into the guest); use accel: "
                           "auto (it picks tcg for a CXL guest) or tcg", "accel")

    def volume_of(self, region: RegionSpec) -> str:
        """The backing volume's name: the adopted `volume:`, else nvmprov's own (naming.py)."""
        return region.volume or backing_volume(self.name, region.name)

    def canonical(self) -> dict[str, Any]:
        """The fully-defaulted guest as JSON-able data (sizes as canonical strings such as 1GiB).

        Region keys added after guests were made (mode, align, volume) are left out at their default,
        so a guest made before them keeps its digest and a re-run does not call its spec changed."""
        data = self.model_dump(mode="json", by_alias=True)
        # Keys at their defaults that older guests never had: their digests stay the same.
        if data.get("numa_nodes") == 1:
            data.pop("numa_nodes")
        for region in data["pmem"]:
            for key in _ADDED_REGION_KEYS:
                if region.get(key) is None:
                    region.pop(key, None)
            if region.get("numa_node") == 0:  # issue 19: left out at its default, likewise
                region.pop("numa_node")
        return data

    def digest(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def diff(self, other: GuestSpec) -> list[str]:
        """Dotted YAML paths (pmem[0].size) whose values differ between the two guests."""
        mine, theirs = dict(_flatten(self.canonical())), dict(_flatten(other.canonical()))
        keys = sorted(set(mine) | set(theirs), key=_path_sort_key)
        return [k for k in keys if mine.get(k, _MISSING) != theirs.get(k, _MISSING)]


def _build_models() -> None:
    from .speedups import no_pydantic_plugins

    with no_pydantic_plugins():
        for model in (SshSpec, NetworkSpec, HotplugSpec, TimeoutsSpec, NamespaceSpec, RegionSpec, GuestSpec):
            model.model_rebuild()


_build_models()

_MISSING = object()


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _path_sort_key(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", path) if p]


@dataclass
class SpecFile:
    path: str
    guests: list[GuestSpec]

    def guest(self, name: str | None = None) -> GuestSpec:
        """The named guest; without a name, the only one. UsageError names the choices."""
        names = ", ".join(g.name for g in self.guests)
        if name is None:
            if len(self.guests) == 1:
                return self.guests[0]
            raise UsageError(f"{self.path} holds {len(self.guests)} guests ({names}); pick one with --guest NAME")
        for g in self.guests:
            if g.name == name:
                return g
        raise UsageError(f"no guest {name!r} in {self.path}; it holds: {names}")


# ---------------------------------------------------------------------------------------------
# YAML with positions

Path_ = tuple[str | int, ...]
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}


@dataclass(frozen=True)
class _Pos:
    line: int      # 1-based
    col: int       # 1-based
    field: str     # display path, e.g. guests[1].pmem[0].size or defaults.memory


@dataclass
class _Positions:
    """Where each value (and each key) of the loaded data was written."""

    values: dict[Path_, _Pos] = field(default_factory=dict)
    keys: dict[Path_, _Pos] = field(default_factory=dict)

    def sub(self, prefix: Path_) -> _Positions:
        n = len(prefix)
        return _Positions(
            {p[n:]: v for p, v in self.values.items() if p[:n] == prefix},
            {p[n:]: v for p, v in self.keys.items() if p[:n] == prefix},
        )

    def copy_under(self, src: _Positions, prefix: Path_) -> None:
        n = len(prefix)
        self.values.update({p: v for p, v in src.values.items() if p[:n] == prefix})
        self.keys.update({p: v for p, v in src.keys.items() if p[:n] == prefix})


class _YamlProblem(Exception):
    def __init__(self, message: str, mark: yaml.Mark, field_path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark
        self.field = field_path


class _Loader(yaml.SafeLoader):
    """Composes nodes only (nothing is constructed), refusing anchors and aliases: they are the
    billion-laughs vector and nothing in a guest file needs them. Keeps the display path of the
    node being composed (pmem[0].size), so its refusals name the field like every other error."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.node_count = 0
        self.paths: list[str] = []   # display path of each node being composed, outermost first

    def _path_of(self, parent: yaml.Node | None, index: Any, event: yaml.Event) -> str:
        # PyYAML's composer passes (None, None) for the root, (seq, i) for items, (map, None) for a
        # key and (map, key_node) for its value.
        if parent is None or not self.paths:
            return ""
        base = self.paths[-1]
        if isinstance(index, int):
            return _join(base, index)
        if isinstance(index, yaml.ScalarNode):
            return _join(base, index.value)
        if index is None and isinstance(event, yaml.ScalarEvent):
            return _join(base, event.value)   # a key: its own name
        return base

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        mark: Any = event.start_mark
        here = self._path_of(parent, index, event)
        if isinstance(event, yaml.AliasEvent):
            raise _YamlProblem(f"YAML aliases (*{event.anchor}) are not allowed; write the value out", mark, here)
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _YamlProblem(f"YAML anchors (&{anchor}) are not allowed; write the value out", mark, here)
        self.node_count += 1
        if self.node_count > MAX_YAML_NODES:
            raise _YamlProblem(f"more than {MAX_YAML_NODES} YAML values; a guest file is far smaller", mark, here)
        # PyYAML composes recursively: "[[[[..." thousands deep was a RecursionError traceback.
        if len(self.paths) >= MAX_YAML_DEPTH:
            raise _YamlProblem(f"YAML nested more than {MAX_YAML_DEPTH} levels deep; a guest file needs a few",
                               mark, here)
        self.paths.append(here)
        try:
            return super().compose_node(parent, index)
        finally:
            self.paths.pop()


def _pos(mark: yaml.Mark, display: str) -> _Pos:
    return _Pos(mark.line + 1, mark.column + 1, display)


def _join(display: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{display}[{key}]"
    return f"{display}.{key}" if display else key


def _convert(node: yaml.Node, path: Path_, display: str, pos: _Positions) -> Any:
    """Plain Python data from a composed node, recording where each value sits."""
    pos.values[path] = _pos(node.start_mark, display)
    if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
        return _convert_mapping(node, path, display, pos)
    if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
        return [_convert(item, (*path, i), _join(display, i), pos) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
        if node.tag == _TAG + "int" and len(node.value.strip("+-_ ").lstrip("0")) > MAX_SIZE_DIGITS:
            # Python refuses to make an int of 4300+ digits (a ValueError traceback, exit 1, once)
            raise _YamlProblem(f"a whole number of {len(node.value)} characters is far too large; numbers here "
                               f"have at most {MAX_SIZE_DIGITS} digits (see docs/spec.md for this key's range)",
                               node.start_mark, display)
        try:
            return yaml.constructor.SafeConstructor().construct_object(node)
        except (ValueError, OverflowError, yaml.constructor.ConstructorError):
            raise _YamlProblem("this value cannot be read as a number, true/false or text; quote it if it is text",
                               node.start_mark, display) from None
    raise _YamlProblem(f"YAML tag {node.tag} is not allowed; nvmprov reads plain values only", node.start_mark,
                       display)


def _convert_mapping(node: yaml.MappingNode, path: Path_, display: str, pos: _Positions) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key_node, value_node in node.value:
        written = _join(display, key_node.value) if isinstance(key_node, yaml.ScalarNode) else display
        if key_node.tag == _TAG + "merge":
            raise _YamlProblem("YAML merge keys (<<) are not allowed; write the keys out", key_node.start_mark,
                               written)
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _TAG + "str"):
            raise _YamlProblem("keys must be plain names such as memory or pmem; quote it if it is one",
                               key_node.start_mark, written)
        key = key_node.value
        if key in result:
            first = pos.keys[(*path, key)]
            raise _YamlProblem(f"duplicate key {key!r} (first at line {first.line}); keep one",
                               key_node.start_mark, written)
        pos.keys[(*path, key)] = _pos(key_node.start_mark, _join(display, key))
        result[key] = _convert(value_node, (*path, key), _join(display, key), pos)
    return result


def _compose(text: str, filename: str) -> yaml.Node | None:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)   # the reader checks characters already here
        return loader.get_single_node()
    except _YamlProblem as p:
        raise SpecError(p.message, file=filename, line=p.mark.line + 1, col=p.mark.column + 1,
                        field=p.field or None) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(s for s in (e.context, e.problem) if s)
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise SpecError(f"not valid YAML: {what}; check the indentation and quoting there",
                        file=filename, line=line, col=col) from None
    except yaml.reader.ReaderError as e:
        line, col = _line_col(text, e.position)
        raise SpecError(f"character {_show_char(chr(e.character))} is not allowed in YAML; remove it",
                        file=filename, line=line, col=col) from None
    finally:
        if loader is not None:
            loader.dispose()


def _line_col(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


# ---------------------------------------------------------------------------------------------
# loading


STDIN = "-"              # `nvmprov validate -`: the spec on standard input
STDIN_NAME = "<stdin>"   # how errors name it


def load(path: str | Path, *, stdin: BinaryIO | None = None) -> SpecFile:
    """Read and validate a guest file (`-`: standard input); every failure is one SpecError naming
    the file. A spec is untrusted input: only a regular file or standard input is read, never more
    than MAX_FILE_BYTES of it, and a FIFO, device or directory is refused without opening it."""
    if str(path) == STDIN:
        name = STDIN_NAME
        data = _read_capped(stdin if stdin is not None else sys.stdin.buffer, name)
    else:
        name = str(path)
        data = _read_regular(name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8")  # the bytes before the first bad one are valid UTF-8
        line, col = _line_col(before, len(before))
        raise SpecError(f"is not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8", file=name, line=line,
                        col=col) from None
    return loads(text, filename=name)


def _read_regular(name: str) -> bytes:
    """The bytes of the regular file NAME (links followed), refused before reading when it is
    something else or larger than MAX_FILE_BYTES; never blocks (a FIFO is never opened)."""
    try:
        before = os.stat(name)
    except FileNotFoundError:
        raise SpecError("no such file; check the path", file=name) from None
    except OSError as e:
        raise SpecError(f"cannot read it ({e.strerror}); check the path and its permissions", file=name) from None
    if not stat.S_ISREG(before.st_mode):
        raise SpecError(f"is {file_kind(before.st_mode)}, not a regular file; give a guest YAML file, or - to read "
                        "it from standard input", file=name)
    if before.st_size > MAX_FILE_BYTES:
        raise SpecError(f"is {before.st_size} bytes; a guest file is at most {MAX_FILE_BYTES}", file=name)
    try:
        # O_NONBLOCK: had NAME become a FIFO since the stat, opening it would wait for a writer
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise SpecError(f"cannot read it ({e.strerror}); check its permissions", file=name) from None
    with os.fdopen(fd, "rb") as fh:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise SpecError("changed while being opened; give a guest YAML file that stays put", file=name)
        return _read_capped(fh, name)


def _read_capped(stream: BinaryIO, name: str) -> bytes:
    """At most MAX_FILE_BYTES from STREAM; one byte more is refused (a pipe is read up to the cap)."""
    try:
        data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read it ({e.strerror})", file=name) from None
    if data is None:  # a non-blocking stream with nothing ready
        data = b""
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(f"is more than {MAX_FILE_BYTES} bytes; a guest file is at most {MAX_FILE_BYTES}", file=name)
    return data


def load_recorded(data: object) -> tuple[GuestSpec, list[str]]:
    """The spec recorded in an existing guest's metadata. The rules added since it may have been
    made (issue 12: RULE_CONNECT, RULE_MOUNT, RULE_USER) do not refuse it: each one it breaks comes
    back as a warning naming the rule, and the guest is left as it is. Any other problem is a
    HostError (the record is damaged), never a traceback."""
    warnings: list[str] = []
    try:
        return GuestSpec.model_validate(data, context={RECORDED: warnings}), warnings
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HostError(f"the spec recorded in this guest's nvmprov metadata does not validate ({where}: "
                        f"{_message(first, (first.get('ctx') or {}).get('error'))}); recreate the guest "
                        "from its spec file") from None


def loads(text: str, filename: str = "<string>") -> SpecFile:
    node = _compose(text, filename)
    if node is None:
        raise SpecError("the file is empty; a guest needs at least name: and pmem:", file=filename, line=1, col=1)
    pos = _Positions()
    try:
        data = _convert(node, (), "", pos)
    except _YamlProblem as p:
        raise SpecError(p.message, file=filename, line=p.mark.line + 1, col=p.mark.column + 1,
                        field=p.field or None) from None
    if not isinstance(data, dict):
        raise SpecError(f"the top level must be a mapping (name: ..., pmem: ...) or a fleet (guests: [...]), "
                        f"not {_kind(data)}; write keys such as name: demo at the start of lines, "
                        "or put guests: above a list of guests",
                        file=filename, line=pos.values[()].line, col=pos.values[()].col)
    _check_version(data, pos, filename)
    if "guests" in data:
        return SpecFile(filename, _fleet(data, pos, filename))
    guest = {k: v for k, v in data.items() if k != "version"}
    return SpecFile(filename, [_validate(guest, pos, filename)])


def _fail(message: str, at: _Pos | None, filename: str, field_path: str | None = None) -> SpecError:
    if at is None:
        return SpecError(message, file=filename, field=field_path)
    return SpecError(message, file=filename, line=at.line, col=at.col, field=field_path or at.field or None)


def _check_version(data: dict[str, Any], pos: _Positions, filename: str) -> None:
    if "version" in data and (type(data["version"]) is not int or data["version"] != 1):
        raise _fail(f"unsupported version {data['version']!r}; this nvmprov reads version: 1",
                    pos.values[("version",)], filename)


_FLEET_KEYS = ("version", "defaults", "guests")


def _fleet(data: dict[str, Any], pos: _Positions, filename: str) -> list[GuestSpec]:
    for key in data:
        if key not in _FLEET_KEYS:
            hint = _suggest(key, _FLEET_KEYS)
            raise _fail(f"unknown key {key!r} in a fleet file; {hint}", pos.keys[(key,)], filename)
    guests, defaults = data["guests"], data.get("defaults", {})
    if not isinstance(guests, list):
        raise _fail(f"must be a list of guests, not {_kind(guests)}; start each guest with '- ' "
                    "(- name: a, pmem: [...])", pos.values[("guests",)], filename)
    if not guests:
        raise _fail("is empty; give at least one guest (- name: a, pmem: [...])", pos.values[("guests",)], filename)
    if not isinstance(defaults, dict):
        raise _fail(f"must be a mapping of guest keys, not {_kind(defaults)}; write the keys indented below "
                    "defaults:, e.g. memory: 1GiB", pos.values[("defaults",)], filename)
    if "name" in defaults:
        raise _fail("defaults cannot set name; each guest needs its own", pos.keys[("defaults", "name")], filename)
    result: list[GuestSpec] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(guests):
        if not isinstance(raw, dict):
            raise _fail("each guest must be a mapping (name: ..., pmem: ...)", pos.values[("guests", i)], filename)
        merged_pos = _Positions()
        merged = _merge(defaults, raw, pos.sub(("defaults",)), pos.sub(("guests", i)), merged_pos, ())
        merged_pos.values[()] = pos.values[("guests", i)]
        g = _validate(merged, merged_pos, filename)
        if g.name in seen:
            raise _fail(f"guest name {g.name!r} is used twice (also guests[{seen[g.name]}]); names must be unique",
                        pos.values[("guests", i, "name")], filename)
        seen[g.name] = i
        result.append(g)
    _check_shared_paths(result, pos, filename)
    return result


def _check_shared_paths(guests: list[GuestSpec], pos: _Positions, filename: str) -> None:
    """Two guests of one fleet must never get one file (an adopted `volume:` can name another's)."""
    where: dict[str, tuple[int, int]] = {}
    uses = []
    for i, g in enumerate(guests):
        pool_dir = pool_dir_for(g.pool, g.connect)
        for j, r in enumerate(g.pmem):
            owner = f"{g.name}/{r.name}"
            where[owner] = (i, j)
            uses.append((owner, f"{pool_dir}/{g.volume_of(r)}"))
        # the root disk and seed (plan.py names them after the guest): an adopted volume may name them
        uses += [(f"{g.name}/{part}", f"{pool_dir}/{g.name}{suffix}")
                 for part, suffix in (("disk", "-root.qcow2"), ("seed", "-seed.iso"))]
    for clash in shared_paths(uses):
        i, j = where.get(clash.second) or where[clash.first]
        at = (pos.values.get(("guests", i, "pmem", j, "volume")) or pos.values.get(("guests", i, "pmem", j))
              or pos.values.get(("guests", i)))
        raise _fail(f"region {clash.second} would share {clash.path} with region {clash.first}; two guests never "
                    "share a backing file: name another volume", at, filename)


def _merge(base: dict[str, Any], over: dict[str, Any], base_pos: _Positions, over_pos: _Positions,
           out: _Positions, path: Path_) -> dict[str, Any]:
    """defaults <- guest, key by key; mappings merge recursively, anything else (lists too) replaces."""
    result: dict[str, Any] = {}
    for key, value in base.items():
        if key not in over:
            result[key] = value
            out.copy_under(base_pos, (*path, key))
    for key, value in over.items():
        here = (*path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out.keys[here] = over_pos.keys[here]
            out.values[here] = over_pos.values[here]
            result[key] = _merge(base[key], value, base_pos, over_pos, out, here)
        else:
            result[key] = value
            out.copy_under(over_pos, here)
    return result


# ---------------------------------------------------------------------------------------------
# pydantic errors -> one positioned SpecError


def _validate(raw: dict[str, Any], pos: _Positions, filename: str) -> GuestSpec:
    try:
        return GuestSpec.model_validate(raw)
    except ValidationError as e:
        problems = [_problem(err, pos) for err in e.errors()]
        # first in file order; at one position an unknown key explains more than a missing one
        problems.sort(key=lambda p: (p[1].line, p[1].col, "missing" in p[0]) if p[1] else (1 << 30, 0, True))
        message, at, field_path = problems[0]
        raise _fail(message, at, filename, field_path) from None


def _lookup(table: dict[Path_, _Pos], loc: Path_) -> tuple[_Pos | None, Path_]:
    for n in range(len(loc), -1, -1):
        if loc[:n] in table:
            return table[loc[:n]], loc[n:]
    return None, loc


def _display(at: _Pos | None, rest: Path_) -> str:
    text = at.field if at else ""
    for part in rest:
        text = _join(text, part)
    return text


def _problem(err: Any, pos: _Positions) -> tuple[str, _Pos | None, str]:
    loc: Path_ = tuple(err["loc"])
    kind = err["type"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _Problem):
        loc = (*loc, *cause.loc)
    if kind == "extra_forbidden":
        at = pos.keys.get(loc)
        choices = _keys_of(loc[:-1])
        return f"unknown key {loc[-1]!r}; {_suggest(str(loc[-1]), choices)}", at, at.field if at else ""
    if kind == "missing":
        at, rest = _lookup(pos.values, loc[:-1])
        return f"missing required key {loc[-1]!r}; add it", at, _display(at, (*rest, loc[-1]))
    at, rest = _lookup(pos.values, loc)
    message = _message(err, cause)
    # "memory: memory 128MiB is too small" reads better as "memory: 128MiB is too small"
    key = next((str(p) for p in reversed(loc) if isinstance(p, str)), "")
    if key and message.startswith(key + " "):
        message = message[len(key) + 1:]
    return message, at, _display(at, rest)


def _message(err: Any, cause: object) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if isinstance(cause, _Problem):
        return cause.message
    if isinstance(cause, ValueError):
        return str(cause)
    value = err.get("input")
    simple = {
        "string_type": "expected text",
        "int_type": "expected a whole number",
        "bool_type": "expected true or false",
        "model_type": "expected a mapping of keys",
        "model_attributes_type": "expected a mapping of keys",
        "list_type": "expected a list (- item)",
    }
    if kind in simple:
        return f"{simple[kind]}, not {_describe(value)}; {_type_fix(kind, value, tuple(err['loc']))}"
    if kind == "literal_error":
        return f"{value!r} is not allowed; use {ctx.get('expected')}"
    if kind == "greater_than_equal":
        return f"{value!r} is too small; use at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"{value!r} is too large; use at most {ctx.get('le')}"
    if kind == "too_short":
        return "is empty; give at least one region (- name: data, size: 512MiB)"
    return f"{err.get('msg', 'is not valid')}; see docs/spec.md for the values it takes"


_WHOLE_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
_BOOL_WORDS = {"true": "true", "yes": "true", "on": "true", "false": "false", "no": "false", "off": "false"}


def _type_fix(kind: str, value: object, loc: Path_) -> str:
    """The "what would be right" half of a type error."""
    if kind == "int_type":
        if isinstance(value, str):
            whole = _WHOLE_RE.fullmatch(value) and len(value.strip()) <= MAX_SIZE_DIGITS
            return _whole_number_fix(int(value) if whole else None, loc, quoted=True)
        if isinstance(value, float) and value.is_integer():
            return _whole_number_fix(int(value), loc, quoted=False)
        return _whole_number_fix(None, loc, quoted=False)
    if kind == "bool_type":
        word = _BOOL_WORDS.get(value.strip().lower()) if isinstance(value, str) else None
        return f"write {word} without quotes" if word else "write true or false"
    if kind == "string_type":
        if value is None:
            return "give a value"
        if isinstance(value, dict | list):
            return "give a single value"
        return "put the value in quotes"
    if kind == "list_type":
        if isinstance(value, dict):
            return "start each item with '- ' (- name: ...)"
        return "write one '- ' item per line (or [a, b])"
    keys = [k for k in _keys_of(loc) if k not in ("version", "guests", "defaults")][:2]
    example = ", ".join(f"{k}: ..." for k in keys)
    return f"write its keys indented below it ({example})" if example else "write its keys indented below it"


def _kind(value: object) -> str:
    """What a YAML value is, without echoing it (it may be long)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "text"


def _model_at(loc: Path_) -> type[BaseModel] | None:
    """The model of the mapping at a location (by walking the models); None for a plain value."""
    model: type[BaseModel] = GuestSpec
    for part in loc:
        if isinstance(part, int):
            continue
        info = _field_of(model, part)
        if info is None:
            return None
        ann = info.annotation
        while get_origin(ann) is not None and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            inner = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not inner:
                return None
            ann = inner[0]
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _field_of(model: type[BaseModel], key: str | int) -> Any:
    return next((f for n, f in model.model_fields.items() if (f.alias or n) == key), None)


def _keys_of(loc: Path_) -> list[str]:
    """The YAML keys valid at a location (by walking the models)."""
    model = _model_at(loc)
    if model is None:
        return []
    keys = [f.alias or n for n, f in model.model_fields.items()]
    return [*keys, "version", "guests", "defaults"] if not loc else keys


def _int_bounds(loc: Path_) -> tuple[int | None, int | None]:
    """The (ge, le) of the whole-number field at LOC, as its model declares them."""
    model = _model_at(loc[:-1]) if loc else None
    info = _field_of(model, loc[-1]) if model is not None else None
    metadata = info.metadata if info is not None else []
    return (next((m.ge for m in metadata if hasattr(m, "ge")), None),
            next((m.le for m in metadata if hasattr(m, "le")), None))


def _whole_number_fix(n: int | None, loc: Path_, quoted: bool) -> str:
    """"write N" when N is allowed at LOC, else the range that is (a hint must be right)."""
    lo, hi = _int_bounds(loc)
    tail = " without quotes" if quoted else ""
    if n is not None and (lo is None or n >= lo) and (hi is None or n <= hi):
        return f"write {n}{tail}"
    if lo is not None and hi is not None:
        return f"write a whole number from {lo} to {hi}{tail}"
    return f"write a whole number{tail}, e.g. {lo if lo is not None else 1}"


def _suggest(key: str, choices: tuple[str, ...] | list[str]) -> str:
    import difflib  # only for an unknown key: not at start-up

    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(choices)
