"""Scheduler names -> classes: built-ins, the `moeflow.schedulers` entry-point group, and
"module:Class" strings."""

from __future__ import annotations

import importlib
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
            module = importlib.import_module(module_name)
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


def make_scheduler(name_or_instance: str | Scheduler) -> Scheduler:
    if isinstance(name_or_instance, Scheduler):
        return name_or_instance
    return scheduler_class(name_or_instance)()


def _checked(cls: object, what: str) -> type[Scheduler]:
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise UnknownScheduler(f"{what} is not a moeflow.scheduler.Scheduler subclass")
    return cls
