"""A stand-in for tensorflow_model_server, for tests and machines without it.

Serves one exported SavedModel version on 127.0.0.1 over TF Serving's REST
API and gRPC `PredictionService.Predict`, answering with the SavedModel's
own signatures, so a client that works against it speaks the formats the
real server expects:

* `POST /v1/models/<model>[/versions/<v>]:predict`, in the row format
  (`{"instances": [...]}` -> `{"predictions": [...]}`) or the columnar one
  (`{"inputs": ...}` -> `{"outputs": ...}`); strings as `{"b64": ...}`.
* `GET /v1/models/<model>[/versions/<v>]`: the version's status.
* Errors as TF Serving gives them: HTTP 400 `{"error": ...}` for a bad
  request (malformed JSON or base64, values outside the input's dtype,
  wrong shapes, an empty `instances` list, an unknown signature or input
  name), 404 for an unknown model, version or label, or path; gRPC
  INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND. An unexpected
  failure answers 500, never a dropped connection.

Not a production server: no batching, no version policy, one version, no
labels.

    python -m serving.local_server --saved_model=/srv/models/lfm/1 \
        --model=lfm --rest_port=8501 --grpc_port=8500
"""

import base64
import binascii
import concurrent.futures
import http.server
import json
import os
import re
import threading

import numpy as np
import tensorflow as tf
from absl import logging

DEFAULT_SIGNATURE = "serving_default"

# TF Serving's mapping of status codes to HTTP (http_server.cc).
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400,
               "NOT_FOUND": 404, "UNAVAILABLE": 503, "INTERNAL": 500}


class RequestError(Exception):
    """A request the server refuses: a TF Serving status and its message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self):
        return HTTP_STATUS[self.code]


def _bad(message):
    return RequestError("INVALID_ARGUMENT", message)


# ------------------------------------------------------------ JSON inputs


def _nested_shape(value, name, path=()):
    """Shape of a nested JSON list, or RequestError if it is ragged."""
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    shapes = {_nested_shape(item, name, path + (i,))
              for i, item in enumerate(value)}
    if len(shapes) > 1:
        raise _bad(
            f"Input {name!r} is ragged: the lists at {_where(name, path)} "
            f"have shapes {sorted(shapes)}; every item of a batch must have "
            "the same shape (one tensor).")
    return (len(value),) + shapes.pop()


def _where(name, path):
    return name + "".join(f"[{i}]" for i in path)


def _string_leaf(value, name, path):
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise _bad(
                f"{_where(name, path)} is an object with keys "
                f"{sorted(value)}; expected a string or {{\"b64\": "
                "\"<base64>\"}} for binary data.")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise _bad(
                f"Unable to base64-decode {_where(name, path)}: {error}. "
                "Send standard base64 (RFC 4648, with padding), e.g. "
                "base64.b64encode(data).decode('ascii').") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    raise _bad(f"{_where(name, path)} is {value!r}; input {name!r} is a "
               "string tensor: send strings or {\"b64\": ...}.")


def _strings_to_array(value, name, path=()):
    if isinstance(value, list):
        return [_strings_to_array(v, name, path + (i,))
                for i, v in enumerate(value)]
    return _string_leaf(value, name, path)


def _numbers_to_array(value, dtype, name):
    """JSON numbers -> numpy `dtype`, refusing what would not fit."""
    dtype = np.dtype(dtype)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError) as error:
        raise _bad(f"Input {name!r} is not a rectangular array of numbers "
                   f"({error}).") from None
    if array.size == 0:
        return array.astype(dtype)
    kind = array.dtype.kind
    integers = dtype.kind in "iu"
    expected = f"{dtype.name} numbers" + (
        f" (integers {np.iinfo(dtype).min}..{np.iinfo(dtype).max})"
        if integers else "")
    if kind in "iuf" and any(isinstance(v, bool) for v in
                             np.asarray(value, dtype=object).flat):
        kind = "b"  # numpy made true/false among numbers into numbers
        array = np.asarray(value, dtype=object)
    # Booleans, strings, objects (mixed or huge ints); floats for integers.
    if kind not in "iuf" or (integers and kind == "f"):
        raise _bad(f"Input {name!r} holds {array.flat[0]!r} "
                   f"({array.dtype.name} values); expected {expected}.")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        outside = (array < info.min) | (array > info.max)
        if np.any(outside):
            position = tuple(int(i) for i in np.argwhere(outside)[0])
            raise _bad(
                f"{_where(name, position)} = {array[position]} is outside "
                f"{dtype.name}'s range {info.min}..{info.max}; expected "
                f"{expected} (pixel values 0..255 for images).")
    return array.astype(dtype)


# ---------------------------------------------------------------- backend


def _version_from_path(path):
    """TF Serving's layout names a version directory by its number."""
    name = os.path.basename(os.path.normpath(path))
    return int(name) if name.isdigit() else 1


