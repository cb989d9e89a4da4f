"""Command line: parse arguments, call one function per subcommand, map errors to exit codes.

Only this module prints errors or exits, and only exit_status() decides a status (twine's model):
from the exception a command raised, from the report it produced, or from a fleet's outcomes.
Imports happen inside the commands that need them (libvirt and paramiko, but also report, state
and traceback), so `--help`, `validate` and `render` start fast.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO, TYPE_CHECKING

from . import __version__
from .errors import GuestError, HostError, Interrupted, SpecError, UsageError
from .speedups import without_gc

if TYPE_CHECKING:
    from .fleet import FleetResult
    from .plan import HostFacts
    from .progress import Progress
    from .report import GuestReport, Report
    from .spec import GuestSpec

# The README's exit status table. EXIT_SOFTWARE (sysexits' EX_SOFTWARE): an exception nvmprov did
# not expect, i.e. a bug; one line on stderr, the traceback with --debug.
EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_HOST, EXIT_GUEST, EXIT_SOFTWARE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 70, 130

# The exception tree -> status; the first class that matches wins.
_EXIT_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (Interrupted, EXIT_INTERRUPTED),
    (KeyboardInterrupt, EXIT_INTERRUPTED),
    (UsageError, EXIT_USAGE),
    (SpecError, EXIT_USAGE),
    (HostError, EXIT_HOST),
    (GuestError, EXIT_GUEST),
)


def exit_status(outcome: BaseException | Report | FleetResult) -> int:
    """The exit map: the one place a status is decided, for single guests and fleets alike.

    An exception by its class (anything outside the tree, a bare NvmprovError included, is a bug:
    EXIT_SOFTWARE). A report: 0 when ok, EXIT_GUEST when a guest has an error, EXIT_VERIFY when only
    checks failed. A fleet: EXIT_INTERRUPTED when cancelled, else each failed guest's status by the
    same rules (from what ended its run, else from its report), one status when they all agree,
    else EXIT_GUEST.
    """
    from .report import Report

    if isinstance(outcome, BaseException):
        return next((status for cls, status in _EXIT_BY_ERROR if isinstance(outcome, cls)), EXIT_SOFTWARE)
    if isinstance(outcome, Report):
        if outcome.ok:
            return EXIT_OK
        return EXIT_GUEST if any(g.error for g in outcome.guests) else EXIT_VERIFY
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    statuses = {
        exit_status(o.error if o.error is not None else Report(guests=[o.report]))
        for o in outcome.outcomes
        if not o.report.ok
    }
    if not statuses:
        return EXIT_OK
    return statuses.pop() if len(statuses) == 1 else EXIT_GUEST


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line naming the problem and the fix (`--help`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _add_guest_selector(p: argparse.ArgumentParser, *, many: bool = True) -> None:
    p.add_argument("names", nargs="*" if many else None, metavar="NAME", help="guest (domain) name")
    p.add_argument("-f", "--file", help="act on every guest of this spec file")
    p.add_argument("--connect", help="libvirt URI (default: the spec's, else LIBVIRT_DEFAULT_URI, else qemu:///system)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--junit", metavar="FILE", type=_writable_file, help="also write the report as JUnit XML to FILE")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0 (e.g. 120 or 2.5)")
    return value


def _uuid_arg(text: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a UUID (e.g. {uuid.uuid4()})") from None


def _writable_file(text: str) -> str:
    """A file this run can write later (a report, a log): checked now, before anything is made,
    so a typo in the path cannot fail the run after the guest was built. Nothing is created."""
    path = os.path.abspath(text) if text else ""
    parent = os.path.dirname(path)
    if not text:
        problem = "is empty"
    elif os.path.isdir(path):
        problem = "is a directory; name a file in it"
    elif not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        problem = f"cannot be written: {parent} {what}; create the directory or pick another path"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        problem = "is not writable by this user"
    elif not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
        problem = f"cannot be created: {parent} is not writable by this user"
    else:
        return text
    raise argparse.ArgumentTypeError(f"{text!r} {problem}")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", type=_positive_int, metavar="N",
                   help="guests at a time for a fleet (default: one per CPU core, at most the number of guests)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = _Parser(
        prog="nvmprov",
        description=(
            "Provision KVM/QEMU guests with virtual NVDIMMs and prove, from inside, that DAX works and persists."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nvmprov {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, help_text, add_arguments in SUBCOMMANDS:
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")


def _render_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--guest", help="which guest of a fleet file")
    p.add_argument("--uuid", type=_uuid_arg, metavar="UUID",
                   help="the domain UUID, for output that stays the same (default: a new random one each run)")


def _create_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    p.add_argument("--guest", help="only this guest of a fleet file")
    p.add_argument("--until", choices=["define", "start", "ssh"], help="stop after this phase")
    p.add_argument("--no-power-cycle", action="store_true", help="skip the power-cycle persistence proof")
    p.add_argument("--reformat", action="store_true", help="reformat regions that already hold a filesystem")
    p.add_argument("--keep-on-failure", action="store_true", help="keep what a failed run made, for debugging")
    p.add_argument("--connect", help="libvirt URI, overrides the spec's `connect`")
    p.add_argument("--log-file", metavar="FILE", type=_writable_file, help="also write progress lines to this file")
    _add_parallel(p)
    _add_output(p)


def _verify_args(p: argparse.ArgumentParser) -> None:
    _add_guest_selector(p)
    p.add_argument("--power-cycle", action="store_true", help="also cut the power and prove the data survived")
    _add_parallel(p)
    _add_output(p)


def _start_args(p: argparse.ArgumentParser) -> None:
    _add_guest_selector(p)


def _stop_args(p: argparse.ArgumentParser) -> None:
    _add_guest_selector(p)
    p.add_argument("--force", action="store_true", help="cut the power at once")
    p.add_argument("--timeout-s", type=_positive_seconds, default=120.0, metavar="S",
                   help="ACPI shutdown grace period in seconds (default 120)")


def _destroy_args(p: argparse.ArgumentParser) -> None:
    _add_guest_selector(p)
    p.add_argument("--purge", action="store_true", help="also delete the backing volumes nvmprov made (region data)")
    p.add_argument("--purge-adopted", action="store_true",
                   help="--purge, and also delete the volumes the spec adopted (volume:), which nvmprov did not make")
    p.add_argument("--yes", action="store_true", help="do not ask before --purge deletes data")


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "json", "ansible"], default="table",
                   help="ansible: an inventory (JSON, Ansible's YAML layout) to save and pass to ansible -i")
    p.add_argument("--all", action="store_true",
                   help="the guests of every hypervisor nvmprov keeps state for, each with its URI (table, json)")
    p.add_argument("--connect")


def _ssh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command to run instead of a shell")
    p.add_argument("--connect")


def _console_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--connect")


def _image_args(p: argparse.ArgumentParser) -> None:
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", parser_class=_Parser)
    isub.required = True
    b = isub.add_parser("build", help="build the Debian 12 guest image with mmdebstrap")
    b.add_argument("--force", action="store_true", help="rebuild even if the recipe did not change")
    b.add_argument("--pool", default="nvmprov")
    b.add_argument("--connect", default=None)
    b = isub.add_parser("import", help="copy a root-built image into a pool (qemu:///session: no root needed)")
    b.add_argument("dir", metavar="DIR", help="directory holding the image files, e.g. /var/lib/nvmprov/pool")
    b.add_argument("--pool", default="nvmprov")
    b.add_argument("--connect", default=None)


# attach, detach (issue 5), show, doctor, prune


def _attach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--size", required=True, help="region size, e.g. 512MiB")
    p.add_argument("--name", dest="region", help="region name (default: hpN)")
    p.add_argument("--model", choices=["nvdimm", "virtio-pmem", "cxl"], default="nvdimm",
                   help="cxl is refused, with the reason: there is no CXL hotplug")
    p.add_argument("--label", help="nvdimm label area, e.g. 128KiB")
    p.add_argument("--mode", choices=["fsdax", "devdax", "sector", "raw"],
                   help="managed guests, nvdimm only: the namespace mode (default fsdax)")
    p.add_argument("--align", help="with --mode devdax: 4KiB or 2MiB (default)")
    p.add_argument("--filesystem", choices=["ext4", "xfs", "none"], help="managed guests: default ext4")
    p.add_argument("--mount", help="managed guests: default /mnt/REGION")
    p.add_argument("--allocation", choices=["full", "sparse"], default="full")
    p.add_argument("--numa-node", type=int, default=0, metavar="N",
                   help="nvdimm: the guest NUMA node (default 0); the domain must have that cell")
    p.add_argument("--live", action="store_true", help="attach to the running domain")
    p.add_argument("--config", action="store_true", help="attach to the persistent config (next start)")
    p.add_argument("--connect")
    _add_output(p)


def _detach_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("region", metavar="REGION")
    p.add_argument("--live", action="store_true", help="from the running domain (virtio-pmem only)")
    p.add_argument("--config", action="store_true", help="from the persistent config (gone at next start)")
    p.add_argument("--purge", action="store_true", help="also delete the backing volume, when nvmprov made it")
    p.add_argument("--purge-adopted", action="store_true", help="--purge, even when the spec adopted it (volume:)")
    p.add_argument("--yes", action="store_true", help="do not ask before --purge deletes data")
    p.add_argument("--connect")
    p.add_argument("--json", action="store_true")


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", metavar="NAME")
    p.add_argument("--connect")
    p.add_argument("--json", action="store_true")


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--file", help="also check pool space against this spec's regions")
    p.add_argument("--connect")
    p.add_argument("--json", action="store_true")


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", metavar="GLOB", help="only volumes whose name matches, e.g. 'demo-*'")
    p.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    p.add_argument("--yes", action="store_true", help="delete without asking (needed without a terminal)")
    p.add_argument("--connect")
    p.add_argument("--json", action="store_true")


# (name, the one line `nvmprov --help` shows, its options), in the order --help lists them
SUBCOMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("validate", "check a spec file; exit 0 or 2", _validate_args),
    ("render", "print the libvirt domain XML a spec produces (no libvirt needed)", _render_args),
    ("create", "create, boot, set up and verify the guests of a spec file", _create_args),
    ("verify", "re-run the in-guest checks on a managed guest", _verify_args),
    ("start", "start a managed guest (and hot-plug its virtio-pmem regions)", _start_args),
    ("stop", "ACPI shutdown; hard stop after the timeout", _stop_args),
    ("destroy", "stop and undefine; remove overlay and seed (backing volumes kept)", _destroy_args),
    ("list", "managed guests", _list_args),
    ("ssh", "SSH into a managed guest with its pinned host key", _ssh_args),
    ("console", "print the guest's serial log", _console_args),
    ("image", "the built-in guest image", _image_args),
    ("attach", "add a pmem region to any libvirt domain (live and/or config)", _attach_args),
    ("detach", "remove a pmem region from a domain (backing volume kept)", _detach_args),
    ("show", "a guest's memory map: RAM, regions with guest physical ranges, hotplug room", _show_args),
    ("doctor", "is this host ready? each failed check prints its fix (exit 0 or 3)", _doctor_args),
    ("prune", "delete nvmprov volumes no domain uses (lists them first)", _prune_args),
)


# ---------------------------------------------------------------------------------------------
# commands


@without_gc
def cmd_validate(args: argparse.Namespace) -> int:
    from . import plan, spec

    loaded = spec.load(args.file)
    for g in loaded.guests:  # what create would say about the sizes (rounding, label costs)
        for region in plan.build(g, _assumed_facts(g)).regions:
            for note in region.notes:
                _note(f"{g.name}: region {region.name}: {note}")
    names = ", ".join(g.name for g in loaded.guests)
    print(f"{loaded.path}: ok ({len(loaded.guests)} guest{'s' if len(loaded.guests) != 1 else ''}: {names})")
    return EXIT_OK


@without_gc
def cmd_render(args: argparse.Namespace) -> int:
    import uuid

    from . import domain, plan, spec, uris

    loaded = spec.load(args.file)
    guests = [loaded.guest(args.guest)] if args.guest else loaded.guests
    if len(guests) > 1:
        raise UsageError(f"{args.file} holds {len(guests)} guests; pick one with --guest NAME "
                         f"({', '.join(g.name for g in guests)})")
    g = guests[0]
    the_plan = plan.build(g, _assumed_facts(g))
    if g.accel == "auto":
        _note(f"{g.name}: accel auto rendered as tcg: render does not look at the host; create picks kvm "
              "where it works (`nvmprov doctor` tells), or set accel: kvm")
    # A random UUID unless asked: a fixed one would let `virsh define` replace another domain.
    ctx = domain.RenderContext(
        uuid=args.uuid or str(uuid.uuid4()), ssh_port=0,
        pool_dir=uris.pool_dir_for(g.pool, uris.effective_uri(g.connect, None)),  # where create puts the pool
        console_log=f"/var/log/libvirt/qemu/{g.name}-nvmprov-serial.log",
    )
    sys.stdout.write(domain.render(the_plan, ctx))
    return EXIT_OK


def _assumed_facts(g: GuestSpec) -> HostFacts:
    """The host `render` and `validate` plan for without looking at one: the requested accel works
    (kvm for accel: kvm; auto stays tcg, said by the caller). create plans with the real host."""
    from .image import builtin_volume_names
    from .plan import HostFacts

    kvm = g.accel == "kvm"
    return HostFacts(kvm_domain_type=kvm, cpu_virt_extensions=kvm, builtin_volumes=builtin_volume_names())


def _note(message: str) -> None:
    sys.stderr.write(f"nvmprov: note: {message}\n")


def cmd_create(args: argparse.Namespace) -> int:
    from . import spec
    from .workflow import CreateOptions, create, vet_image

    loaded = spec.load(args.file)
    guests = [loaded.guest(args.guest)] if args.guest else loaded.guests
    opts = CreateOptions(
        until=args.until or "all", power_cycle=not args.no_power_cycle, reformat=args.reformat,
        keep_on_failure=args.keep_on_failure, connect=args.connect,
        spec_path=None if args.file == spec.STDIN else os.path.abspath(args.file),
    )
    for g in guests:  # every image of a fleet before any guest is made: bad input changes nothing
        vet_image(g, opts)
    from .progress import Progress
    from .report import GuestReport, Report

    log = _open_log(args.log_file)
    try:
        if len(guests) > 1:
            return _create_fleet(guests, opts, args, log)
        g = guests[0]
        progress, report = Progress(log=log), GuestReport(name=g.name)
        _reported(report, progress, args, lambda: create(g, opts, progress, report=report), phase="create")
    finally:
        if log:
            log.close()
    return _emit(Report(guests=[report]), args)


def _open_log(path: str | None) -> IO[str] | None:
    if not path:
        return None
    try:
        return open(path, "a")  # noqa: SIM115 - the caller closes it
    except OSError as exc:  # checked at parse time; this is the race after it
        raise UsageError(f"--log-file {path}: {exc.strerror}; give a file in a writable directory") from None


def _reported(report: GuestReport, progress: Progress, args: argparse.Namespace, run: Callable[[], object], *,
              phase: str) -> None:
    """run() fills REPORT. An error that escapes it (host, lock, signal, a bug, ...) still gives CI
    that report on --json/--junit -- with what the run had filled in (ssh, accel, regions, notes)
    and the phase it failed in -- then goes on to main's exit map."""
    try:
        run()
    except (UsageError, SpecError):
        raise  # bad input: nothing ran, nothing to report
    except BaseException as exc:
        if getattr(args, "json", False) or getattr(args, "junit", None):
            from .report import Report, error_message

            if report.error is None:
                report.fail(progress.last_phase(phase), error_message(exc))
            report.timings_s = report.timings_s or dict(progress.timings_s)
            _emit_machine(Report(guests=[report]), args)
        raise


