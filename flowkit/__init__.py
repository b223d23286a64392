"""flowkit: a Jupyter-first prediction-serving toolkit.

Build a pipeline with :class:`Flow`, run it in-process with ``flow.run``, rewrite it with
:func:`optimize`, and serve it from a dask cluster with :func:`deploy`.
"""

from .errors import DeploymentClosed, FlowError, NoWorkers, OperatorError, Overloaded, SchemaError, WorkerLost
from .flow import Flow, Node, RepeatWarning
from .optimize import optimize
from .plan import QID, Plan
from .schema import Schema
from .runtime.cancel import Cancelled, cancelled
from .table import GroupedTable, Row, Table

__version__ = "0.1.0"

__all__ = [
    "Table", "Row", "Schema", "GroupedTable", "Flow", "Node", "Plan", "QID",
    "FlowError", "SchemaError", "OperatorError", "Overloaded", "WorkerLost", "DeploymentClosed", "NoWorkers",
    "Cancelled", "cancelled", "RepeatWarning",
    "optimize", "deploy", "inspect", "Deployment", "profile", "Profile", "SLOUnreachable",
]


def __getattr__(name):
    # Later layers load on first use, so `import flowkit` stays light.
    if name in ("deploy", "Deployment"):
        from .runtime import deployment
        return getattr(deployment, name)
    if name in ("profile", "Profile"):
        from . import profiling   # (not "profile": the submodule would shadow the function)
        return getattr(profiling, name)
    if name == "SLOUnreachable":
        from .planner import SLOUnreachable
        return SLOUnreachable
    if name == "inspect":
        from flowkit_widgets import inspect
        return inspect
    if name == "gpu":
        import importlib
        return importlib.import_module(".gpu", __name__)
    raise AttributeError(f"module 'flowkit' has no attribute {name!r}")
