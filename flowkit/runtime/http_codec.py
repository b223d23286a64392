"""HTTP's JSON, both ways, as pure functions: request bodies to rows, tables to answers, and
every error to its status and JSON body (the front door is ``http``).

Values travel as JSON: ``bytes`` columns as base64 strings, ``numpy.ndarray`` columns as nested
lists; answers are ``{"rows": [{"qid": ..., <columns>}]}``. In an answer a float NaN is ``null``
(flowkit's rule: NaN is a null value) and an infinity is a 500 naming its column. Every error is
``{"error": <message>, "type": <the error's class name>, ...}``: the HTTP layer's own refusals
(``MalformedJSON`` 400, ``Unauthorized`` 401, ``UnknownFlow`` 404, ``BodyTimeout`` 408,
``BodyTooLarge`` 413, ``BadResult`` 500, ``AnswerTimeout`` 504), flowkit's errors by
``flowkit.errors.HTTP_STATUS`` (503s with ``Retry-After``), anything else a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from ..errors import HTTP_STATUS, FlowError, OperatorError, SchemaError
from ..schema import Schema, type_name
from ..table import Table

__all__ = ["Refused", "MalformedJSON", "Unauthorized", "UnknownFlow", "BodyTimeout", "BodyTooLarge", "ClientGone",
           "BadResult", "AnswerTimeout", "status_of", "error_answer", "decode_rows", "encode_rows", "encode_table", "parse_json",
           "label_value", "schema_json", "bad_result"]


# -- the HTTP layer's own refusals ----------------------------------------------------------------
class Refused(Exception):
    """A request the HTTP layer answers with an error of its own (``status``); ``fields`` go
    into the JSON body beside the message, ``headers`` onto the response."""

    status = 500

    def __init__(self, message: str, *, headers: dict | None = None, **fields):
        super().__init__(message)
        self.headers = headers or {}
        self.fields = fields


class MalformedJSON(Refused):
    status = 400


class Unauthorized(Refused):
    status = 401


class UnknownFlow(Refused):
    status = 404


class BodyTimeout(Refused):
    status = 408


class BodyTooLarge(Refused):
    status = 413


class ClientGone(Refused):
    status = 499   # never sent: the client is gone; counted in /metrics


class BadResult(Refused):
    """The flow's result broke its declared types or holds a value JSON cannot carry."""
    status = 500


class AnswerTimeout(Refused):
    status = 504


def status_of(error: BaseException) -> int:
    """The status that answers ``error``: a refusal's own, the most specific class of a flowkit
    error in ``HTTP_STATUS``, 500 for anything else.

    >>> from flowkit.errors import SchemaError, WorkerLost
    >>> status_of(WorkerLost("gone")), status_of(SchemaError("x")), status_of(KeyError("k"))
    (503, 422, 500)
    """
    if isinstance(error, Refused):
        return error.status
    return next((HTTP_STATUS[c] for c in type(error).__mro__ if c in HTTP_STATUS), 500)


def error_answer(error: BaseException) -> tuple[int, dict, dict]:
    """The status, JSON body and headers that answer a request which raised ``error``.

    >>> from flowkit.errors import Overloaded
    >>> error_answer(Overloaded("busy"))
    (503, {'error': 'busy', 'type': 'Overloaded'}, {'Retry-After': '1'})
    >>> error_answer(KeyError("k"))[:2]
    (500, {'error': "internal error: KeyError: 'k'", 'type': 'KeyError'})
    """
    status = status_of(error)
    kind = type(error).__name__
    if isinstance(error, (FlowError, Refused)):
        body = {"error": str(error), "type": kind, **_error_fields(error)}
    else:
        body = {"error": f"internal error: {kind}: {error}", "type": kind}
    headers = {"Retry-After": "1"} if status == 503 else {}
    return status, body, {**headers, **getattr(error, "headers", {})}


def _error_fields(error: Exception) -> dict:
    """What an error names besides its message: the operator and row, or the column."""
    if isinstance(error, OperatorError):
        return {"operator": error.operator, "qid": _encode_value(error.qid)}
    if isinstance(error, SchemaError):
        return {"column": error.column}
    if isinstance(error, Refused):
        return error.fields
    return {}


# -- JSON <-> tables (pure) -------------------------------------------------------------------------
def _decode_value(v: Any, t: Any, column: str) -> Any:
    if v is None:
        return None
    if t is bytes:
        if not isinstance(v, str):
            raise SchemaError(f"column {column!r} expects bytes as a base64 string, found {type(v).__name__}", column)
        try:
            # (strict: validated while decoded; b64decode(validate=True) runs a regex over it first)
            return binascii.a2b_base64(v, strict_mode=True)
        except Exception:
            raise SchemaError(f"column {column!r} expects bytes as a base64 string; it is not valid base64",
                              column) from None
    if t is np.ndarray:
        try:
            a = np.asarray(v, dtype=np.float32 if _is_float_list(v) else None)
        except Exception:
            a = None
        if a is None or a.dtype.kind not in "biuf":
            raise SchemaError(f"column {column!r} expects an array as nested lists of numbers, found "
                              f"{type(v).__name__}", column)
        return a
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _is_float_list(v) -> bool:
    while isinstance(v, list) and v:
        v = v[0]
    return isinstance(v, float)