def _create_fleet(guests: list, opts: object, args: argparse.Namespace, log: object) -> int:
    from . import fleet

    parallel = args.parallel or fleet.default_parallel(len(guests))
    result = fleet.create(guests, opts, parallel=parallel, stream=sys.stderr, log=log)  # type: ignore[arg-type]
    return _emit_fleet(result, args)


def _emit_fleet(result: object, args: argparse.Namespace) -> int:
    from . import fleet

    assert isinstance(result, fleet.FleetResult)
    _emit(result.report, args)
    # The summary is for people: after the text report, or on stderr when stdout carries the JSON.
    (sys.stderr if getattr(args, "json", False) else sys.stdout).write("\n" + fleet.summary(result))
    if result.interrupted:
        _error(f"{result.interrupted}; {_aftermath(args)}")
    return exit_status(result)


def _emit_machine(report: Report, args: argparse.Namespace) -> None:
    """The reports for machines: JSON on stdout (--json), JUnit XML to a file (--junit)."""
    from .report import render_json, render_junit

    if getattr(args, "json", False):
        sys.stdout.write(render_json(report) + "\n")
        sys.stdout.flush()
    if getattr(args, "junit", None):
        try:
            with open(args.junit, "w") as fh:
                fh.write(render_junit(report))
        except OSError as exc:  # checked at parse time; this is the race after it
            raise HostError(f"cannot write the JUnit report to {args.junit}: {exc.strerror}") from None


