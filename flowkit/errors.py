"""The errors flowkit raises: part of the API contract.

``FlowError`` is the base of everything flowkit raises on purpose. A ``SchemaError`` is raised
before any work starts; an ``OperatorError`` wraps an exception raised by user code and names
the operator and the row; ``Overloaded`` is admission control saying no instead of queueing.
What callers branch on has a type of its own: ``WorkerLost`` (a request's worker died more
often than it may be retried), ``DeploymentClosed`` (any use of a closed deployment) and
``NoWorkers`` (no worker took the request in time). Each maps to its own HTTP status
(``HTTP_STATUS``).
"""

from __future__ import annotations

__all__ = ["FlowError", "SchemaError", "OperatorError", "Overloaded", "WorkerLost", "DeploymentClosed",
           "NoWorkers", "HTTP_STATUS"]


class FlowError(Exception):
    """Base class of flowkit's errors (a flow built wrongly, a bad argument, a failed run)."""


class SchemaError(FlowError):
    """Data or declared types that do not match a schema; names the column."""

    def __init__(self, message: str, column: str | None = None):
        super().__init__(message)
        self.column = column

    def __reduce__(self):
        return (type(self), (self.args[0], self.column))


class OperatorError(FlowError):
    """User code raised inside an operator: names the operator and the row's qid.

    The user's exception is chained (``__cause__``) and also kept as ``.original`` so that it
    survives pickling between processes.
    """

    def __init__(self, operator: str, qid, original: BaseException | None = None, message: str | None = None):
        self.operator = operator
        self.qid = qid
        self.original = original
        if message is None:
            where = f" on row qid={qid}" if qid is not None else ""
            message = f"operator {operator!r} raised {type(original).__name__}: {original}{where}"
        super().__init__(message)
        if original is not None:
            self.__cause__ = original

    def __reduce__(self):
        return (_rebuild_operator_error, (self.operator, self.qid, self.original, self.args[0]))


def _rebuild_operator_error(operator, qid, original, message):
    return OperatorError(operator, qid, original, message)


class Overloaded(FlowError):
    """Admission control refused a request: too many are in flight. Retry later."""


class WorkerLost(FlowError):
    """The request's worker died (or left) while running it, as many times as the deployment
    retries a request (``retries``). Sending it again may succeed."""


class DeploymentClosed(FlowError):
    """The deployment was closed: before this request finished, or before this call."""


class NoWorkers(FlowError):
    """No worker took the request within the deployment's ``timeout`` (the cluster has none
    that holds this deployment, or they are all starting)."""


#: the HTTP status of each error a caller branches on (the most specific class wins);
#: 503s carry ``Retry-After``.
HTTP_STATUS: dict[type, int] = {SchemaError: 422, OperatorError: 500, Overloaded: 503, WorkerLost: 503,
                                NoWorkers: 503, DeploymentClosed: 410, FlowError: 500}
