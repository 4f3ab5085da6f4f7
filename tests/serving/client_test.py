"""serving.client against in-test TF Serving stand-ins on 127.0.0.1.

The stand-ins answer from the exported SavedModel and speak TF Serving's
REST JSON (row and columnar formats, {"b64": ...} strings, {"error": ...}
with TF Serving's HTTP status mapping) and its gRPC PredictionService.
They live here, apart from the client, so the client is checked against
the formats rather than against itself.
"""

import base64
import concurrent.futures
import contextlib
import http.server
import io
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from unittest import mock

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from lfm_tf import testing
from serving import client as client_lib
from serving import local_server

SERVING_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "serving")
NAMES = ["cat", "dog", "bird"]
MODEL = "lfm"
_PATH = re.compile(
    r"^/v1/models/(?P<model>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?:predict$")


class _Model:
    """The SavedModel, run the way TF Serving runs a signature."""

    def __init__(self, path):
        self.loaded = tf.saved_model.load(path)
        self.lock = threading.Lock()
        self.calls = []        # (transport, signature, version or label)
        self.fail_first = 0    # answer UNAVAILABLE this many times first
        self.delay = 0.0       # seconds to wait before answering

    def run(self, signature_name, inputs):
        signature = self.loaded.signatures[signature_name or
                                           "serving_default"]
        specs = signature.structured_input_signature[1]
        tensors = {k: tf.constant(v, dtype=specs[k].dtype)
                   for k, v in inputs.items()}
        return {k: v.numpy() for k, v in signature(**tensors).items()}

    def admit(self, call):
        """Records a call; True if it should be answered UNAVAILABLE."""
        with self.lock:
            self.calls.append(call)
            unavailable = self.fail_first > 0
            self.fail_first -= int(unavailable)
        time.sleep(self.delay)
        return unavailable


def _json_value(value):
    """numpy -> JSON as TF Serving writes it (strings as UTF-8 text)."""
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def _tensor_value(value):
    """JSON -> nested python values, {"b64": s} -> bytes."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_tensor_value(v) for v in value]
    return value


def _rest_handler(model):

    class Handler(http.server.BaseHTTPRequestHandler):
        """POST /v1/models/<m>[/versions/<v>|/labels/<l>]:predict."""

        bodies = []

        def log_message(self, *args):
            del args

        def _reply(self, status, payload):
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # The client gave up (the timeout tests).

        def do_POST(self):  # pylint: disable=invalid-name
            body = json.loads(self.rfile.read(
                int(self.headers["Content-Length"])))
            Handler.bodies.append(body)
            match = _PATH.match(self.path)
            if not match or match["model"] != MODEL:
                self._reply(404, {"error": f"Servable not found for request: "
                                           f"{self.path}"})
                return
            if model.admit(("rest", body.get("signature_name"),
                            match["version"] or match["label"])):
                self._reply(503, {"error": "Servable is loading"})
                return
            if "instances" in body:
                names = body["instances"][0].keys()
                inputs = {n: _tensor_value([i[n] for i in body["instances"]])
                          for n in names}
            else:
                inputs = {n: _tensor_value(v)
                          for n, v in body["inputs"].items()}
            try:
                outputs = model.run(body.get("signature_name"), inputs)
            except tf.errors.InvalidArgumentError as error:
                self._reply(400, {"error": error.message})
                return
            if "instances" in body:
                batch = len(next(iter(outputs.values())))
                self._reply(200, {"predictions": [
                    {k: _json_value(v[i]) for k, v in outputs.items()}
                    for i in range(batch)]})
            else:
                self._reply(200, {"outputs": {k: _json_value(v)
                                              for k, v in outputs.items()}})

    return Handler


class _Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):

    def __init__(self, model):
        self.model = model
        self.requests = []

    def Predict(self, request, context):  # pylint: disable=invalid-name
        self.requests.append(request)
        spec = request.model_spec
        if spec.name != MODEL:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: {spec.name}")
        version = (spec.version.value if spec.HasField("version")
                   else spec.version_label or None)
        if self.model.admit(("grpc", spec.signature_name, version)):
            context.abort(grpc.StatusCode.UNAVAILABLE, "Servable is loading")
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        try:
            outputs = self.model.run(spec.signature_name, inputs)
        except tf.errors.InvalidArgumentError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        reply = predict_pb2.PredictResponse()
        reply.model_spec.CopyFrom(spec)
        for name, value in outputs.items():
            reply.outputs[name].CopyFrom(tf.make_tensor_proto(value))
        return reply


def _free_port():
    """A port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image):
    return tf.io.encode_png(image).numpy()


class ServingClientTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        path = testing.tiny_saved_model(MODEL, NAMES)
        cls.model = _Model(path)
        cls.images = np.random.default_rng(0).integers(
            0, 256, (3, 8, 8, 3), dtype=np.uint8)
        cls.expected = cls.model.run("serving_default",
                                     {"images": cls.images})
        cls.expected_names = cls.expected["class_names"].astype(str)

        handler = _rest_handler(cls.model)
        cls.rest_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                          handler)
        cls.rest_bodies = handler.bodies
        cls.rest_port = cls.rest_server.server_address[1]
        threading.Thread(target=cls.rest_server.serve_forever,
                         daemon=True).start()

        cls.servicer = _Servicer(cls.model)
        cls.grpc_server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            cls.servicer, cls.grpc_server)
        cls.grpc_port = cls.grpc_server.add_insecure_port("127.0.0.1:0")
        cls.grpc_server.start()

        # serving.local_server on the same model: TF Serving's refusals.
        backend = local_server.SavedModelBackend(path, MODEL)
        cls.local_rest = local_server.start_rest(backend)
        cls.local_grpc, cls.local_grpc_port = local_server.start_grpc(
            backend)

    @classmethod
    def tearDownClass(cls):
        cls.rest_server.shutdown()
        cls.rest_server.server_close()
        cls.grpc_server.stop(0)
        cls.local_rest.shutdown()
        cls.local_rest.server_close()
        cls.local_grpc.stop(0)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.model.calls.clear()
        self.model.fail_first = 0
        self.model.delay = 0.0
        self.rest_bodies.clear()
        self.servicer.requests.clear()

    def _client(self, protocol, **kwargs):
        port = self.rest_port if protocol == "rest" else self.grpc_port
        kwargs.setdefault("initial_backoff", 0.01)
        kwargs.setdefault("timeout", 10.0)
        client = client_lib.ServingClient("127.0.0.1", MODEL,
                                          protocol=protocol, port=port,
                                          **kwargs)
        self.addCleanup(client.close)
        return client

    def _check_outputs(self, outputs):
        self.assertAllClose(outputs["probabilities"],
                            self.expected["probabilities"], atol=1e-6)
        self.assertAllEqual(outputs["top_k_ids"], self.expected["top_k_ids"])
        self.assertAllClose(outputs["top_k_scores"],
                            self.expected["top_k_scores"], atol=1e-6)
        self.assertAllEqual(outputs["class_names"], self.expected_names)
        self.assertIsInstance(outputs["class_names"][0, 0], str)

    # REST ---------------------------------------------------------------

    def test_rest_request_bodies(self):
        body = client_lib.rest_request_body(image_bytes=[b"\x89PNG", b"ab"])
        self.assertEqual(body, {
            "signature_name": "serving_bytes",
            "instances": [{"image_bytes": {"b64": "iVBORw=="}},
                          {"image_bytes": {"b64": "YWI="}}]})
        image = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
        self.assertEqual(client_lib.rest_request_body(image), {
            "signature_name": "serving_default",
            "instances": [{"images": [[[0, 1, 2], [3, 4, 5]],
                                      [[6, 7, 8], [9, 10, 11]]]}]})
        self.assertEqual(
            client_lib.rest_request_body(image, columnar=True),
            {"signature_name": "serving_default",
             "inputs": {"images": image.tolist()}})
        with self.assertRaisesRegex(ValueError, "uint8"):
            client_lib.rest_request_body(np.zeros((1, 8, 8, 3)))
        with self.assertRaisesRegex(ValueError, "exactly one"):
            client_lib.rest_request_body()
        self.assertEqual(
            client_lib.rest_url("h", 1, "m", version=3),
            "http://h:1/v1/models/m/versions/3:predict")
        self.assertEqual(
            client_lib.rest_url("h", 1, "m", version_label="stable"),
            "http://h:1/v1/models/m/labels/stable:predict")

    def test_rest_reply_formats(self):
        parse = client_lib.parse_rest_response
        row = parse({"predictions": [{"p": [0.5, 0.5], "n": ["a"]},
                                     {"p": [0.1, 0.9], "n": ["b"]}]})
        self.assertAllClose(row["p"], [[0.5, 0.5], [0.1, 0.9]])
        self.assertEqual(row["n"].tolist(), [["a"], ["b"]])
        self.assertAllEqual(parse({"predictions": [[1, 2], [3, 4]]})
                            ["output"], [[1, 2], [3, 4]])
        columnar = parse({"outputs": {"p": [[0.5, 0.5]],
                                      "b": [{"b64": "YWI="}]}})
        self.assertEqual(columnar["b"].tolist(), [b"ab"])
        self.assertAllEqual(parse({"outputs": [[7]]})["output"], [[7]])
        with self.assertRaises(client_lib.ServingError):
            parse({"error": "x"})

    def test_rest_predict_bytes_and_pixels(self):
        client = self._client("rest")
        self._check_outputs(client.predict(
            image_bytes=[_png(i) for i in self.images]))
        self._check_outputs(client.predict(self.images))
        self.assertEqual([b["signature_name"] for b in self.rest_bodies],
                         ["serving_bytes", "serving_default"])
        self.assertIn("instances", self.rest_bodies[0])
        columnar = self._client("rest", columnar=True, version=1)
        self._check_outputs(columnar.predict(self.images))
        self.assertIn("inputs", self.rest_bodies[-1])
        labelled = self._client("rest", version_label="stable")
        labelled.predict(self.images[:1])
        self.assertEqual([c[2] for c in self.model.calls],
                         [None, None, "1", "stable"])

    def test_rest_retries_unavailable_then_succeeds(self):
        self.model.fail_first = 2
        self._check_outputs(self._client("rest").predict(self.images))
        self.assertLen(self.model.calls, 3)

    def test_rest_gives_up_after_max_attempts(self):
        self.model.fail_first = 10
        client = self._client("rest", max_attempts=3)
        with self.assertRaisesRegex(client_lib.ServingUnavailableError,
                                    "(?s)after 3 attempts.*HTTP 503"):
            client.predict(self.images)
        self.assertLen(self.model.calls, 3)

    def test_rest_server_errors_are_not_retried(self):
        client = self._client("rest")
        with self.assertRaisesRegex(client_lib.ServingError,
                                    "(?s)HTTP 400: .*Unknown image file"):
            client.predict(image_bytes=[b"not an image"])
        self.assertLen(self.model.calls, 1)
        other = client_lib.ServingClient("127.0.0.1", "other",
                                         port=self.rest_port)
        with self.assertRaisesRegex(client_lib.ServingError, "HTTP 404"):
            other.predict(self.images)
        self.assertLen(self.rest_bodies, 2)

    def test_rest_connection_refused_is_retried_with_backoff(self):
        client = client_lib.ServingClient(
            "127.0.0.1", MODEL, port=_free_port(), max_attempts=3,
            initial_backoff=0.2)
        start = time.monotonic()
        with self.assertRaisesRegex(client_lib.ServingUnavailableError,
                                    "(?s)after 3 attempts.*cannot connect"):
            client.predict(self.images)
        # Waits 0.2 then 0.4 s (+-25% jitter) between the three attempts.
        self.assertGreater(time.monotonic() - start, 0.45)

    def test_rest_timeout_raises_clearly_and_is_not_retried(self):
        self.model.delay = 1.5
        client = self._client("rest", timeout=0.3)
        start = time.monotonic()
        with self.assertRaisesRegex(client_lib.ServingTimeoutError,
                                    "timeout=0.3 s"):
            client.predict(self.images)
        self.assertLess(time.monotonic() - start, 1.2)
        self.assertLen(self.rest_bodies, 1)

    def test_rest_connect_timeout_raises_clearly(self):
        # A connect timeout reaches the client wrapped in a URLError.
        client = self._client("rest", timeout=0.3)
        refused = urllib.error.URLError(socket.timeout("timed out"))
        with mock.patch.object(urllib.request, "urlopen",
                               side_effect=refused) as urlopen:
            with self.assertRaisesRegex(client_lib.ServingTimeoutError,
                                        "timeout=0.3 s"):
                client.predict(self.images)
        self.assertEqual(urlopen.call_count, 1)

    # gRPC ---------------------------------------------------------------

    def test_grpc_request_proto(self):
        request = client_lib.grpc_request(MODEL, image_bytes=[b"x", b"yz"],
                                          version=4)
        self.assertEqual(request.model_spec.name, MODEL)
        self.assertEqual(request.model_spec.signature_name, "serving_bytes")
        self.assertEqual(request.model_spec.version.value, 4)
        self.assertEqual(tf.make_ndarray(request.inputs["image_bytes"])
                         .tolist(), [b"x", b"yz"])
        request = client_lib.grpc_request(MODEL, self.images,
                                          version_label="canary")
        self.assertEqual(request.model_spec.signature_name,
                         "serving_default")
        self.assertEqual(request.model_spec.version_label, "canary")
        self.assertEqual(request.inputs["images"].dtype,
                         tf.uint8.as_datatype_enum)
        self.assertAllEqual(tf.make_ndarray(request.inputs["images"]),
                            self.images)

    def test_grpc_predict_bytes_and_pixels(self):
        client = self._client("grpc", version=1)
        self._check_outputs(client.predict(
            image_bytes=[_png(i) for i in self.images]))
        self._check_outputs(client.predict(self.images))
        self.assertEqual(self.model.calls,
                         [("grpc", "serving_bytes", 1),
                          ("grpc", "serving_default", 1)])

    def test_grpc_retries_unavailable_then_succeeds(self):
        self.model.fail_first = 2
        self._check_outputs(self._client("grpc").predict(self.images))
        self.assertLen(self.servicer.requests, 3)

    def test_grpc_errors(self):
        client = self._client("grpc")
        with self.assertRaisesRegex(client_lib.ServingError,
                                    "(?s)INVALID_ARGUMENT: .*Unknown image"):
            client.predict(image_bytes=[b"not an image"])
        self.assertLen(self.servicer.requests, 1)
        other = client_lib.ServingClient("127.0.0.1", "other",
                                         protocol="grpc", port=self.grpc_port)
        self.addCleanup(other.close)
        with self.assertRaisesRegex(client_lib.ServingError, "NOT_FOUND"):
            other.predict(self.images)
        unreachable = client_lib.ServingClient(
            "127.0.0.1", MODEL, protocol="grpc", port=_free_port(),
            max_attempts=2, initial_backoff=0.01, timeout=5)
        self.addCleanup(unreachable.close)
        with self.assertRaisesRegex(client_lib.ServingUnavailableError,
                                    "(?s)after 2 attempts.*UNAVAILABLE"):
            unreachable.predict(self.images)

    def test_grpc_timeout_raises_clearly_and_is_not_retried(self):
        self.model.delay = 1.5
        client = self._client("grpc", timeout=0.3)
        start = time.monotonic()
        with self.assertRaisesRegex(client_lib.ServingTimeoutError,
                                    "(?s)timeout=0.3 s.*DEADLINE_EXCEEDED"):
            client.predict(self.images)
        self.assertLess(time.monotonic() - start, 1.2)
        self.assertLen(self.servicer.requests, 1)

    # CLI and config -------------------------------------------------------

    def test_command_line(self):
        paths = []
        for i, image in enumerate(self.images[:2]):
            paths.append(os.path.join(self.get_temp_dir(), f"{i}.png"))
            with open(paths[-1], "wb") as f:
                f.write(_png(image))
        for protocol, port in (("rest", self.rest_port),
                               ("grpc", self.grpc_port)):
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                code = client_lib.main([
                    "--host=127.0.0.1", f"--port={port}", f"--model={MODEL}",
                    f"--protocol={protocol}", *paths])
            self.assertEqual(code, 0)
            lines = stdout.getvalue().splitlines()
            self.assertLen(lines, 2)
            self.assertTrue(lines[1].startswith(
                f"{paths[1]}: {self.expected_names[1, 0]} "
                f"{self.expected['top_k_scores'][1, 0]:.3f}"), lines[1])
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            client_lib.main(["--host=127.0.0.1", f"--port={self.rest_port}",
                             f"--model={MODEL}", "--pixels", "--json",
                             *paths])
        self.assertAllClose(json.loads(stdout.getvalue())["probabilities"],
                            self.expected["probabilities"][:2], atol=1e-6)
        self.assertEqual(self.rest_bodies[-1]["signature_name"],
                         "serving_default")

    # Against serving.local_server -----------------------------------------

    def test_refused_requests_show_the_servers_error_and_are_not_retried(
            self):
        port = self.local_rest.server_address[1]
        requests = self.local_rest.state["requests"]

        def client(**kwargs):
            made = client_lib.ServingClient("127.0.0.1", MODEL, port=port,
                                            initial_backoff=0.01, **kwargs)
            self.addCleanup(made.close)
            return made

        header = (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"
                  + (20000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0")
        cases = [
            (lambda: client().predict(self.images, signature_name="nope"),
             400, 'Serving signature key "nope" not found'),
            (lambda: client(version=2).predict(self.images),
             404, f"Specific({MODEL}, 2)"),
            (lambda: client(version_label="stable").predict(self.images),
             404, "Unrecognized servable version label: stable"),
            (lambda: client().predict(image_bytes=[header]),
             400, "height 20000 x width 20000"),
            (lambda: client(columnar=True).predict(image_bytes=[b"GIF"]),
             400, "Unknown image file format"),
        ]
        for call, status, message in cases:
            requests.clear()
            with self.assertRaises(client_lib.ServingError) as caught:
                call()
            self.assertNotIsInstance(caught.exception,
                                     client_lib.ServingUnavailableError)
            self.assertEqual(caught.exception.status, status)
            self.assertIn(f"answered HTTP {status}: ", str(caught.exception))
            self.assertIn(message, str(caught.exception))
            self.assertLen(requests, 1)  # not retried
        # The columnar format is served.
        self._check_outputs(client(columnar=True).predict(self.images))
        # The command line prints the server's message.
        path = os.path.join(self.get_temp_dir(), "cat.png")
        with open(path, "wb") as f:
            f.write(_png(self.images[0]))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = client_lib.main(["--host=127.0.0.1", f"--port={port}",
                                    f"--model={MODEL}", "--version=2", path])
        self.assertEqual(code, 1)
        self.assertIn("HTTP 404: Servable not found", stderr.getvalue())
        # gRPC: NOT_FOUND, once.
        grpc_client = client_lib.ServingClient(
            "127.0.0.1", MODEL, protocol="grpc", port=self.local_grpc_port,
            version=2, initial_backoff=0.01)
        self.addCleanup(grpc_client.close)
        with self.assertRaises(client_lib.ServingError) as caught:
            grpc_client.predict(self.images)
        self.assertEqual(caught.exception.status, "NOT_FOUND")
        self.assertIn(f"Specific({MODEL}, 2)", str(caught.exception))

    def test_models_config_parses(self):
        with open(os.path.join(SERVING_DIR, "models.config")) as f:
            config = text_format.Parse(
                f.read(), model_server_config_pb2.ModelServerConfig())
        models = {c.name: c for c in config.model_config_list.config}
        self.assertEqual(set(models), {"lfm", "erm"})
        self.assertEqual(models["lfm"].base_path, "/models/lfm")
        self.assertEqual(
            models["lfm"].model_version_policy.latest.num_versions, 2)
        self.assertEqual(
            list(models["erm"].model_version_policy.specific.versions),
            [1, 2])
        self.assertEqual(dict(models["erm"].version_labels),
                         {"stable": 1, "canary": 2})
        with open(os.path.join(SERVING_DIR, "docker-compose.yml")) as f:
            compose = f.read()
        mount = re.search(r"\./models\.config:(\S+?):ro", compose).group(1)
        self.assertIn(f"--model_config_file={mount}", compose)
        self.assertIn('"8500:8500"', compose)
        self.assertIn('"8501:8501"', compose)


if __name__ == "__main__":
    tf.test.main()