def _emit(report: object, args: argparse.Namespace) -> int:
    from .report import Report, render_text

    assert isinstance(report, Report)
    _emit_machine(report, args)
    if not getattr(args, "json", False):
        sys.stdout.write(render_text(report))
    return exit_status(report)


def cmd_verify(args: argparse.Namespace) -> int:
    targets = _targets(args)
    if len(targets) > 1:
        from . import fleet

        parallel = args.parallel or fleet.default_parallel(len(targets))
        return _emit_fleet(fleet.verify([n for n, _c in targets], connect=args.connect, power_cycle=args.power_cycle,
                                        parallel=parallel, stream=sys.stderr, connect_of=dict(targets)), args)
    from . import api
    from .progress import Progress
    from .report import GuestReport, Report

    (name, connect), progress = targets[0], Progress()
    report = GuestReport(name=name)
    _reported(report, progress, args, phase="verify", run=lambda: api.verify(
        name, connect=connect, power_cycle=args.power_cycle, progress=progress, report=report))
    return _emit(Report(guests=[report]), args)


def cmd_start(args: argparse.Namespace) -> int:
    from . import guests

    for connect, names in _by_connect(_targets(args)).items():  # -f: each guest where its `connect:` says
        guests.start(names, connect=connect)
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from . import guests

    for connect, names in _by_connect(_targets(args)).items():
        guests.stop(names, connect=connect, force=args.force, timeout_s=args.timeout_s)
    return EXIT_OK


