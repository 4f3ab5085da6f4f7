"""serving.local_server speaks TF Serving's REST and gRPC contract.

Every request gets an HTTP answer: 200, 400 `{"error": ...}` for a bad
request, 404 for an unknown model, version, label or path, 500 for a
failure of the server itself; never a dropped connection.
"""

import base64
import json
import struct
import urllib.error
import urllib.request
from unittest import mock

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from lfm_tf import export
from lfm_tf import testing
from serving import local_server

NAMES = ["cat", "dog", "bird"]
MODEL = "lfm"


def _png_header(width, height):
    """The first 33 bytes of a PNG: enough for the size, nothing to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + b"\0\0\0\0")


def _b64(data):
    return {"b64": base64.b64encode(data).decode("ascii")}


class LocalServerTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        path = testing.tiny_saved_model(MODEL, NAMES)
        cls.backend = local_server.SavedModelBackend(path, MODEL)
        cls.rest = local_server.start_rest(cls.backend)
        cls.base = f"http://127.0.0.1:{cls.rest.server_address[1]}"
        cls.grpc_server, port = local_server.start_grpc(cls.backend)
        cls.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        cls.stub = prediction_service_pb2_grpc.PredictionServiceStub(
            cls.channel)
        cls.images = np.random.default_rng(0).integers(
            0, 256, (2, 8, 8, 3), dtype=np.uint8)
        cls.expected = {
            k: v.numpy() for k, v in cls.backend.loaded.signatures[
                "serving_default"](images=tf.constant(cls.images)).items()}
        cls.pngs = [tf.io.encode_png(i).numpy() for i in cls.images]

    @classmethod
    def tearDownClass(cls):
        cls.rest.shutdown()
        cls.rest.server_close()
        cls.channel.close()
        cls.grpc_server.stop(0)
        super().tearDownClass()

    def _http(self, path, body=None, method=None):
        """(status, decoded JSON reply); body: dict or raw bytes."""
        data = body if isinstance(body, bytes) or body is None else (
            json.dumps(body).encode())
        request = urllib.request.Request(
            self.base + path, data=data, method=method or (
                "GET" if data is None else "POST"))
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def _predict(self, body, path=f"/v1/models/{MODEL}:predict"):
        return self._http(path, body)

    def _check(self, outputs, rows=2):
        self.assertAllClose(outputs["probabilities"],
                            self.expected["probabilities"][:rows], atol=1e-6)
        self.assertEqual(np.asarray(outputs["class_names"]).tolist(),
                         self.expected["class_names"][:rows].astype(
                             str).tolist())

    def test_row_and_columnar_formats(self):
        pixels = self.images.tolist()
        bodies = [
            {"instances": [{"images": p} for p in pixels]},
            {"instances": pixels},  # bare values: the signature's one input
            {"signature_name": "serving_bytes",
             "instances": [{"image_bytes": _b64(b)} for b in self.pngs]},
            {"signature_name": "serving_bytes",
             "instances": [_b64(b) for b in self.pngs]},
        ]
        for body in bodies:
            status, reply = self._predict(body)
            self.assertEqual(status, 200, reply)
            rows = reply["predictions"]
            self._check({k: [r[k] for r in rows] for k in rows[0]})
        for body in ({"inputs": {"images": pixels}}, {"inputs": pixels},
                     {"signature_name": "serving_bytes",
                      "inputs": [_b64(b) for b in self.pngs]}):
            status, reply = self._predict(body)
            self.assertEqual(status, 200, reply)
            self._check(reply["outputs"])
        # A pinned version that is this one.
        status, reply = self._predict(
            {"instances": pixels[:1]}, f"/v1/models/{MODEL}/versions/1"
            ":predict")
        self.assertEqual(status, 200, reply)
        self._check({k: [reply["predictions"][0][k]]
                     for k in reply["predictions"][0]}, rows=1)

    def test_an_empty_columnar_batch_gets_empty_outputs(self):
        status, reply = self._predict({"signature_name": "serving_bytes",
                                       "inputs": {"image_bytes": []}})
        self.assertEqual(status, 200, reply)
        self.assertEqual(reply["outputs"], {name: [] for name in
                                            export.OUTPUTS})

    def test_bad_requests_get_400_and_the_reason(self):
        image = self.images[0].tolist()
        wrapped = [[[300] + image[0][0][1:]] + image[0][1:]] + image[1:]
        ragged = [image, image[:4]]
        cases = [
            (b"{\"instances\": [", "JSON Parse error"),
            (b"\xff\xfe not utf-8", "JSON Parse error"),
            (b"[1, 2]", "expected an object with \"instances\""),
            ({}, "Missing 'inputs' or 'instances' key"),
            ({"instances": [image], "inputs": [image]}, "has both"),
            ({"instances": []}, "'instances' is an empty list"),
            ({"instances": {"images": image}}, "must be a list"),
            ({"instances": [{"images": image}, image]}, "mixes objects"),
            ({"instances": [{"pixels": image}]},
             "instances[0] has inputs ['pixels']; the signature takes "
             "['images']"),
            ({"inputs": {"images": [image], "extra": 1}}, "'inputs' has"),
            ({"signature_name": 7, "instances": [image]},
             "signature_name is 7"),
            ({"signature_name": "nope", "instances": [image]},
             "Serving signature key \"nope\" not found"),
            # Pixel values: 300 must be refused, not wrapped to 44.
            ({"instances": [wrapped]},
             "images[0][0][0][0] = 300 is outside uint8's range 0..255"),
            ({"instances": [[[[-1, 0, 0]]]]}, "= -1 is outside"),
            ({"instances": [[[[0.5, 0, 0]]]]}, "float64 values"),
            ({"instances": [[[[True, 0, 0]]]]}, "holds True"),
            ({"instances": [[[["a", 0, 0]]]]}, "expected uint8 numbers"),
            ({"instances": [[[[2 ** 70, 0, 0]]]]}, "expected uint8 numbers"),
            ({"instances": ragged}, "is ragged"),
            # Shapes the signatures refuse, with their messages.
            ({"inputs": {"images": image}}, export.INVALID_RANK_MESSAGE),
            ({"inputs": [[[[0, 0, 0, 0]]]]}, export.INVALID_CHANNELS_MESSAGE),
            ({"signature_name": "serving_bytes",
              "inputs": {"image_bytes": [[_b64(self.pngs[0])]]}},
             "has shape [1, 1]; expected [batch]"),
            ({"signature_name": "serving_bytes", "inputs": _b64(b"x")},
             "has shape []; expected [batch]"),
            # Strings.
            ({"signature_name": "serving_bytes",
              "instances": [{"b64": "not base64!"}]},
             "Unable to base64-decode image_bytes[0]"),
            ({"signature_name": "serving_bytes",
              "instances": [{"image_bytes": {"b64": "aGk=", "x": 1}}]},
             "an object with keys ['b64', 'x']"),
            ({"signature_name": "serving_bytes", "instances": [5]},
             "image_bytes[0] is 5"),
            ({"signature_name": "serving_bytes",
              "instances": [_b64(b"not an image")]},
             "Unknown image file format"),
            ({"signature_name": "serving_bytes",
              "instances": [_b64(_png_header(20000, 20000))]},
             "height 20000 x width 20000 (x 1 frames) = 400000000 pixels"),
        ]
        for body, message in cases:
            status, reply = self._predict(body)
            self.assertEqual(status, 400, (body, reply))
            self.assertIn(message, reply["error"], body)
        self.assertEqual(self._http(f"/v1/models/{MODEL}:predict",
                                    b"", method="POST")[0], 400)

    def test_unknown_model_version_label_or_path_get_404(self):
        body = {"instances": self.images[:1].tolist()}
        cases = [
            ("/v1/models/other:predict", "Servable not found for request: "
                                         "Latest(other)"),
            (f"/v1/models/{MODEL}/versions/2:predict",
             f"Servable not found for request: Specific({MODEL}, 2)"),
            (f"/v1/models/{MODEL}/labels/stable:predict",
             "Unrecognized servable version label: stable"),
            (f"/v1/models/{MODEL}/versions/x:predict", "is not a number"),
            (f"/v1/models/{MODEL}:classify", "Malformed request"),
            ("/v2/anything", "Malformed request"),
        ]
        for path, message in cases:
            status, reply = self._predict(body, path)
            self.assertEqual(status, 404, (path, reply))
            self.assertIn(message, reply["error"])
        status, reply = self._http(f"/v1/models/{MODEL}")
        self.assertEqual((status, reply["model_version_status"][0]["state"],
                          reply["model_version_status"][0]["version"]),
                         (200, "AVAILABLE", "1"))
        self.assertEqual(self._http(f"/v1/models/{MODEL}/versions/3")[0],
                         404)

    def test_a_server_failure_is_answered_500(self):
        with mock.patch.object(self.backend, "run",
                               side_effect=RuntimeError("disk on fire")):
            status, reply = self._predict(
                {"instances": self.images[:1].tolist()})
        self.assertEqual(status, 500)
        self.assertIn("RuntimeError: disk on fire", reply["error"])

    def test_grpc_statuses(self):
        def request(version=None, signature="serving_default",
                    images=self.images, name=MODEL):
            message = predict_pb2.PredictRequest()
            message.model_spec.name = name
            message.model_spec.signature_name = signature
            if version is not None:
                message.model_spec.version.value = version
            message.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
            return message

        reply = self.stub.Predict(request(version=1), timeout=30)
        self.assertEqual(reply.model_spec.version.value, 1)
        self.assertAllClose(tf.make_ndarray(reply.outputs["probabilities"]),
                            self.expected["probabilities"], atol=1e-6)
        cases = [
            (request(name="other"), grpc.StatusCode.NOT_FOUND,
             "Latest(other)"),
            (request(version=2), grpc.StatusCode.NOT_FOUND,
             f"Specific({MODEL}, 2)"),
            (request(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION,
             "Serving signature key \"nope\" not found"),
            (request(images=self.images.astype(np.float32)),
             grpc.StatusCode.INVALID_ARGUMENT,
             "to be uint8 but float32 is provided"),
            (request(images=self.images[0]),
             grpc.StatusCode.INVALID_ARGUMENT, export.INVALID_RANK_MESSAGE),
        ]
        for message, code, text in cases:
            with self.assertRaises(grpc.RpcError) as caught:
                self.stub.Predict(message, timeout=30)
            self.assertEqual(caught.exception.code(), code)
            self.assertIn(text, caught.exception.details())


if __name__ == "__main__":
    tf.test.main()
