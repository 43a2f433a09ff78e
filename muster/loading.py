"""Loading a command's modules, shared by `muster` and the benchmark's steps (which must
not load the CLI toolkit)."""

import gc
import importlib
from types import ModuleType


def import_frozen(module: str) -> ModuleType:
    """Import `module` with no garbage collection meanwhile, then freeze what was made:
    imports make tens of thousands of long-lived objects and no garbage, and collections
    among them cost 15-40 ms of `muster backup`'s start-up (later ones skip them)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return importlib.import_module(module)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