def confirm(question: str, without_terminal: str) -> bool:
    """Ask QUESTION with [y/N] (only y or yes says yes); without a terminal to ask on, refuse with
    UsageError WITHOUT_TERMINAL (which names --yes) instead of waiting."""
    if not sys.stdin.isatty():
        raise UsageError(without_terminal)
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_destroy(args: argparse.Namespace) -> int:
    from . import guests
    from .ledger import Purge

    targets = _targets(args)
    names = [n for n, _c in targets]
    purge = Purge.asked(args.purge, args.purge_adopted)
    if purge.volumes and not args.yes and not confirm(
            f"delete the backing volumes of {', '.join(names)}? this destroys their data",
            "--purge deletes the backing volumes (region data); add --yes to confirm"):
        print("nothing destroyed")
        return EXIT_OK
    if args.file:  # a fleet: guests already gone are skipped, one failure does not stop the rest
        from . import fleet

        failures = []
        for connect, group in _by_connect(targets).items():  # each guest where its `connect:` says
            failures += fleet.destroy(group, connect=connect, purge=purge, stream=sys.stderr)
        if failures:
            raise HostError(f"{len(failures)} of {len(names)} guests not destroyed: " + "; ".join(failures))
        return EXIT_OK
    for connect, group in _by_connect(targets).items():
        guests.destroy(group, connect=connect, purge=purge)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from . import guests

    if args.all:
        if args.format == "ansible":
            raise UsageError("--all lists several hypervisors; an inventory is per hypervisor: drop --all or use "
                             "--format json")
        sys.stdout.write(guests.list_all_text(fmt=args.format, connect=args.connect))
        return EXIT_OK
    sys.stdout.write(guests.list_text(connect=args.connect, fmt=args.format))
    return EXIT_OK


