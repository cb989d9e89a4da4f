"""Start-up tricks that keep `nvmprov render` within its 0.3 s budget, and only those.

Each one leans on something a library does not promise; tests/unit/test_speedups.py fails when
that changes. Measured on 2026-12-02 (25 interleaved runs of `nvmprov render examples/guest.yaml`
at load 3.5, median / p90 s): all tricks 0.238 / 0.270; without no_pydantic_plugins 0.265 / 0.333;
without both 0.286 / 0.338. A third trick, a subclass of argparse's private _SubParsersAction that
made each subcommand's parser only when run, saved 4 ms of a quiet 0.117 s and nothing
measurable under load: it was dropped.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import sys
import types
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

# pydantic imports this module when it builds a model's validator, to find plugins
PYDANTIC_PLUGIN_LOADER = "pydantic.plugin._loader"


@contextlib.contextmanager
def no_pydantic_plugins() -> Iterator[None]:
    """pydantic without its plugin discovery while nvmprov's models are built.

    Its loader imports importlib.metadata and reads the entry points of every installed
    distribution (~12 ms of render quiet, ~27 ms under load) to find plugins (observers of
    validation) nvmprov does not use. A stand-in module under the loader's private name answers
    "no plugins"; it is removed afterwards, so pydantic models built later (anyone else's) still
    get their plugins.
    """
    if PYDANTIC_PLUGIN_LOADER in sys.modules:  # discovery already paid for (or done): nothing to save
        yield
        return
    stub = types.ModuleType(PYDANTIC_PLUGIN_LOADER, "nvmprov.speedups: no pydantic plugins for nvmprov's models")
    stub.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules[PYDANTIC_PLUGIN_LOADER] = stub
    try:
        yield
    finally:
        if sys.modules.get(PYDANTIC_PLUGIN_LOADER) is stub:
            del sys.modules[PYDANTIC_PLUGIN_LOADER]


def without_gc(command: Callable[..., T]) -> Callable[..., T]:
    """For the commands that are over in a fraction of a second and end the process (validate,
    render): no cyclic garbage collection while they run, and what is alive when they return is
    frozen (gc.freeze: never examined by the collector again).

    Importing pydantic and yaml and building the models fills the heap with long-lived objects and
    hardly any garbage cycles: the ~50 collections while `render` ran found ~1,200 objects to free,
    and at exit, where Python clears the modules and collects what that leaves, that heap cost
    20 ms of a quiet render (0.117 s against 0.137 s). Reference counting still frees everything
    else; an in-process caller (the tests) gets the collector back, minus the objects frozen here.
    """

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> T:
        if not gc.isenabled():
            return command(*args, **kwargs)
        gc.disable()
        try:
            return command(*args, **kwargs)
        finally:
            gc.freeze()
            gc.enable()

    return run
