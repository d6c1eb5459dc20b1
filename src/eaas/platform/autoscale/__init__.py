"""Autoscaling: the policy (pure), its config, load traces and a simulation.

The live mechanism (metrics from the registry, a process pool) lives elsewhere
and calls the same :func:`decide`.
"""

from eaas.platform.autoscale.config import AutoscalerConfig
from eaas.platform.autoscale.policy import (
    Decision,
    FunctionMetrics,
    MetricsSnapshot,
    PolicyState,
    WorkerMetrics,
    WorkerState,
    decide,
)
from eaas.platform.autoscale.simulate import SimConfig, SimResult, run_benchmark, simulate, static_replicas
from eaas.platform.autoscale.traces import TRACE_KINDS, Trace, TraceSpec, make_trace

__all__ = [
    "AutoscalerConfig", "Decision", "FunctionMetrics", "MetricsSnapshot", "PolicyState", "WorkerMetrics",
    "WorkerState", "decide", "SimConfig", "SimResult", "run_benchmark", "simulate", "static_replicas",
    "TRACE_KINDS", "Trace", "TraceSpec", "make_trace",
]
