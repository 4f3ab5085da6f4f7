"""A client for the exported classifiers served by TF Serving.

    python -m serving.client --host=localhost --model=lfm cat.jpg dog.png
    python -m serving.client --protocol=grpc --model=lfm --version=2 cat.jpg

`ServingClient` speaks TF Serving's REST API (`POST
/v1/models/<model>[/versions/<v>|/labels/<l>]:predict`, JSON, through
urllib: no extra dependency) or its gRPC `PredictionService.Predict`
(`tensorflow_serving.apis`). Encoded images go to the `serving_bytes`
signature (base64 `{"b64": ...}` in JSON), uint8 pixel arrays to
`serving_default`. Each attempt is bounded by `timeout` seconds; connection
failures, HTTP 502/503/429 and gRPC UNAVAILABLE/RESOURCE_EXHAUSTED are
retried with exponential backoff; a timeout is not retried (the server is
slow, not down) and raises `ServingTimeoutError`. A refused request (HTTP
400/404 and every other 4xx but 429; gRPC INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, ...) is never retried: `ServingError` carries the
server's own message and its `status`.
"""

import argparse
import base64
import http.client
import json
import random
import socket
import sys
import time
import urllib.error
import urllib.request

import numpy as np

REST_PORT = 8501
GRPC_PORT = 8500
SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"

# HTTP statuses worth another attempt: TF Serving answers 503 for
# UNAVAILABLE and 429 for RESOURCE_EXHAUSTED (e.g. a full batching queue);
# 502 comes from proxies in front of a restarting server. 504 is TF
# Serving's DEADLINE_EXCEEDED: a timeout, not retried.
RETRYABLE_HTTP = (429, 502, 503)


class ServingError(RuntimeError):
    """A request that failed: the server's answer or the last failure.

    Attributes:
      status: the server's HTTP status (int) or gRPC code name (str), when
        it answered; None otherwise.
    """

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ServingTimeoutError(ServingError, TimeoutError):
    """An attempt took longer than the client's or the server's timeout."""


class ServingUnavailableError(ServingError, ConnectionError):
    """The server stayed unreachable or unavailable through every retry."""


class _Retryable(Exception):
    """Internal: an attempt failed in a way another attempt may fix."""


# ------------------------------------------------------------------- REST


def rest_url(host, port, model, version=None, version_label=None,
             verb="predict"):
    """`http://host:port/v1/models/<model>[/versions/<v>|/labels/<l>]:verb`."""
    if version is not None and version_label is not None:
        raise ValueError("Pass version or version_label, not both.")
    path = f"/v1/models/{model}"
    if version is not None:
        path += f"/versions/{int(version)}"
    elif version_label is not None:
        path += f"/labels/{version_label}"
    return f"http://{host}:{port}{path}:{verb}"


def _check_inputs(images, image_bytes):
    if (images is None) == (image_bytes is None):
        raise ValueError("Pass exactly one of images= or image_bytes=.")
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 \
                or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"Received images {images.dtype} {images.shape}; expected "
                "uint8 [batch, height, width, 3] (or 1 channel)."
            )
        return images, None
    image_bytes = list(image_bytes)
    if not all(isinstance(b, (bytes, bytearray)) for b in image_bytes):
        raise ValueError("image_bytes must be a list of bytes (encoded "
                         "JPEG/PNG files as read from disk).")
    return None, image_bytes


def rest_request_body(images=None, image_bytes=None, signature_name=None,
                      columnar=False):
    """The JSON body of a REST `:predict` request.

    Args:
      images: uint8 [batch, height, width, 3] for `serving_default`.
      image_bytes: list of encoded images for `serving_bytes`, sent as
        `{"b64": base64}` (TF Serving decodes it into a string tensor).
      signature_name: default: the signature that takes these inputs.
      columnar: `{"inputs": {name: batch}}` instead of the row format
        `{"instances": [{name: item}, ...]}`.

    Returns:
      A dict to serialise with `json.dumps`.
    """
    images, image_bytes = _check_inputs(images, image_bytes)
    if images is not None:
        name, default = IMAGES_INPUT, SERVING_DEFAULT
        items = images.tolist()
    else:
        name, default = BYTES_INPUT, SERVING_BYTES
        items = [{"b64": base64.b64encode(b).decode("ascii")}
                 for b in image_bytes]
    body = {"signature_name": signature_name or default}
    if columnar:
        body["inputs"] = {name: items}
    else:
        body["instances"] = [{name: item} for item in items]
    return body