class SavedModelBackend:
    """One version of a SavedModel: checks a request, runs a signature.

    Args:
      path: the SavedModel (version) directory.
      model_name: the name requests address.
      version: its version number; default: the directory's name when it
        is numeric (TF Serving's layout), else 1.
    """

    def __init__(self, path, model_name, version=None):
        self.model_name = model_name
        self.version = int(version) if version is not None else (
            _version_from_path(path))
        self.loaded = tf.saved_model.load(path)

    def check_servable(self, model, version=None, label=None):
        """RequestError NOT_FOUND unless this server holds that version."""
        if model != self.model_name:
            raise RequestError(
                "NOT_FOUND", f"Servable not found for request: "
                f"Latest({model}); this server serves "
                f"{self.model_name!r} only.")
        if label is not None:
            raise RequestError(
                "NOT_FOUND", f"Unrecognized servable version label: {label} "
                "(this server has no version labels); request "
                f"/versions/{self.version} or no version.")
        if version is not None and int(version) != self.version:
            raise RequestError(
                "NOT_FOUND", f"Servable not found for request: "
                f"Specific({model}, {int(version)}); this server serves "
                f"version {self.version} only.")

    def signature(self, name):
        """The concrete function, or FAILED_PRECONDITION as TF Serving."""
        name = name or DEFAULT_SIGNATURE
        signatures = self.loaded.signatures
        if name not in signatures:
            raise RequestError(
                "FAILED_PRECONDITION",
                f"Serving signature key \"{name}\" not found. Signatures: "
                f"{sorted(signatures)}.")
        return signatures[name]

    def input_specs(self, signature_name):
        return self.signature(signature_name).structured_input_signature[1]

    def run(self, signature_name, inputs):
        """inputs: {name: numpy array} -> {output name: numpy array}.

        Raises:
          RequestError: unknown signature or input names, a dtype or a
            shape the signature does not take, or the graph's own
            INVALID_ARGUMENT (its message).
        """
        signature = self.signature(signature_name)
        specs = signature.structured_input_signature[1]
        name = signature_name or DEFAULT_SIGNATURE
        if set(inputs) != set(specs):
            raise _bad(
                f"Signature {name!r} takes inputs {sorted(specs)}; received "
                f"{sorted(inputs)}.")
        tensors = {}
        for key, value in inputs.items():
            spec = specs[key]
            value = np.asarray(value)
            if spec.dtype == tf.string:
                ok = value.dtype.kind in "OSU" or value.size == 0
            else:
                ok = value.dtype == spec.dtype.as_numpy_dtype
            if not ok:
                raise _bad(
                    f"Expects input {key!r} of signature {name!r} to be "
                    f"{spec.dtype.name} but {value.dtype.name} is provided.")
            if not spec.shape.is_compatible_with(value.shape):
                raise _bad(
                    f"Input {key!r} of signature {name!r} has shape "
                    f"{list(value.shape)}; expected "
                    f"{_shape_text(spec.shape)}.")
            tensors[key] = tf.constant(value, dtype=spec.dtype)
        try:
            outputs = signature(**tensors)
        except tf.errors.InvalidArgumentError as error:
            raise _bad(error.message) from None
        return {k: v.numpy() for k, v in outputs.items()}

    def status(self):
        """GET /v1/models/<model>: TF Serving's model status reply."""
        return {"model_version_status": [{
            "version": str(self.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}


def _shape_text(shape):
    if shape.rank is None:
        return "any shape"
    return "[" + ", ".join("batch" if i == 0 and d is None else
                           ("any" if d is None else str(d))
                           for i, d in enumerate(shape.as_list())) + "]"


def parse_json_inputs(body, specs):
    """A decoded REST body -> ({input name: numpy array}, row format?).

    Args:
      body: the request's JSON object.
      specs: {input name: tf.TensorSpec} of the signature.

    Raises:
      RequestError: INVALID_ARGUMENT naming what is wrong.
    """
    if not isinstance(body, dict):
        raise _bad(f"The request body is a JSON {type(body).__name__}; "
                   "expected an object with \"instances\" or \"inputs\".")
    if ("instances" in body) == ("inputs" in body):
        raise _bad("Missing 'inputs' or 'instances' key" if
                   "instances" not in body else
                   "The request has both 'instances' and 'inputs'; send "
                   "one (row format or columnar format).")
    names = sorted(specs)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise _bad("'instances' must be a list, one item per example.")
        if not instances:
            raise _bad("'instances' is an empty list; send at least one "
                       "instance.")
        named = [isinstance(i, dict) and set(i) != {"b64"} for i in instances]
        if any(named) and not all(named):
            raise _bad("'instances' mixes objects of named inputs with bare "
                       "values; use one form for every instance.")
        if all(named):
            for position, instance in enumerate(instances):
                if set(instance) != set(names):
                    raise _bad(
                        f"instances[{position}] has inputs "
                        f"{sorted(instance)}; the signature takes {names}.")
            columns = {n: [i[n] for i in instances] for n in names}
        elif len(names) == 1:
            columns = {names[0]: instances}
        else:
            raise _bad(f"The signature takes several inputs {names}: each "
                       "instance must be an object keyed by input name.")
    else:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and set(inputs) != {"b64"}:
            columns = inputs
        elif len(names) == 1:
            columns = {names[0]: inputs}
        else:
            raise _bad(f"The signature takes several inputs {names}: "
                       "'inputs' must be an object keyed by input name.")
        unknown = sorted(set(columns) - set(names))
        missing = sorted(set(names) - set(columns))
        if unknown or missing:
            raise _bad(f"'inputs' has {sorted(columns)}; the signature "
                       f"takes {names}.")
    arrays = {}
    for name, value in columns.items():
        shape = _nested_shape(value, name)
        if specs[name].dtype == tf.string:
            array = np.empty(shape, dtype=object)
            converted = _strings_to_array(value, name)
            if shape:
                array[...] = _object_fill(converted, shape)
            else:
                array = np.asarray(converted, dtype=object)
        else:
            array = _numbers_to_array(value, specs[name].dtype.as_numpy_dtype,
                                      name)
        arrays[name] = array
    return arrays, "instances" in body


def _object_fill(nested, shape):
    """Nested lists of bytes -> object array of `shape` (no bytes merging)."""
    array = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        item = nested
        for i in index:
            item = item[i]
        array[index] = item
    return array


def _to_json(value):
    if isinstance(value, np.ndarray):
        return [_to_json(v) for v in value] if value.ndim else _to_json(
            value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def json_reply(outputs, row_format):
    """Outputs -> TF Serving's JSON reply (row or columnar format)."""
    if not row_format:
        if len(outputs) == 1:
            return {"outputs": _to_json(next(iter(outputs.values())))}
        return {"outputs": {k: _to_json(v) for k, v in outputs.items()}}
    batch = len(next(iter(outputs.values())))
    if len(outputs) == 1:
        return {"predictions": _to_json(next(iter(outputs.values())))}
    return {"predictions": [{k: _to_json(v[i]) for k, v in outputs.items()}
                            for i in range(batch)]}


# ------------------------------------------------------------------- REST

_PATH = re.compile(
    r"^/v1/models/(?P<model>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?::(?P<verb>[A-Za-z]+))?$")


def make_rest_handler(backend, fail_first=0):
    """An HTTP handler class for TF Serving's REST predict and status.

    Args:
      backend: `SavedModelBackend`.
      fail_first: answer this many requests with 503 first (tests retries).
    """
    state = {"failures_left": fail_first, "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        """TF Serving's REST API: predict (row and columnar) and status."""

        def log_message(self, *args):
            del args

        def _reply(self, code, payload):
            body = json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client gave up.

        def _route(self, method):
            match = _PATH.match(self.path.split("?")[0])
            if not match:
                raise RequestError(
                    "NOT_FOUND", f"Malformed request: {method} {self.path}; "
                    "expected /v1/models/<model>[/versions/<n>]:predict.")
            version = match["version"]
            if version is not None and not version.isdigit():
                raise RequestError(
                    "NOT_FOUND", f"Malformed request: {method} {self.path}: "
                    f"version {version!r} is not a number.")
            verb = match["verb"]
            if (method == "POST") != (verb is not None) or (
                    verb not in (None, "predict")):
                raise RequestError(
                    "NOT_FOUND", f"Malformed request: {method} {self.path}; "
                    "this server answers POST .../<model>:predict and GET "
                    ".../<model> (status).")
            backend.check_servable(match["model"], version, match["label"])

        def _answer(self, method, handle):
            try:
                self._reply(200, handle())
            except RequestError as error:
                self._reply(error.http_status, {"error": error.message})
            except Exception as error:  # pylint: disable=broad-except
                # Answer, rather than drop the connection: a client would
                # take a dropped one for an outage and retry.
                logging.exception("%s %s failed", method, self.path)
                self._reply(500, {"error": f"Internal error: "
                                           f"{type(error).__name__}: {error}"})

        def do_GET(self):  # pylint: disable=invalid-name
            def handle():
                self._route("GET")
                return backend.status()
            self._answer("GET", handle)

        def do_POST(self):  # pylint: disable=invalid-name
            # Read the whole body first: replying before it is read resets
            # the connection on the client's side.
            length = self.headers.get("Content-Length")
            raw = self.rfile.read(int(length)) if (
                length and length.isdigit()) else b""
            record = {"path": self.path, "body": None}
            state["requests"].append(record)

            def handle():
                if not length or not length.isdigit():
                    raise _bad("The request has no Content-Length; send the "
                               "JSON body with its length.")
                try:
                    body = json.loads(raw)
                except (UnicodeDecodeError, ValueError) as error:
                    raise _bad(f"JSON Parse error: {error}") from None
                record["body"] = body
                if state["failures_left"] > 0:
                    state["failures_left"] -= 1
                    raise RequestError("UNAVAILABLE", "warming up")
                self._route("POST")
                name = body.get("signature_name") if isinstance(
                    body, dict) else None
                if name is not None and not isinstance(name, str):
                    raise _bad(f"signature_name is {name!r}; expected a "
                               "string.")
                specs = backend.input_specs(name)
                inputs, row_format = parse_json_inputs(body, specs)
                outputs = backend.run(name, inputs)
                return json_reply(outputs, row_format)

            self._answer("POST", handle)

    Handler.state = state
    return Handler


def start_rest(backend, port=0, fail_first=0):
    """Starts the REST server on 127.0.0.1 in a thread; returns it."""
    handler = make_rest_handler(backend, fail_first)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.state = handler.state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ------------------------------------------------------------------- gRPC


def start_grpc(backend, port=0):
    """Starts a gRPC PredictionService on 127.0.0.1; returns (server, port)."""
    # pylint: disable=g-import-not-at-top
    import grpc
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        """Predict only."""

        def Predict(self, request, context):  # pylint: disable=invalid-name
            spec = request.model_spec
            try:
                backend.check_servable(
                    spec.name,
                    spec.version.value if spec.HasField("version") else None,
                    spec.version_label or None)
                inputs = {}
                for key, proto in request.inputs.items():
                    try:
                        inputs[key] = tf.make_ndarray(proto)
                    except (TypeError, ValueError) as error:
                        raise _bad(f"Input {key!r} is not a valid "
                                   f"TensorProto: {error}") from None
                outputs = backend.run(spec.signature_name, inputs)
            except RequestError as error:
                context.abort(getattr(grpc.StatusCode, error.code),
                              error.message)
            reply = predict_pb2.PredictResponse()
            reply.model_spec.CopyFrom(spec)
            reply.model_spec.version.value = backend.version
            for name, value in outputs.items():
                reply.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return reply

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        Servicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def main():
    import argparse  # pylint: disable=g-import-not-at-top

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saved_model", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=int, default=None,
                        help="default: the directory name if numeric, "
                             "else 1")
    parser.add_argument("--rest_port", type=int, default=8501)
    parser.add_argument("--grpc_port", type=int, default=8500)
    args = parser.parse_args()
    backend = SavedModelBackend(args.saved_model, args.model, args.version)
    rest = start_rest(backend, args.rest_port)
    grpc_server, port = start_grpc(backend, args.grpc_port)
    print(f"{args.model} version {backend.version}: REST on "
          f"127.0.0.1:{rest.server_address[1]}, gRPC on 127.0.0.1:{port}; "
          "Ctrl-C to stop")
    grpc_server.wait_for_termination()


if __name__ == "__main__":
    main()
