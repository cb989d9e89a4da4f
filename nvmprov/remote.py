"""Remote hypervisors (qemu+ssh://) and the kinds of libvirt URI.

A guest's SSH forward is bound to the hypervisor's 127.0.0.1, never to the network. nvmprov reaches
it through the hypervisor's own SSH server: one paramiko connection per hypervisor (shared by the
threads of a fleet), a direct-tcpip channel per guest connection. The hypervisor is found the way
libvirt's ssh transport finds it: the URI's user, port and keyfile first, then ~/.ssh/config
(HostName, User, Port, IdentityFile, UserKnownHostsFile), and its host key must be in the user's
known_hosts (the hypervisor's key, not a guest's: guests keep their pinned keys).

The pure part (parse, resolve, proxy arguments for OpenSSH) needs no network and is unit tested.
"""

from __future__ import annotations

import atexit
import os
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from .domain import SSH_FORWARD_HOST
from .errors import HostError, UsageError

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
CONNECT_TIMEOUT_S = 20.0
CHANNEL_TIMEOUT_S = 15.0
TAIL_BYTES = 64 * 1024
TAIL_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------------------------
# URI kinds (is_session is in nvmprov.uris, which render imports without this module)


def _transport(uri: str) -> str:
    scheme = urlparse(uri).scheme
    return scheme.split("+", 1)[1] if "+" in scheme else ""


@dataclass(frozen=True)
class HypervisorUri:
    """The SSH part of a libvirt URI, as written (the host may be an ~/.ssh/config alias)."""

    alias: str
    user: str | None = None
    port: int | None = None
    keyfile: str | None = None
    known_hosts: str | None = None
    no_verify: bool = False
    command: str | None = None  # libvirt's ?command=: the ssh program to run (ssh transport)


def parse(uri: str) -> HypervisorUri | None:
    """The hypervisor's SSH coordinates of a qemu+ssh:// URI; None for any other URI."""
    if _transport(uri) not in SSH_TRANSPORTS:
        return None
    u = urlparse(uri)
    if not u.hostname:
        raise UsageError(f"libvirt URI {uri!r} names no host; write it as qemu+ssh://[user@]host[:port]/system")
    query = {k: v[-1] for k, v in parse_qs(u.query).items()}
    try:
        port = u.port
    except ValueError:
        raise UsageError(f"libvirt URI {uri!r} has a bad port; write it as qemu+ssh://host:PORT/system") from None
    return HypervisorUri(
        alias=u.hostname, user=unquote(u.username) if u.username else None, port=port,
        keyfile=query.get("keyfile"), known_hosts=query.get("known_hosts"),
        no_verify=query.get("no_verify", "0") not in ("0", ""), command=query.get("command"),
    )


# ---------------------------------------------------------------------------------------------
# ~/.ssh/config


@dataclass(frozen=True)
class Endpoint:
    """Where to SSH to, resolved: what paramiko needs."""

    alias: str
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    known_hosts_files: tuple[str, ...]
    verify: bool

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def ssh_config_path(home: str | None = None) -> Path:
    return Path(home or os.path.expanduser("~")) / ".ssh" / "config"


def resolve(hv: HypervisorUri, config_text: str, *, local_user: str, home: str) -> Endpoint:
    """Apply ssh_config to the URI the way OpenSSH would (the URI's own values win, as ssh's
    command-line options do)."""
    import paramiko

    cfg = paramiko.SSHConfig.from_text(config_text).lookup(hv.alias)

    def expand(path: str) -> str:
        return os.path.join(home, path[2:]) if path.startswith("~/") else path

    identities = [hv.keyfile] if hv.keyfile else list(cfg.get("identityfile", []))
    if not identities:
        identities = [str(Path(home, ".ssh", n)) for n in DEFAULT_IDENTITIES if Path(home, ".ssh", n).exists()]
    known = [hv.known_hosts] if hv.known_hosts else cfg.get("userknownhostsfile", "~/.ssh/known_hosts").split()
    strict = cfg.get("stricthostkeychecking", "yes").lower()
    return Endpoint(
        alias=hv.alias,
        hostname=cfg.get("hostname", hv.alias),
        port=hv.port or int(cfg.get("port", 22)),
        user=hv.user or cfg.get("user", local_user),
        identity_files=tuple(expand(p) for p in identities),
        known_hosts_files=tuple(expand(p) for p in known),
        verify=not hv.no_verify and strict not in ("no", "off"),
    )


def endpoint_for(uri: str) -> Endpoint | None:
    """The resolved hypervisor of a qemu+ssh URI (reading ~/.ssh/config), None when local."""
    hv = parse(uri)
    if hv is None:
        return None
    path = ssh_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise HostError(f"cannot read {path}: {exc.strerror}") from None
    import getpass

    return resolve(hv, text, local_user=getpass.getuser(), home=os.path.expanduser("~"))


# ---------------------------------------------------------------------------------------------
# OpenSSH arguments: `nvmprov ssh`, the Ansible inventory


