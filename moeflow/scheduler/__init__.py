"""Scheduling: the pure plugin contract, Plans, the one execution semantics, policies.

Pure: nothing here imports asyncio, zmq, torch or a device.
"""

from moeflow.scheduler.base import Budget, Cluster, RequestView, Scheduler
from moeflow.scheduler.batch_ep import BatchEP
from moeflow.scheduler.eps import EPS, AnalyticCosts, StageChoice, StageCosts
from moeflow.scheduler.fine_ep import FineEP
from moeflow.scheduler.plan import ByPriority, InOrder, Plan, PlanError, Stream, topological_plan
from moeflow.scheduler.registry import UnknownScheduler, available, make_scheduler, scheduler_class
from moeflow.scheduler.semantics import Execution, SemanticsError

__all__ = [
    "AnalyticCosts", "BatchEP", "Budget", "ByPriority", "Cluster", "EPS", "Execution", "FineEP",
    "InOrder", "Plan", "PlanError", "RequestView", "Scheduler", "SemanticsError", "StageChoice",
    "StageCosts", "Stream", "UnknownScheduler", "available", "make_scheduler", "scheduler_class",
    "topological_plan",
]
