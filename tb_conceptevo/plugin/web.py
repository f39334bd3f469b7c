"""HTTP plumbing of the plugin: parameter validation, JSON errors, ETags, responses.

Every handler is wrapped by :func:`route`: a :class:`BadRequest` answers 400, a
:class:`~tb_conceptevo.reading.DataNotFound` 404, an unreadable payload 422 -- each with
a JSON body ``{"error": "..."}`` -- and anything unexpected is logged server-side and
answers a generic JSON 500 without a stack trace.  All responses go through
``http_util.Respond`` (content type, ``nosniff``, CSP).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from typing import Iterable, Optional

import numpy as np
from tensorboard import errors as tb_errors
from tensorboard.backend import http_util
from werkzeug import wrappers

from ..format import metadata
from ..reading import DataNotFound
from ..format.summary import PayloadError

logger = logging.getLogger(__name__)

JSON = "application/json"
BINARY = "application/octet-stream"
PNG = "image/png"

#: Bump when the shape of an answer changes, so browsers drop old cached copies.
API_VERSION = "1"

_MAX_PARAM_CHARS = 1024
_INT_PATTERN = re.compile(r"[0-9]{1,18}")
_NUMBER_PATTERN = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


class BadRequest(ValueError):
    """A missing or malformed request parameter (answers 400)."""


# ----------------------------------------------------------------------------- parameters

def _single(request, name: str, required: bool) -> Optional[str]:
    values = request.args.getlist(name)
    if not values:
        if required:
            raise BadRequest(f"missing parameter {name!r}; add ?{name}=... to the request")
        return None
    if len(values) > 1:
        raise BadRequest(f"parameter {name!r} given {len(values)} times; give it once")
    value = values[0]
    if len(value) > _MAX_PARAM_CHARS or "\x00" in value:
        raise BadRequest(f"parameter {name!r} is too long or contains NUL characters")
    return value


def run_param(request, name: str = "run") -> str:
    """A run name (any non-empty string; its existence is checked against the logs)."""
    value = _single(request, name, True)
    if not value:
        raise BadRequest(f"parameter {name!r} is empty; use a run name listed by /runs")
    return value


def name_param(request, name: str, required: bool = True) -> Optional[str]:
    """A layer / space / detector name: letters, digits, ``_``, ``-``, ``.``."""
    value = _single(request, name, required)
    if value is None:
        return None
    try:
        return metadata.check_name(value, name)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def int_param(request, name: str, required: bool = True, maximum: int = 2**62) -> Optional[int]:
    """A non-negative integer written in decimal digits only."""
    value = _single(request, name, required)
    if value is None:
        return None
    if not _INT_PATTERN.fullmatch(value) or int(value) > maximum:
        raise BadRequest(f"parameter {name!r} must be a non-negative integer <= {maximum}, got {value!r}")
    return int(value)


def number_param(request, name: str) -> float:
    """A required non-negative decimal number (pixel coordinates)."""
    value = _single(request, name, True)
    if not _NUMBER_PATTERN.fullmatch(value):
        raise BadRequest(f"parameter {name!r} must be a non-negative number such as 12 or 12.5, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- JSON

def json_safe(value):
    """Recursively turn numpy values into JSON ones; NaN / Inf become ``null``.

    (``http_util.Respond`` would turn NaN into the *string* ``"NaN"``.)

    >>> json_safe({"a": np.array([1.0, np.nan], np.float32), "b": np.int64(3)})
    {'a': [1.0, None], 'b': 3}
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            as_object = value.astype(np.float64).astype(object)
            as_object[~np.isfinite(value)] = None
            return as_object.tolist()
        return value.tolist()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def dumps(value) -> str:
    return json.dumps(json_safe(value), separators=(",", ":"), allow_nan=False)


# ----------------------------------------------------------------------------- responses

def etag_of(*parts) -> str:
    """A strong ETag for immutable data identified by ``parts``."""
    digest = hashlib.sha1(repr((API_VERSION,) + parts).encode("utf-8")).hexdigest()[:24]
    return f'"{digest}"'


def not_modified(request, etag: Optional[str]) -> bool:
    if etag is None:
        return False
    header = request.headers.get("If-None-Match", "")
    return any(tag.strip() in (etag, "*", "W/" + etag) for tag in header.split(","))


def respond(request, content, content_type: str, etag: Optional[str] = None,
            headers: Iterable = (), code: int = 200):
    """``http_util.Respond`` with an optional ETag (and 304 when the client has it)."""
    extra = list(headers)
    if etag is not None:
        extra.append(("ETag", etag))
        if not_modified(request, etag):
            return http_util.Respond(request, b"", content_type, code=304, headers=extra)
    if content_type == JSON and not isinstance(content, (str, bytes)):
        content = dumps(content)
    return http_util.Respond(request, content, content_type, code=code, headers=extra)


def error(request, code: int, message: str):
    return http_util.Respond(request, dumps({"error": message}), JSON, code=code)


def route(handler):
    """Wrap a handler ``(self, request) -> Response`` into a WSGI app with JSON errors."""

    @wrappers.Request.application
    @functools.wraps(handler)
    def app(self, request):
        if request.method not in ("GET", "HEAD"):
            return error(request, 405, f"{request.method} is not supported; use GET")
        try:
            return handler(self, request)
        except BadRequest as exc:
            return error(request, 400, str(exc))
        except DataNotFound as exc:
            return error(request, 404, str(exc))
        except PayloadError as exc:
            return error(request, 422, f"logged data{_naming(request)} cannot be read: {exc}")
        except tb_errors.PublicError as exc:  # from the data provider (e.g. unknown blob)
            code = exc.http_code if 400 <= exc.http_code < 500 else 503
            return error(request, code, str(exc))
        except Exception:  # never leak a stack trace to the client
            logger.exception("conceptevo: %s failed", request.full_path)
            return error(request, 500, "internal error of the conceptevo plugin; the TensorBoard log has details")

    return app


#: Request parameters that name the logged series a route reads (its run and tag, and the step).
_NAMING_PARAMETERS = ("run", "layer", "space", "detector", "class", "step")


def _naming(request) -> str:
    """`` of run 'a', layer 'b', step 2``: which logged data a 422 is about (handlers
    validate these parameters before reading, so they are short and printable)."""
    named = [f"{name} {request.args[name][:200]!r}" for name in _NAMING_PARAMETERS if name in request.args]
    return f" of {', '.join(named)}" if named else ""