def decode_rows(payload: Any, schema: Schema) -> list[dict]:
    """The request's rows as dicts of Python values (bytes and arrays decoded), checked for shape.

    >>> from flowkit.schema import Schema
    >>> decode_rows({"rows": [{"img": "aGk="}]}, Schema({"img": bytes}))
    [{'img': b'hi'}]
    >>> decode_rows({"columns": {"x": [1, 2]}}, Schema({"x": int}))
    [{'x': 1}, {'x': 2}]
    """
    if isinstance(payload, dict) and "rows" in payload:
        rows = payload["rows"]
    elif isinstance(payload, dict) and "columns" in payload:
        cols = payload["columns"]
        if not isinstance(cols, dict) or not all(isinstance(v, list) for v in cols.values()):
            raise SchemaError('"columns" must map column names to lists of values')
        lengths = {len(v) for v in cols.values()}
        if len(lengths) > 1:
            raise SchemaError(f"columns have different lengths: { {k: len(v) for k, v in cols.items()} }")
        n = lengths.pop() if lengths else 0
        rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    elif isinstance(payload, list):
        rows = payload
    elif isinstance(payload, dict):
        rows = [payload]
    else:
        raise SchemaError('send {"rows": [...]}, {"columns": {...}} or a list of rows')
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SchemaError("each row must be a JSON object of column values")
    out = []
    for r in rows:
        row = {}
        for k, v in r.items():
            if k not in schema.index:
                raise SchemaError(f"unexpected column {k!r}; the flow's input has {list(schema.names)}", column=k)
            row[k] = _decode_value(v, schema[k], k)
        out.append(row)
    return out


def _encode_value(v: Any) -> Any:
    """A result value as JSON data. A float NaN is ``None`` (flowkit's null) wherever it is, in
    an array or a container too; an infinity is left for the JSON writer to refuse.

    >>> _encode_value([float("nan"), np.float32("nan"), np.array([1.5, np.nan]), b"hi"])
    [None, None, [1.5, None], 'aGk=']
    """
    if isinstance(v, float):   # numpy's float64 too
        return None if v != v else v
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if isinstance(v, np.ndarray):
        return _encode_array(v)
    if isinstance(v, np.generic):
        return _encode_value(v.item())
    if hasattr(v, "tolist") and type(v).__name__ == "Tensor":
        return _encode_value(v.tolist())
    if isinstance(v, dict):
        return {str(k): _encode_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_encode_value(x) for x in v]
    return v


def _encode_array(a: np.ndarray) -> Any:
    """An array as nested lists, its NaNs as ``None`` (checked in bulk: arrays are big)."""
    if a.dtype.kind == "f":
        nan = np.isnan(a)
        return np.where(nan, None, a.astype(object)).tolist() if nan.any() else a.tolist()
    if a.dtype.kind == "O":
        return _encode_value(a.tolist())
    return a.tolist()


def encode_rows(table: Table) -> dict:
    """A request's JSON body for ``table``'s rows, as a client sends them (``decode_rows`` reads
    it back).

    >>> from flowkit.schema import Schema
    >>> body = encode_rows(Table({"img": bytes, "x": int}, [(b"hi", 3)]))
    >>> body, decode_rows(body, Schema({"img": bytes, "x": int}))
    ({'rows': [{'img': 'aGk=', 'x': 3}]}, [{'img': b'hi', 'x': 3}])
    """
    names = table.schema.names
    return {"rows": [{n: _encode_value(v) for n, v in zip(names, r)} for r in table.rows]}


def encode_table(table: Table) -> dict:
    """The answer's JSON data: one object per row, its qid first.

    >>> encode_table(Table({"y": float}, [(0.5,), (float("nan"),)]))
    {'rows': [{'qid': 0, 'y': 0.5}, {'qid': 1, 'y': None}]}
    """
    names = table.schema.names
    return {"rows": [{"qid": _encode_value(q), **{n: _encode_value(v) for n, v in zip(names, r)}}
                     for r, q in zip(table.rows, table.qids)]}


def bad_result(table: Table) -> BadResult:
    """The error naming the first column of ``table`` that JSON cannot carry (slow: for the error)."""
    for name in table.schema.names:
        for value in table.column(name):
            try:
                json.dumps(_encode_value(value), allow_nan=False)
            except ValueError:   # what is left after encoding: an infinity
                return BadResult(f"column {name!r} of the result holds an infinite number, which JSON cannot "
                                 "carry", column=name)
            except TypeError:
                return BadResult(f"column {name!r} of the result holds a {type(value).__name__} that JSON cannot "
                                 "carry", column=name)
    return BadResult("the result cannot be written as JSON")


def parse_json(body: bytes) -> Any:
    """The request body's JSON; ``MalformedJSON`` for anything else, nesting too deep included.

    >>> parse_json(b"[" * 100_000 + b"]" * 100_000)
    Traceback (most recent call last):
    ...
    flowkit.runtime.http_codec.MalformedJSON: malformed JSON: nested too deeply
    """
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedJSON(f"malformed JSON: {e}") from None
    except RecursionError:
        raise MalformedJSON("malformed JSON: nested too deeply") from None


def label_value(value: Any) -> str:
    r"""``value`` as a Prometheus label value: backslash, double quote and newline escaped.

    >>> print(label_value('say "hi" \\ bye\n'))
    say \"hi\" \\ bye\n
    """
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def schema_json(schema: Schema) -> dict:
    return {n: type_name(t) for n, t in schema.items()}


