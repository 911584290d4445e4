"""Scheduler names -> classes: built-ins, the `moeflow.schedulers` entry-point group, and
"module:Class" strings."""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

from moeflow.scheduler.base import Scheduler
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.cgopipe import CGOPipe, FlexGen
from moeflow.scheduler.eps import EPS
from moeflow.scheduler.fine_ep import FineEP

ENTRY_POINT_GROUP = "moeflow.schedulers"
BUILTIN: dict[str, type[Scheduler]] = {cls.name: cls for cls in (BatchEP, FineEP, EPS,
                                                                    CGOPipe, FlexGen)}


class UnknownScheduler(LookupError):
    pass


def available() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def scheduler_class(name: str) -> type[Scheduler]:
    """The scheduler class registered as `name`, or named by "module:Class"."""
    if name in BUILTIN:
        return BUILTIN[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _checked(ep.load(), f"entry point {name!r} ({ep.value})")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = _import(module_name)
        except ImportError as exc:
            raise UnknownScheduler(f"scheduler {name!r}: cannot import {module_name!r} "
                                   f"({exc})") from None
        try:
            cls = getattr(module, attr)
        except AttributeError:
            raise UnknownScheduler(f"scheduler {name!r}: module {module_name!r} has no "
                                   f"{attr!r}") from None
        return _checked(cls, name)
    raise UnknownScheduler(f"unknown scheduler {name!r}; available: {', '.join(available())} "
                           f"(or a 'module:Class' path)")


def _import(module_name: str) -> object:
    """`module_name`, found on sys.path or, failing that, in the working directory (as
    `python -m` and uvicorn find an app's module: the `moeflow` command's own path starts
    at its script's directory, not the one it runs in)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(module_name)


def make_scheduler(name_or_instance: str | Scheduler) -> Scheduler:
    if isinstance(name_or_instance, Scheduler):
        return name_or_instance
    return scheduler_class(name_or_instance)()


def _checked(cls: object, what: str) -> type[Scheduler]:
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise UnknownScheduler(f"{what} is not a moeflow.scheduler.Scheduler subclass")
    return cls