def cmd_ssh(args: argparse.Namespace) -> int:
    from . import guests
    from .state import check_name

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    argv = guests.ssh_argv(check_name(args.name), connect=args.connect, command=cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - argument list, no shell
    return EXIT_OK  # not reached


def cmd_console(args: argparse.Namespace) -> int:
    from . import guests
    from .state import check_name

    sys.stdout.write(guests.console_text(check_name(args.name), connect=args.connect))
    return EXIT_OK


def cmd_image(args: argparse.Namespace) -> int:
    from . import image, storage, virt
    from .progress import Progress
    from .uris import effective_uri, pool_dir_for

    conn = virt.connect(effective_uri(virt.DEFAULT_URI, args.connect))
    try:
        storage.ensure_pool(conn, args.pool, pool_dir_for(args.pool, conn.getURI()))
        if args.image_command == "import":
            from .session import import_image

            names = import_image(conn, args.pool, args.dir, Progress().line)
        else:
            names = image.build(conn, args.pool, force=args.force, progress=Progress().line)
    finally:
        conn.close()
    print("built-in image volumes: " + ", ".join(names))
    return EXIT_OK


def _targets(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(guest, URI) of every guest named: names typed go to --connect; each guest of -f FILE goes
    where its own `connect:` says (a fleet may span hypervisors), unless --connect overrides."""
    from .state import check_name
    from .uris import SYSTEM_URI

    targets: list[tuple[str, str | None]] = [(n, args.connect) for n in args.names or []]
    if args.file:
        from . import spec

        targets += [(g.name, args.connect or (g.connect if g.connect != SYSTEM_URI else None))
                    for g in spec.load(args.file).guests]
    if not targets:
        raise UsageError("name at least one guest, or give -f FILE")
    # before any connection: a bad name is bad input (exit 2)
    return [(check_name(n), connect) for n, connect in targets]


def _by_connect(targets: list[tuple[str, str | None]]) -> dict[str | None, list[str]]:
    groups: dict[str | None, list[str]] = {}
    for name, connect in targets:
        groups.setdefault(connect, []).append(name)
    return groups


# ---------------------------------------------------------------------------------------------
# attach, detach (issue 5)


def _domain_arg(name: str) -> str:
    if not name or len(name) > 200 or any(not c.isprintable() or c == "/" for c in name):
        raise UsageError(f"{name!r} is not a libvirt domain name; `virsh list --all` shows them")
    return name


def _admin_conn(connect: str | None):
    from . import virt
    from .uris import effective_uri

    return virt.connect(effective_uri(virt.DEFAULT_URI, connect))


def cmd_attach(args: argparse.Namespace) -> int:
    from . import api, spec
    from .progress import Progress

    try:  # here, not in api.attach: the message names the option
        size = spec.parse_size(args.size, what="--size")
        label = spec.parse_size(args.label, what="--label") if args.label else None
        align = spec.parse_size(args.align, what="--align") if args.align else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report = api.attach(
        _domain_arg(args.domain), size, region=args.region, model=args.model, label=label, mode=args.mode,
        align=align,
        filesystem=args.filesystem, mount=args.mount, allocation=args.allocation, live=args.live, config=args.config,
        numa_node=args.numa_node, connect=args.connect, progress=Progress(),
    )
    return _emit(report, args)


def cmd_detach(args: argparse.Namespace) -> int:
    import json

    from . import api
    from .progress import Progress

    name = _domain_arg(args.domain)
    from .ledger import Purge

    purge = Purge.asked(args.purge, args.purge_adopted)
    if purge.volumes and not args.yes and not confirm(
            f"delete the backing volume of {args.region}?",
            "--purge deletes the backing volume (the region's data); add --yes to confirm"):
        print("nothing detached")
        return EXIT_OK
    result = api.detach(name, args.region, live=args.live, config=args.config, purge=args.purge,
                        purge_adopted=args.purge_adopted, connect=args.connect, progress=Progress())
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(f"{result.domain}: {result.region} detached ({', '.join(result.detached)})"
              + (f"; deleted volume {result.volume}" if result.volume_deleted else ""))
        for note in result.notes:
            print(f"  note: {note}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from . import show
    from .progress import Progress

    conn = _admin_conn(args.connect)
    try:
        mm = show.show(conn, _domain_arg(args.domain), Progress())
    finally:
        conn.close()
    sys.stdout.write(json.dumps(mm.to_dict(), indent=2) + "\n" if args.json else show.render_text(mm))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from . import doctor, virt
    from .uris import effective_uri

    checks = doctor.run(effective_uri(virt.DEFAULT_URI, args.connect), spec_path=args.file)
    failed = any(c.status == "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": doctor.as_dicts(checks)}, indent=2))
    else:
        for c in checks:
            print(f"{c.status.upper():<4}  {c.name}: {c.detail}")
            if c.fix and c.status != "ok":
                print(f"      fix: {c.fix}")
        print("doctor: " + ("FAILED (see the fixes above)" if failed else "ready"))
    return EXIT_HOST if failed else EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    import json

    from . import doctor, storage
    from .sizes import human_size

    conn = _admin_conn(args.connect)
    try:
        pool = storage.pool_of(conn, storage.DEFAULT_POOL)
        found = doctor.candidates(conn, pool, only=args.only)
        if not args.json:
            for v in found:
                print(f"unused: {v.path} ({human_size(v.allocation_bytes)} on disk)")
        if not found or args.dry_run:
            if args.json:
                print(json.dumps({"unused": doctor.as_dicts(found), "deleted": []}, indent=2))
            elif not found:
                print("no unused nvmprov volumes")
            return EXIT_OK
        if not args.yes and not confirm(f"delete these {len(found)} volume(s) and their data?",
                                        f"{len(found)} unused volume(s) listed above; add --yes to delete them"):
            print("nothing deleted")
            return EXIT_OK
        deleted = doctor.prune(conn, storage.DEFAULT_POOL, [v.name for v in found], only=args.only)
    finally:
        conn.close()
    if args.json:
        print(json.dumps({"unused": doctor.as_dicts(found), "deleted": deleted}, indent=2))
    else:
        print(f"deleted {len(deleted)} volume(s)" + (f": {', '.join(deleted)}" if deleted else ""))
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "validate": cmd_validate, "render": cmd_render, "create": cmd_create, "verify": cmd_verify,
    "start": cmd_start, "stop": cmd_stop, "destroy": cmd_destroy, "list": cmd_list, "ssh": cmd_ssh,
    "console": cmd_console, "image": cmd_image, "attach": cmd_attach, "detach": cmd_detach,
    "show": cmd_show, "doctor": cmd_doctor, "prune": cmd_prune,
}


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")  # main says what became of the run


def _aftermath(args: argparse.Namespace) -> str:
    """What an interrupted run left: the truth differs with create --keep-on-failure."""
    if getattr(args, "keep_on_failure", False):
        return "what this run made was kept (--keep-on-failure); `nvmprov destroy --purge NAME` removes it"
    return "what this run made was rolled back"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (and SIGHUP: the terminal went away) take the same path as Ctrl-C so the rollback runs.
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        return EXIT_OK  # the reader went away (`nvmprov list | head`): not an error
    except BaseException as exc:
        if not isinstance(exc, Exception | KeyboardInterrupt):
            raise  # SystemExit (argparse, --help) and GeneratorExit keep their own meaning
        status = exit_status(exc)
        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, SpecError):
            from .textsafe import clean

            # FILE:LINE:COL: field: problem; fix -- what editors parse; a spec is untrusted text
            sys.stderr.write(f"{clean(str(exc))}\n")
        elif status == EXIT_INTERRUPTED:
            _error(f"{str(exc) or 'interrupted'}; {_aftermath(args)}")
        elif status == EXIT_SOFTWARE:
            where = "" if args.debug else "; run again with --debug for the traceback"
            _error(f"unexpected {type(exc).__name__}: {_first_line(exc)} (a bug in nvmprov{where})")
        else:
            _error(str(exc))
        return status


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or ["(no message)"])[0]


def _error(message: str) -> None:
    from .textsafe import clean

    red = sys.stderr.isatty() and not os.environ.get("NO_COLOR")
    first, *rest = clean(message).splitlines() or [""]  # messages may quote a guest
    line = f"nvmprov: error: {first}"
    sys.stderr.write((f"\x1b[31m{line}\x1b[0m" if red else line) + "\n")
    for extra in rest:
        sys.stderr.write(f"  {extra}\n")


if __name__ == "__main__":
    sys.exit(main())