def _from_json(value):
    """JSON output -> numpy; `{"b64": ...}` -> bytes, strings stay str."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        converted = [_from_json(v) for v in value]
        leaf = converted
        while isinstance(leaf, (list, np.ndarray)) and len(leaf):
            leaf = leaf[0]
        # Object arrays for text, as tf.make_ndarray gives (a fixed-width
        # numpy string dtype would drop trailing NUL bytes).
        textual = isinstance(leaf, (str, bytes))
        return np.asarray(converted, dtype=object if textual else None)
    return value


def parse_rest_response(reply, output_names=None):
    """A REST `:predict` reply -> {output name: numpy array}.

    Handles the row format (`{"predictions": [...]}`: a list of
    {output: value} objects, or of bare values when the signature has one
    output) and the columnar format (`{"outputs": {...}}` or one bare
    value).

    Args:
      reply: the decoded JSON reply.
      output_names: names for a single bare output (default "output").
    """
    single = (output_names or ["output"])[0]
    if "predictions" in reply:
        rows = reply["predictions"]
        if rows and isinstance(rows[0], dict) and set(rows[0]) != {"b64"}:
            return {k: _from_json([row[k] for row in rows]) for k in rows[0]}
        return {single: _from_json(rows)}
    if "outputs" in reply:
        outputs = reply["outputs"]
        if isinstance(outputs, dict) and set(outputs) != {"b64"}:
            return {k: _from_json(v) for k, v in outputs.items()}
        return {single: _from_json(outputs)}
    raise ServingError(f"Unexpected REST reply (no predictions/outputs): "
                       f"{str(reply)[:200]}")


# ------------------------------------------------------------------- gRPC


def grpc_request(model, images=None, image_bytes=None, signature_name=None,
                 version=None, version_label=None):
    """The `PredictRequest` proto for these inputs."""
    # pylint: disable=g-import-not-at-top
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    images, image_bytes = _check_inputs(images, image_bytes)
    if version is not None and version_label is not None:
        raise ValueError("Pass version or version_label, not both.")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = int(version)
    elif version_label is not None:
        request.model_spec.version_label = version_label
    if images is not None:
        request.model_spec.signature_name = signature_name or SERVING_DEFAULT
        request.inputs[IMAGES_INPUT].CopyFrom(tf.make_tensor_proto(images))
    else:
        request.model_spec.signature_name = signature_name or SERVING_BYTES
        request.inputs[BYTES_INPUT].CopyFrom(
            tf.make_tensor_proto(image_bytes, dtype=tf.string,
                                 shape=[len(image_bytes)]))
    return request


def _decode_strings(outputs):
    """bytes outputs (gRPC) -> str, as REST returns them."""
    decoded = {}
    for name, value in outputs.items():
        if value.dtype == object:
            value = np.vectorize(
                lambda v: v.decode("utf-8", "replace")
                if isinstance(v, bytes) else v, otypes=[object])(value)
        decoded[name] = value
    return decoded


# ----------------------------------------------------------------- client


class ServingClient:
    """Predict requests to one model of a TF Serving server.

    Args:
      host: server host name or address.
      model: model name (its directory under the model base path, the
        `name` in models.config).
      protocol: "rest" (port 8501) or "grpc" (port 8500).
      port: default: TF Serving's port for the protocol.
      version: pin a version (default: the server's newest available).
      version_label: or a label from models.config (e.g. "stable").
      timeout: seconds per attempt (HTTP socket timeout / gRPC deadline).
      max_attempts: attempts per call, counting the first.
      initial_backoff: seconds before the second attempt; doubles after
        each failure, up to `max_backoff`, with +-25% jitter.
      max_backoff: cap of the wait between attempts.
      columnar: REST only: send `{"inputs": ...}` instead of
        `{"instances": [...]}`.
    """

    def __init__(self, host="localhost", model="lfm", *, protocol="rest",
                 port=None, version=None, version_label=None, timeout=10.0,
                 max_attempts=5, initial_backoff=0.1, max_backoff=5.0,
                 columnar=False):
        if protocol not in ("rest", "grpc"):
            raise ValueError(
                f"Received protocol={protocol!r}; expected 'rest' or 'grpc'.")
        if version is not None and version_label is not None:
            raise ValueError("Pass version or version_label, not both.")
        if int(max_attempts) < 1 or float(timeout) <= 0:
            raise ValueError(
                f"Received max_attempts={max_attempts}, timeout={timeout}; "
                "expected max_attempts >= 1 and timeout > 0.")
        self.host = host
        self.model = model
        self.protocol = protocol
        self.port = int(port or (REST_PORT if protocol == "rest"
                                 else GRPC_PORT))
        self.version = version
        self.version_label = version_label
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self.initial_backoff = float(initial_backoff)
        self.max_backoff = float(max_backoff)
        self.columnar = columnar
        self._channel = None
        self._stub = None

    @property
    def target(self):
        """What requests go to, for messages."""
        if self.protocol == "rest":
            return rest_url(self.host, self.port, self.model, self.version,
                            self.version_label)
        return f"{self.host}:{self.port} (gRPC, model {self.model!r})"

    def predict(self, images=None, *, image_bytes=None, signature_name=None):
        """Classifies a batch.

        Args:
          images: uint8 [batch, height, width, 3] (any size), or
          image_bytes: list of encoded JPEG/PNG images.
          signature_name: default `serving_default` for images,
            `serving_bytes` for image_bytes.

        Returns:
          {"probabilities": float [batch, C], "top_k_ids": int [batch, k],
           "top_k_scores": float [batch, k], "class_names": str [batch, k]}
          (whatever the signature returns, as numpy arrays).

        Raises:
          ServingError: the server rejected the request (its message).
          ServingTimeoutError: an attempt timed out.
          ServingUnavailableError: still unavailable after every attempt.
        """
        if self.protocol == "rest":
            body = json.dumps(rest_request_body(
                images, image_bytes, signature_name, self.columnar)).encode()
            return self._with_retries(lambda: self._rest_call(body))
        request = grpc_request(self.model, images, image_bytes,
                               signature_name, self.version,
                               self.version_label)
        return self._with_retries(lambda: self._grpc_call(request))

    def _with_retries(self, attempt):
        delay = self.initial_backoff
        for number in range(1, self.max_attempts + 1):
            try:
                return attempt()
            except _Retryable as failure:
                last = failure
            if number < self.max_attempts:
                time.sleep(min(delay, self.max_backoff)
                           * random.uniform(0.75, 1.25))
                delay *= 2
        raise ServingUnavailableError(
            f"{self.target} still unavailable after {self.max_attempts} "
            f"attempts: {last}. Is the server up, the model loaded (GET "
            f"/v1/models/{self.model}), the host and port right?"
        ) from last

    # REST ---------------------------------------------------------------

    def _rest_call(self, body):
        url = self.target
        request = urllib.request.Request(
            url, data=body, method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                reply = json.loads(r.read())
        except urllib.error.HTTPError as error:
            detail = _http_error_detail(error)
            if error.code in RETRYABLE_HTTP:
                raise _Retryable(f"HTTP {error.code}: {detail}") from error
            if error.code == 504:
                raise ServingTimeoutError(
                    f"{url}: the server's deadline passed (HTTP 504: "
                    f"{detail}); raise its --rest_api_timeout_in_ms or send "
                    "smaller batches.", status=504) from error
            # 400, 404, ...: the request itself is refused; another
            # attempt would be refused the same way.
            raise ServingError(
                f"{url} answered HTTP {error.code}: {detail}",
                status=error.code) from error
        except (socket.timeout, TimeoutError) as error:
            raise self._timeout(error) from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise self._timeout(error.reason) from error
            raise _Retryable(f"cannot connect: {error.reason}") from error
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(
                f"connection failed: {error!r} (no HTTP answer: a server "
                "that is restarting, or one that crashed on the request)"
            ) from error
        return parse_rest_response(reply)

    def _timeout(self, error):
        return ServingTimeoutError(
            f"{self.target}: no answer within timeout={self.timeout:g} s "
            f"({error}); the server is slow or stuck. Pass a larger "
            "timeout (--timeout) or smaller batches.")

    # gRPC ---------------------------------------------------------------

    def _grpc_stub(self):
        if self._stub is None:
            # pylint: disable=g-import-not-at-top
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            self._channel = grpc.insecure_channel(
                f"{self.host}:{self.port}",
                options=[("grpc.max_send_message_length", -1),
                         ("grpc.max_receive_message_length", -1)])
            self._stub = prediction_service_pb2_grpc.PredictionServiceStub(
                self._channel)
        return self._stub

    def _grpc_call(self, request):
        # pylint: disable=g-import-not-at-top
        import grpc
        import tensorflow as tf

        stub = self._grpc_stub()
        try:
            reply = stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code = error.code()
            detail = f"{code.name}: {error.details()}"
            if code in (grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise _Retryable(detail) from error
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise self._timeout(detail) from error
            raise ServingError(f"{self.target}: {detail}",
                               status=code.name) from error
        return _decode_strings(
            {k: tf.make_ndarray(v) for k, v in reply.outputs.items()})

    def close(self):
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _http_error_detail(error):
    try:
        text = error.read().decode("utf-8", "replace")
    except Exception:  # pylint: disable=broad-except
        return str(error.reason)
    try:
        return json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        return text[:500] or str(error.reason)


# -------------------------------------------------------------------- CLI


def _load_pixels(path):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Classify image files with a model served by TF "
                    "Serving; prints the top-k classes of each.")
    parser.add_argument("images", nargs="+", help="JPEG/PNG/GIF/BMP files")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--protocol", choices=("rest", "grpc"),
                        default="rest")
    parser.add_argument("--port", type=int, default=None,
                        help=f"default {REST_PORT} (REST) / {GRPC_PORT} "
                             "(gRPC)")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--version_label", default=None)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds per attempt")
    parser.add_argument("--max_attempts", type=int, default=5)
    parser.add_argument("--pixels", action="store_true",
                        help="decode locally and send uint8 pixels to "
                             "serving_default (all files must have one "
                             "size) instead of the encoded files to "
                             "serving_bytes")
    parser.add_argument("--json", action="store_true",
                        help="print the outputs as JSON")
    args = parser.parse_args(argv)
    try:
        # Inside the try: the constructor refuses bad flag combinations.
        client = ServingClient(
            args.host, args.model, protocol=args.protocol, port=args.port,
            version=args.version, version_label=args.version_label,
            timeout=args.timeout, max_attempts=args.max_attempts)
        with client:
            if args.pixels:
                outputs = client.predict(
                    np.stack([_load_pixels(p) for p in args.images]))
            else:
                encoded = []
                for path in args.images:
                    with open(path, "rb") as f:
                        encoded.append(f.read())
                outputs = client.predict(image_bytes=encoded)
    except (ServingError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: np.asarray(v).tolist()
                          for k, v in outputs.items()}, indent=1))
        return 0
    for i, path in enumerate(args.images):
        ranked = ", ".join(
            f"{name} {score:.3f}" for name, score in
            zip(outputs["class_names"][i], outputs["top_k_scores"][i]))
        print(f"{path}: {ranked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
