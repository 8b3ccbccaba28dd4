"""The CEL evaluator's compiled core, without its command-line tool.

``common-expression-language`` ships a Rust extension (``cel/cel*.so``) and, in its package
``__init__``, imports its interactive CLI too (typer, rich, prompt_toolkit, pygments): about
26 MiB in every gateway process for a tool the gateway never runs. The extension module is
self-contained, so it is loaded here from the installed package's directory on its own, under its
real name (``cel.cel``); if that ever fails (another layout in a later release) the package is
imported the ordinary way. It is loaded when the first condition is compiled (``core()``): a
gateway without routing policies never maps the extension (about 2 MiB resident).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

__all__ = ["core"]


def _load_core() -> ModuleType:
    loaded = sys.modules.get("cel.cel")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("cel")
    for directory in (package.submodule_search_locations or []) if package else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            spec = importlib.util.spec_from_file_location("cel.cel", f"{directory}/cel{suffix}")
            if spec is None or spec.loader is None:
                continue
            try:
                module = importlib.util.module_from_spec(spec)
            except (ImportError, OSError):
                continue
            spec.loader.exec_module(module)
            sys.modules["cel.cel"] = module
            return module
    return importlib.import_module("cel")  # the whole package, CLI included


#: The loaded extension module (``compile``, ``Program``, ``Context``, as the package's stubs declare).
core: Callable[[], ModuleType] = functools.cache(_load_core)