def proxy_command(hv: HypervisorUri) -> str:
    """An OpenSSH ProxyCommand that reaches the guest's forward through the hypervisor:
    `ssh -W` makes the hypervisor connect to its own 127.0.0.1:PORT. The ssh run here reads
    ~/.ssh/config (or is the URI's ?command= program), so aliases and keys work as for libvirt."""
    argv = shlex.split(hv.command) if hv.command else ["ssh"]
    if hv.user:
        argv += ["-l", hv.user]
    if hv.port:
        argv += ["-p", str(hv.port)]
    if hv.keyfile:
        argv += ["-i", hv.keyfile, "-o", "IdentitiesOnly=yes"]
    if hv.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={hv.known_hosts}"]
    if hv.no_verify:
        argv += ["-o", "StrictHostKeyChecking=no"]
    argv += ["-W", "%h:%p", hv.alias]
    return " ".join(shlex.quote(a) if a != "%h:%p" else a for a in argv)


def ssh_proxy_options(uri: str) -> list[str]:
    """`-o ProxyCommand=...` for a remote guest; nothing for a local one."""
    hv = parse(uri)
    return [] if hv is None else ["-o", f"ProxyCommand={proxy_command(hv)}"]


# ---------------------------------------------------------------------------------------------
# the live connection to the hypervisor


class Hypervisor:
    """One SSH connection to a hypervisor; thread-safe channel opening (paramiko's transport is)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._client = None  # paramiko.SSHClient
        self._lock = threading.Lock()

    def _connected(self):  # -> paramiko.Transport
        import paramiko

        with self._lock:
            transport = self._client.get_transport() if self._client is not None else None
            if transport is not None and transport.is_active():
                return transport
            self._client = _open_client(self.endpoint, paramiko)
            return self._client.get_transport()

    def open_channel(self, port: int):  # -> paramiko.Channel, socket-like
        """A direct-tcpip channel to the hypervisor's 127.0.0.1:PORT (the guest's SSH forward)."""
        transport = self._connected()
        return transport.open_channel("direct-tcpip", (SSH_FORWARD_HOST, port), ("127.0.0.1", 0),
                                      timeout=CHANNEL_TIMEOUT_S)

    def read_tail(self, path: str, max_bytes: int = TAIL_BYTES) -> str:
        """The end of a file on the hypervisor ('' when it cannot be read, e.g. not our user's)."""
        transport = self._connected()
        chan = transport.open_session(timeout=CHANNEL_TIMEOUT_S)
        try:
            chan.settimeout(TAIL_TIMEOUT_S)
            chan.exec_command(f"tail -c {int(max_bytes)} -- {shlex.quote(path)} 2>/dev/null")
            data = b""
            while True:
                chunk = chan.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace")
        except OSError:
            return ""
        finally:
            chan.close()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _open_client(ep: Endpoint, paramiko):  # noqa: ANN001 - paramiko module, imported late
    client = paramiko.SSHClient()
    for path in ep.known_hosts_files:
        if os.path.exists(path):
            try:
                client.load_host_keys(path)
            except (OSError, paramiko.SSHException) as exc:
                raise HostError(f"cannot read known_hosts file {path}: {exc}") from None
    # The hypervisor's key must be known (as for ssh's StrictHostKeyChecking=yes) unless the
    # URI said no_verify=1 or ssh_config says StrictHostKeyChecking no, as libvirt's ssh would.
    client.set_missing_host_key_policy(paramiko.RejectPolicy() if ep.verify else paramiko.AutoAddPolicy())
    where = f"{ep.user}@{ep.hostname}:{ep.port}"
    try:
        client.connect(
            ep.hostname, port=ep.port, username=ep.user, key_filename=list(ep.identity_files) or None,
            timeout=CONNECT_TIMEOUT_S, banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S,
            look_for_keys=False, allow_agent=True,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostError(f"hypervisor {where}: host key mismatch ({exc.key.get_name()} {exc.key.fingerprint}); "
                        f"check the host, then fix its entry in {', '.join(ep.known_hosts_files)}") from None
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise HostError(f"hypervisor {where}: its host key is not in {', '.join(ep.known_hosts_files)}; "
                            f"run `ssh -p {ep.port} {ep.user}@{ep.hostname} true` once to check and add it") from None
        raise HostError(f"cannot SSH to hypervisor {where} (as {ep.alias!r} in the libvirt URI): {exc}; "
                        "check its User, IdentityFile and Port in ~/.ssh/config or the URI") from None
    except OSError as exc:
        client.close()
        raise HostError(f"cannot reach hypervisor {where}: {exc}") from None
    return client


_HYPERVISORS: dict[Endpoint, Hypervisor] = {}
_HYPERVISORS_LOCK = threading.Lock()


def hypervisor_for(uri: str) -> Hypervisor | None:
    """The shared hypervisor connection for a qemu+ssh URI (made on first use); None if local.

    Shared by every guest of the process (a fleet's guests tunnel through one SSH login) and closed
    at the process's exit (close_all), not by its users.
    """
    ep = endpoint_for(uri)
    if ep is None:
        return None
    with _HYPERVISORS_LOCK:
        hv = _HYPERVISORS.get(ep)
        if hv is None:
            hv = _HYPERVISORS[ep] = Hypervisor(ep)
    return hv


def close_all() -> None:
    """Close every shared hypervisor connection (at exit; a later hypervisor_for opens a new one)."""
    with _HYPERVISORS_LOCK:
        hvs = list(_HYPERVISORS.values())
        _HYPERVISORS.clear()
    for hv in hvs:
        hv.close()


atexit.register(close_all)
