"""lfm_tf.export and pipelines.export: the SavedModel contract for TF Serving.

The TF Serving binary is not installable here, so the contract is checked
with TensorFlow's tools: `saved_model_cli show/run`, `tf.saved_model.load`
in a fresh process, and TF Serving's own warm-up record format.
"""

import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import zlib
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from lfm_tf import config as config_lib
from lfm_tf import export
from lfm_tf.data import pipeline
from lfm_tf.models import backbones

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 8
NAMES = ["zero", "one", "two"]
PREP = pipeline.Preprocessing(None, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
MODEL = {"backbone": "small_cnn", "width": 4, "depth": 28, "dropout": 0.0}
CLI = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.build_backbone(
        config_lib.ModelConfig(**MODEL), len(NAMES), (SIDE, SIDE, 3))


def _images(n=4, seed=0, side=SIDE, channels=3):
    return np.random.default_rng(seed).integers(
        0, 256, (n, side, side, channels), dtype=np.uint8)


def _keras_probabilities(classifier, images, prep=PREP):
    logits = classifier(pipeline.preprocess(images, prep), training=False)
    return tf.nn.softmax(logits).numpy()


def _png(image):
    return tf.io.encode_png(image).numpy()


def _encoded(image_format, width, height, frames=1, mode="RGB",
             **options):
    """An encoded width x height image (PIL), `frames` frames if animated."""
    images = [Image.new(mode, (width, height), (40 * i, 0, 0))
              for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, image_format, save_all=frames > 1,
                   append_images=images[1:], **options)
    return buffer.getvalue()


def _zeros_png(width, height, rows_per_block=100):
    """A valid grayscale PNG of zeros, e.g. 20000 x 20000 in 0.4 MB.

    Built in 0.1 s without compressing 400 MB: after a full flush a deflate
    compressor starts afresh, so every further block of zero rows
    compresses to the same bytes; the Adler-32 of n zero bytes is
    (n mod 65521) << 16 | 1.
    """
    assert height % rows_per_block == 0
    rows = b"\0" * ((width + 1) * rows_per_block)  # filter byte + pixels
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = (((width + 1) * height % 65521) << 16) | 1
    stream = (b"\x78\xda" + first + again * (height // rows_per_block - 1)
              + compressor.flush(zlib.Z_FINISH) + struct.pack(">I", adler))

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", stream) + chunk(b"IEND", b""))


def _run(args, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          check=False, **kwargs)


def _signature_block(show_output, name):
    """The text of one signature_def in `saved_model_cli show --all`."""
    match = re.search(
        rf"signature_def\['{name}'\]:\n(.*?)Method name is: (\S+)",
        show_output, re.S)
    assert match, f"no signature {name} in:\n{show_output[:3000]}"
    return match.group(1), match.group(2)


def _tensor_info(block, kind, name):
    """(dtype, shape) of inputs/outputs[name] in a signature block."""
    match = re.search(
        rf"{kind}\['{name}'\] tensor_info:\s+dtype: (\S+)\s+shape: (.+)",
        block)
    assert match, f"no {kind} {name} in:\n{block}"
    return match.group(1), match.group(2).strip()


# The limits of WriteSavedModelTest's export: small, so tests are cheap.
MAX_PIXELS = 32 * 32
MAX_BYTES = 8192


class WriteSavedModelTest(tf.test.TestCase):
    """One tiny classifier, exported once; every test reads it."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.classifier = _classifier()
        cls.root = tempfile.mkdtemp()
        os.chmod(cls.root, 0o755)  # the test's own directory, for `nobody`
        cls.path = os.path.join(cls.root, "model")
        cls.warmup = _images(2, seed=9)
        # A private umask: the export's modes must not come from it.
        umask = os.umask(0o077)
        try:
            export.write_saved_model(
                cls.classifier, cls.path, class_names=NAMES,
                preprocessing=PREP, input_shape=(SIDE, SIDE, 3),
                warmup_images=cls.warmup, top_k=2,
                max_image_pixels=MAX_PIXELS, max_image_bytes=MAX_BYTES)
        finally:
            os.umask(umask)
        cls.loaded = tf.saved_model.load(cls.path)
        cls.serve = cls.loaded.signatures["serving_default"]
        cls.serve_bytes = cls.loaded.signatures["serving_bytes"]

    def test_written_atomically_with_nothing_left_beside(self):
        self.assertEqual(os.listdir(self.root), ["model"])
        self.assertTrue(os.path.exists(
            os.path.join(self.path, "saved_model.pb")))

    def test_saved_model_cli_shows_both_signatures(self):
        result = _run(CLI + ["show", "--dir", self.path, "--all"])
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        block, method = _signature_block(result.stdout, "serving_default")
        self.assertEqual(method, "tensorflow/serving/predict")
        self.assertEqual(_tensor_info(block, "inputs", "images"),
                         ("DT_UINT8", "unknown_rank"))
        expected_outputs = {"probabilities": ("DT_FLOAT", "(-1, 3)"),
                            "top_k_ids": ("DT_INT32", "(-1, 2)"),
                            "top_k_scores": ("DT_FLOAT", "(-1, 2)"),
                            "class_names": ("DT_STRING", "(-1, 2)")}
        for name, info in expected_outputs.items():
            self.assertEqual(_tensor_info(block, "outputs", name), info, name)
        block, method = _signature_block(result.stdout, "serving_bytes")
        self.assertEqual(method, "tensorflow/serving/predict")
        self.assertEqual(_tensor_info(block, "inputs", "image_bytes"),
                         ("DT_STRING", "(-1)"))
        for name, info in expected_outputs.items():
            self.assertEqual(_tensor_info(block, "outputs", name), info, name)

    def test_saved_model_cli_run_gives_keras_probabilities(self):
        images = _images(3, seed=3)
        npy = os.path.join(self.get_temp_dir(), "images.npy")
        np.save(npy, images)
        out = os.path.join(self.get_temp_dir(), "cli_out")
        result = _run(CLI + [
            "run", "--dir", self.path, "--tag_set", "serve",
            "--signature_def", "serving_default", "--inputs",
            f"images={npy}", "--outdir", out, "--overwrite"])
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        probabilities = np.load(os.path.join(out, "probabilities.npy"))
        self.assertAllClose(probabilities,
                            _keras_probabilities(self.classifier, images),
                            atol=1e-6)
        self.assertAllEqual(np.load(os.path.join(out, "top_k_ids.npy")),
                            np.argsort(-probabilities, axis=1)[:, :2])

    def test_saved_model_cli_run_rejects_a_wrong_rank(self):
        # The same session-based path TF Serving uses: the message must be
        # ours, not a kernel's.
        npy = os.path.join(self.get_temp_dir(), "one_image.npy")
        np.save(npy, _images(1)[0])
        result = _run(CLI + [
            "run", "--dir", self.path, "--tag_set", "serve",
            "--signature_def", "serving_default", "--inputs",
            f"images={npy}", "--outdir", self.get_temp_dir(),
            "--overwrite"])
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(export.INVALID_RANK_MESSAGE, result.stderr)
        self.assertIn(f"[{SIDE} {SIDE} 3]", result.stderr)

    def test_fresh_process_gives_keras_probabilities(self):
        images = _images(4, seed=1)
        npy = os.path.join(self.get_temp_dir(), "fresh_in.npy")
        np.save(npy, images)
        result_path = os.path.join(self.get_temp_dir(), "fresh_out.npz")
        code = (
            "import sys, numpy as np, tensorflow as tf\n"
            "model = tf.saved_model.load(sys.argv[1])\n"
            "images = np.load(sys.argv[2])\n"
            "pixels = model.signatures['serving_default'](\n"
            "    images=tf.constant(images))\n"
            "png = [tf.io.encode_png(i).numpy() for i in images]\n"
            "encoded = model.signatures['serving_bytes'](\n"
            "    image_bytes=tf.constant(png))\n"
            "np.savez(sys.argv[3], pixels=pixels['probabilities'].numpy(),\n"
            "         encoded=encoded['probabilities'].numpy(),\n"
            "         names=pixels['class_names'].numpy().astype(str))\n")
        result = _run([sys.executable, "-c", code, self.path, npy,
                       result_path])
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        fresh = np.load(result_path)
        expected = _keras_probabilities(self.classifier, images)
        self.assertAllClose(fresh["pixels"], expected, atol=1e-6)
        self.assertAllClose(fresh["encoded"], expected, atol=1e-6)
        best = np.argmax(expected, axis=1)
        self.assertEqual(list(fresh["names"][:, 0]),
                         [NAMES[i] for i in best])

    def test_outputs_are_consistent(self):
        out = self.serve(images=tf.constant(_images(5, seed=2)))
        probabilities = out["probabilities"].numpy()
        self.assertAllClose(probabilities.sum(axis=1), np.ones(5), atol=1e-6)
        ids = out["top_k_ids"].numpy()
        self.assertEqual(ids.dtype, np.int32)
        self.assertAllEqual(ids, np.argsort(-probabilities, axis=1)[:, :2])
        self.assertAllClose(out["top_k_scores"],
                            np.take_along_axis(probabilities, ids, axis=1))
        self.assertAllEqual(out["class_names"].numpy().astype(str),
                            np.asarray(NAMES)[ids])

    def test_png_bytes_give_exactly_the_pixel_result(self):
        images = _images(3, seed=5)
        from_bytes = self.serve_bytes(
            image_bytes=tf.constant([_png(i) for i in images]))
        from_pixels = self.serve(images=tf.constant(images))
        for name in export.OUTPUTS:
            self.assertAllEqual(from_bytes[name], from_pixels[name], name)

    def test_jpeg_bytes_give_the_result_of_the_decoded_pixels(self):
        images = _images(3, seed=6)
        jpegs = [tf.io.encode_jpeg(i, quality=90).numpy() for i in images]
        decoded = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpegs])
        self.assertFalse(np.array_equal(decoded, images))  # lossy
        from_bytes = self.serve_bytes(image_bytes=tf.constant(jpegs))
        self.assertAllClose(
            from_bytes["probabilities"],
            _keras_probabilities(self.classifier, decoded), atol=1e-6)

    def test_other_sizes_are_resized_like_training(self):
        big = _images(2, seed=7, side=3 * SIDE)
        resizing = pipeline.Preprocessing(SIDE, PREP.mean, PREP.std)
        expected = _keras_probabilities(self.classifier, big, resizing)
        self.assertAllClose(self.serve(images=tf.constant(big))
                            ["probabilities"], expected, atol=1e-6)
        # serving_bytes: sizes may differ within one batch.
        small = _images(1, seed=8, side=SIDE // 2)
        mixed = self.serve_bytes(
            image_bytes=tf.constant([_png(big[0]), _png(small[0])]))
        self.assertAllClose(mixed["probabilities"][0], expected[0],
                            atol=1e-6)
        self.assertAllClose(
            mixed["probabilities"][1],
            _keras_probabilities(self.classifier, small, resizing)[0],
            atol=1e-6)

    def test_grayscale_is_tiled_to_rgb(self):
        gray = _images(2, seed=4, channels=1)
        self.assertAllEqual(
            self.serve(images=tf.constant(gray))["probabilities"],
            self.serve(images=tf.constant(np.repeat(gray, 3, axis=-1)))
            ["probabilities"])

    def test_bad_inputs_are_rejected_with_the_documented_errors(self):
        cases = [
            (_images(1)[0], export.INVALID_RANK_MESSAGE, "[8 8 3]"),
            (_images(2)[None], export.INVALID_RANK_MESSAGE, "[1 2 8 8 3]"),
            (np.zeros([8], np.uint8), export.INVALID_RANK_MESSAGE, "[8]"),
            (_images(2, channels=4), export.INVALID_CHANNELS_MESSAGE,
             "[2 8 8 4]"),
            (_images(1, channels=2), export.INVALID_CHANNELS_MESSAGE,
             "[1 8 8 2]"),
        ]
        for images, message, shape in cases:
            with self.assertRaises(tf.errors.InvalidArgumentError) as caught:
                self.serve(images=tf.constant(images))
            self.assertIn(message, str(caught.exception))
            self.assertIn(f"Received shape:] {shape}", str(caught.exception))
        # The dtype is part of the signature: rejected before the graph.
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    "expected to be a uint8 tensor"):
            self.serve(images=tf.zeros([1, SIDE, SIDE, 3], tf.float32))
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                    "Unknown image file format"):
            self.serve_bytes(image_bytes=tf.constant([b"not an image"]))

    def test_encoded_images_beyond_the_limits_are_refused(self):
        # At the limit: accepted, in every format decode_image reads.
        fits = [_encoded(f, 32, 32) for f in ("PNG", "JPEG", "GIF", "BMP",
                                              "WEBP")]
        fits.append(_encoded("GIF", 16, 32, frames=2))  # 2 x 512 pixels
        out = self.serve_bytes(image_bytes=tf.constant(fits))
        self.assertEqual(out["probabilities"].shape, (len(fits), 3))
        # One past it, read from the header: named with the sizes seen.
        cases = [
            (_encoded("PNG", 33, 32), "a PNG of height 32 x width 33 (x 1 "
                                      "frames) = 1056 pixels"),
            (_encoded("JPEG", 32, 33), 'a JPEG of height 33 x width 32'),
            (_encoded("BMP", 40, 30), 'a BMP of height 30 x width 40'),
            # WebP's three layouts: lossy (VP8), lossless (VP8L), extended
            # (VP8X, here for the alpha channel).
            (_encoded("WEBP", 64, 64), 'a WebP of height 64 x width 64'),
            (_encoded("WEBP", 64, 20, lossless=True),
             'a WebP of height 20 x width 64'),
            (_encoded("WEBP", 40, 30, mode="RGBA"),
             'a WebP of height 30 x width 40'),
            (_encoded("GIF", 33, 32), 'a GIF of height 32 x width 33 (x 1'),
            (_encoded("GIF", 16, 32, frames=3), "(x 3 frames) = 1536"),
            (b"\0" * (MAX_BYTES + 1), f"has {MAX_BYTES + 1} bytes"),
        ]
        for encoded, detail in cases:
            with self.assertRaises(tf.errors.InvalidArgumentError) as caught:
                self.serve_bytes(image_bytes=tf.constant([fits[0], encoded]))
            message = str(caught.exception)
            self.assertIn("image_bytes[1] ", message)
            self.assertIn(detail, message)
            limit = (f"{export.TOO_MANY_BYTES_MESSAGE} max_image_bytes="
                     f"{MAX_BYTES}" if "bytes" in detail else
                     f"{export.TOO_MANY_PIXELS_MESSAGE} max_image_pixels="
                     f"{MAX_PIXELS}")
            self.assertIn(limit, message)

    def test_pixel_arrays_beyond_the_limit_are_refused(self):
        self.assertEqual(self.serve(images=tf.zeros(
            [1, 32, 32, 3], tf.uint8))["probabilities"].shape, (1, 3))
        with self.assertRaises(tf.errors.InvalidArgumentError) as caught:
            self.serve(images=tf.zeros([2, 33, 32, 1], tf.uint8))
        self.assertIn(f"{export.TOO_MANY_PIXELS_MESSAGE} max_image_pixels="
                      f"{MAX_PIXELS}", str(caught.exception))
        self.assertIn("Received shape:] [2 33 32 1]", str(caught.exception))

    def test_empty_batches_give_empty_outputs(self):
        for outputs in (
                self.serve(images=tf.zeros([0, SIDE, SIDE, 3], tf.uint8)),
                self.serve(images=tf.zeros([0, 5, 7, 1], tf.uint8)),
                self.serve_bytes(image_bytes=tf.constant([], tf.string))):
            self.assertEqual(
                {k: tuple(v.shape) for k, v in outputs.items()},
                {"probabilities": (0, 3), "top_k_ids": (0, 2),
                 "top_k_scores": (0, 2), "class_names": (0, 2)})

    def test_readable_by_other_users(self):
        # Written under umask 077 (setUpClass), yet 0755 / 0644.
        files = []
        for directory, _, names in os.walk(self.path):
            self.assertEqual(oct(os.stat(directory).st_mode & 0o777),
                             oct(0o755), directory)
            for name in names:
                files.append(os.path.join(directory, name))
                self.assertEqual(oct(os.stat(files[-1]).st_mode & 0o777),
                                 oct(0o644), files[-1])
        self.assertGreaterEqual(len(files), 5)
        if os.geteuid() != 0:
            self.skipTest("reading as another uid needs root (setuid)")
        nobody = 65534  # as a TF Serving container's non-root user

        def become_nobody():
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)

        try:
            result = subprocess.run(
                ["cat", *files], preexec_fn=become_nobody, check=False,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except subprocess.SubprocessError as error:
            # Root in a sandbox's user namespace (Bazel's linux-sandbox)
            # may not change uid; the modes above are still checked.
            self.skipTest(f"cannot run a process as uid {nobody} here: "
                          f"{error}")
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        self.assertEqual(len(result.stdout),
                         sum(os.path.getsize(f) for f in files))

    def test_warmup_records_are_valid_prediction_logs(self):
        # pylint: disable=g-import-not-at-top
        from tensorflow_serving.apis import prediction_log_pb2

        records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
                   for r in tf.data.TFRecordDataset(
                       os.path.join(self.path, export.WARMUP_FILE))]
        self.assertLen(records, len(self.warmup) + 1)
        requests = [r.predict_log.request for r in records]
        self.assertEqual([r.model_spec.signature_name for r in requests],
                         ["serving_default"] * 2 + ["serving_bytes"])
        for i, request in enumerate(requests[:2]):
            self.assertAllEqual(tf.make_ndarray(request.inputs["images"]),
                                self.warmup[i:i + 1])
        # Replay them as TF Serving does at load time: each must run.
        replies = []
        for request in requests:
            signature = self.loaded.signatures[
                request.model_spec.signature_name]
            inputs = {name: tf.constant(tf.make_ndarray(proto))
                      for name, proto in request.inputs.items()}
            replies.append(signature(**inputs)["probabilities"].numpy())
        # Batching may change the last bits of a float reduction.
        self.assertAllClose(replies[2], np.concatenate(replies[:2]),
                            atol=1e-6)
        self.assertAllEqual(export.read_warmup_images(self.path),
                            self.warmup)

    def test_metadata_describes_the_export(self):
        with open(os.path.join(self.path, export.METADATA_FILE)) as f:
            metadata = json.load(f)
        self.assertEqual(metadata["class_names"], NAMES)
        self.assertEqual(metadata["input_shape"], [SIDE, SIDE, 3])
        self.assertEqual(metadata["top_k"], 2)
        self.assertEqual(metadata["preprocessing"], PREP.to_dict())
        self.assertEqual(metadata["limits"], {"max_image_bytes": MAX_BYTES,
                                              "max_image_pixels": MAX_PIXELS})

    def test_only_the_classifier_variables_are_exported(self):
        exported = sum(int(np.prod(v.shape)) for v in self.loaded.variables)
        self.assertEqual(exported, self.classifier.count_params())


class WriteSavedModelErrorsTest(tf.test.TestCase):

    def _write(self, classifier, path, **overrides):
        kwargs = dict(class_names=NAMES, preprocessing=PREP,
                      input_shape=(SIDE, SIDE, 3))
        kwargs.update(overrides)
        return export.write_saved_model(classifier, path, **kwargs)

    def test_a_failure_leaves_nothing_and_keeps_the_old_model(self):
        root = self.get_temp_dir()
        target = os.path.join(root, "model")
        with mock.patch.object(export, "write_warmup_requests",
                               side_effect=OSError("disk full")):
            with self.assertRaisesRegex(OSError, "disk full"):
                self._write(_classifier(), target,
                            warmup_images=_images(1))
        self.assertEqual(os.listdir(root), [])
        # An existing model is replaced whole on success, kept on failure.
        self._write(_classifier(), target)
        marker = os.path.join(target, "marker")
        open(marker, "w").close()
        with mock.patch.object(export, "write_warmup_requests",
                               side_effect=OSError("disk full")):
            with self.assertRaises(OSError):
                self._write(_classifier(), target, warmup_images=_images(1))
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(os.listdir(root), ["model"])
        self._write(_classifier(), target)
        self.assertFalse(os.path.exists(marker))
        self.assertEqual(os.listdir(root), ["model"])

    def test_inconsistent_arguments(self):
        path = os.path.join(self.get_temp_dir(), "never")
        with self.assertRaisesRegex(ValueError, r"expected logits of shape "
                                    r"\(1, 4\)"):
            self._write(_classifier(), path, class_names=NAMES + ["three"])
        with self.assertRaisesRegex(ValueError, "square RGB"):
            self._write(_classifier(), path, input_shape=(SIDE, 4, 3))
        with self.assertRaisesRegex(ValueError, "image_size=16"):
            self._write(_classifier(), path, preprocessing=(
                pipeline.Preprocessing(16, PREP.mean, PREP.std)))
        with self.assertRaisesRegex(ValueError, "warmup_images"):
            self._write(_classifier(), path,
                        warmup_images=np.zeros((1, SIDE, SIDE, 3)))
        self.assertFalse(os.path.exists(path))


def _fake_workdir(root, name="run", with_saved_model=True):
    """What pipelines.train leaves: weights, export_info, SavedModel."""
    classifier = _classifier(seed=1)
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    classifier.save_weights(os.path.join(workdir, "classifier.weights.h5"))
    info = {"model_name": "digits_lfm", "class_names": NAMES,
            "input_shape": [SIDE, SIDE, 3], "preprocessing": PREP.to_dict(),
            "architecture": {"kind": "backbone", "model": MODEL}}
    with open(os.path.join(workdir, "export_info.json"), "w") as f:
        json.dump(info, f)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.ExperimentConfig().to_json())
    if with_saved_model:
        export.write_saved_model(
            classifier, os.path.join(workdir, "saved_model"),
            class_names=NAMES, preprocessing=PREP,
            input_shape=(SIDE, SIDE, 3), warmup_images=_images(3, seed=11))
    return workdir, classifier


class ExportForServingTest(tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        cls.workdir, cls.classifier = _fake_workdir(cls.root)

    def test_load_classifier_rebuilds_the_weights(self):
        classifier, info = export.load_classifier(self.workdir)
        self.assertEqual(info["model_name"], "digits_lfm")
        images = _images(3)
        self.assertAllClose(_keras_probabilities(classifier, images),
                            _keras_probabilities(self.classifier, images))

    def test_layout_and_versions(self):
        serving_root = os.path.join(self.get_temp_dir(), "models")
        model_dir = os.path.join(serving_root, "digits_lfm")
        first = export.export_for_serving(self.workdir, serving_root)
        self.assertEqual(first, os.path.join(model_dir, "1"))
        self.assertEqual(export.export_for_serving(self.workdir,
                                                   serving_root),
                         os.path.join(model_dir, "2"))
        self.assertEqual(
            export.export_for_serving(self.workdir, serving_root, version=7),
            os.path.join(model_dir, "7"))
        self.assertEqual(export.export_for_serving(self.workdir,
                                                   serving_root),
                         os.path.join(model_dir, "8"))
        self.assertEqual(sorted(os.listdir(model_dir)),
                         ["1", "2", "7", "8"])  # nothing hidden left over
        for name in ("saved_model.pb", "variables", export.WARMUP_FILE,
                     export.METADATA_FILE):
            self.assertTrue(os.path.exists(os.path.join(first, name)), name)
        loaded = tf.saved_model.load(first)
        images = _images(4, seed=2)
        self.assertAllClose(
            loaded.signatures["serving_default"](
                images=tf.constant(images))["probabilities"],
            _keras_probabilities(self.classifier, images), atol=1e-6)
        # The default limits refuse a decompression bomb from its header:
        # 0.4 MB that decodes to 1.2 GB of RGB, and nothing is allocated.
        bomb = _zeros_png(20000, 20000)
        self.assertLess(len(bomb), 400_000)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        with self.assertRaisesRegex(
                tf.errors.InvalidArgumentError,
                r"image_bytes\[0\] is a PNG of height 20000 x width 20000 "
                r"\(x 1 frames\) = 400000000 pixels: .* max_image_pixels="
                f"{export.DEFAULT_MAX_IMAGE_PIXELS}"):
            loaded.signatures["serving_bytes"](image_bytes=tf.constant([bomb]))
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        self.assertLess(grown, 100 * 1024)
        # Warm-up carried over from the run's SavedModel (real examples).
        self.assertAllEqual(export.read_warmup_images(first),
                            _images(3, seed=11))
        with open(os.path.join(first, export.METADATA_FILE)) as f:
            metadata = json.load(f)
        self.assertEqual((metadata["model_name"], metadata["version"]),
                         ("digits_lfm", 1))
        self.assertEqual(metadata["architecture"]["model"], MODEL)
        self.assertEqual(metadata["limits"], {
            "max_image_bytes": export.DEFAULT_MAX_IMAGE_BYTES,
            "max_image_pixels": export.DEFAULT_MAX_IMAGE_PIXELS})

    def test_model_name_override(self):
        serving_root = self.get_temp_dir()
        path = export.export_for_serving(self.workdir, serving_root,
                                         model_name="lfm")
        self.assertEqual(path, os.path.join(serving_root, "lfm", "1"))
        with self.assertRaisesRegex(ValueError, "model_name='a/b'"):
            export.export_for_serving(self.workdir, serving_root,
                                      model_name="a/b")

    def test_refuses_to_overwrite_without_the_flag(self):
        serving_root = self.get_temp_dir()
        path = export.export_for_serving(self.workdir, serving_root)
        marker = os.path.join(path, "marker")
        open(marker, "w").close()
        with self.assertRaises(FileExistsError) as caught:
            export.export_for_serving(self.workdir, serving_root, version=1)
        self.assertIn(path, str(caught.exception))
        self.assertIn("--overwrite", str(caught.exception))
        self.assertTrue(os.path.exists(marker))
        self.assertEqual(
            export.export_for_serving(self.workdir, serving_root, version=1,
                                      overwrite=True), path)
        self.assertFalse(os.path.exists(marker))
        self.assertTrue(os.path.exists(os.path.join(path, "saved_model.pb")))

    def test_a_failed_export_leaves_no_version_behind(self):
        serving_root = self.get_temp_dir()
        model_dir = os.path.join(serving_root, "digits_lfm")
        path = export.export_for_serving(self.workdir, serving_root)
        marker = os.path.join(path, "marker")
        open(marker, "w").close()
        with mock.patch.object(export, "write_warmup_requests",
                               side_effect=OSError("disk full")):
            with self.assertRaisesRegex(OSError, "disk full"):
                export.export_for_serving(self.workdir, serving_root)
            with self.assertRaisesRegex(OSError, "disk full"):
                export.export_for_serving(self.workdir, serving_root,
                                          version=1, overwrite=True)
        self.assertEqual(os.listdir(model_dir), ["1"])
        self.assertTrue(os.path.exists(marker))

    def test_a_version_created_meanwhile_is_not_replaced(self):
        # Another export writes version 1 while this one is being built.
        serving_root = self.get_temp_dir()
        target = os.path.join(serving_root, "digits_lfm", "1")
        load = export.load_classifier

        def load_then_race(workdir):
            loaded = load(workdir)
            os.makedirs(target)
            open(os.path.join(target, "theirs"), "w").close()
            return loaded

        with mock.patch.object(export, "load_classifier", load_then_race):
            with self.assertRaisesRegex(FileExistsError, target):
                export.export_for_serving(self.workdir, serving_root)
        self.assertEqual(os.listdir(target), ["theirs"])
        self.assertEqual(os.listdir(os.path.dirname(target)), ["1"])

    def test_bad_versions_and_limits(self):
        for version in (0, -3, 1.5, "2", True):
            with self.assertRaisesRegex(ValueError, "positive integer"):
                export.export_for_serving(self.workdir, self.get_temp_dir(),
                                          version=version)
        for name in ("max_image_bytes", "max_image_pixels"):
            for value in (0, -1, 2.5, "100"):
                with self.assertRaisesRegex(
                        ValueError, f"Received {name}={value!r}; expected a "
                        "positive integer"):
                    export.export_for_serving(
                        self.workdir, self.get_temp_dir(), **{name: value})

    def test_missing_files_name_the_file_and_the_command(self):
        empty = self.get_temp_dir()
        with self.assertRaises(FileNotFoundError) as caught:
            export.export_for_serving(empty, os.path.join(empty, "m"))
        self.assertIn(os.path.join(empty, "export_info.json"),
                      str(caught.exception))
        self.assertIn("python -m pipelines.train", str(caught.exception))
        workdir = os.path.join(self.get_temp_dir(), "no_weights")
        os.makedirs(workdir)
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"model_name": "m", "class_names": NAMES,
                       "input_shape": [SIDE, SIDE, 3],
                       "preprocessing": PREP.to_dict(),
                       "architecture": {"kind": "backbone",
                                        "model": MODEL}}, f)
        with self.assertRaisesRegex(FileNotFoundError,
                                    "classifier.weights.h5.*pipelines.train"):
            export.load_classifier(workdir)
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"model_name": "m"}, f)
        with self.assertRaisesRegex(ValueError, "lacks"):
            export.load_classifier(workdir)

    def test_without_a_run_saved_model_there_is_no_warmup(self):
        workdir, _ = _fake_workdir(self.get_temp_dir(), "bare",
                                   with_saved_model=False)
        path = export.export_for_serving(workdir, self.get_temp_dir())
        self.assertFalse(os.path.exists(os.path.join(path,
                                                     export.WARMUP_FILE)))
        self.assertTrue(os.path.exists(os.path.join(path, "saved_model.pb")))

    def test_searched_cell_is_rebuilt_from_its_inlined_genotype(self):
        # pylint: disable=g-import-not-at-top
        from lfm_tf.nas import genotypes

        model = dict(MODEL, genotype=genotypes.PDARTS.to_json(), cells=3,
                     auxiliary_weight=0.4, drop_path_rate=0.2)
        keras.utils.set_random_seed(6)
        trained = backbones.build_backbone(
            config_lib.ModelConfig(**model), len(NAMES), (SIDE, SIDE, 3))
        workdir = os.path.join(self.get_temp_dir(), "nas")
        os.makedirs(workdir)
        trained.save_weights(os.path.join(workdir, "classifier.weights.h5"))
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"model_name": "pdarts", "class_names": NAMES,
                       "input_shape": [SIDE, SIDE, 3],
                       "preprocessing": PREP.to_dict(),
                       "architecture": {"kind": "backbone",
                                        "model": model}}, f)
        classifier, _ = export.load_classifier(workdir)
        self.assertEqual(classifier.trunk.genotype, genotypes.PDARTS)
        images = _images(2)
        self.assertAllClose(_keras_probabilities(classifier, images),
                            _keras_probabilities(trained, images))

    def test_ensemble_is_rebuilt_and_served_as_one_model(self):
        # pylint: disable=g-import-not-at-top
        from lfm_tf.models import ensemble

        members = [_classifier(seed=3), _classifier(seed=4)]
        trained = ensemble.LogitEnsemble(members, name="ensemble_export")
        workdir = os.path.join(self.get_temp_dir(), "ensemble")
        os.makedirs(workdir)
        trained.save_weights(os.path.join(workdir, "classifier.weights.h5"))
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"model_name": "lfm", "class_names": NAMES,
                       "input_shape": [SIDE, SIDE, 3],
                       "preprocessing": PREP.to_dict(),
                       "architecture": {"kind": "ensemble", "members": 2,
                                        "model": MODEL}}, f)
        classifier, _ = export.load_classifier(workdir)
        images = _images(3)
        expected = tf.nn.softmax(sum(
            m(pipeline.preprocess(images, PREP), training=False)
            for m in members) / 2).numpy()
        self.assertAllClose(_keras_probabilities(classifier, images),
                            expected, atol=1e-6)
        path = os.path.join(workdir, "saved_model")
        export.write_saved_model(classifier, path, class_names=NAMES,
                                 preprocessing=PREP,
                                 input_shape=(SIDE, SIDE, 3))
        served = tf.saved_model.load(path).signatures["serving_default"](
            images=tf.constant(images))
        self.assertAllClose(served["probabilities"], expected, atol=1e-5)

    def test_unknown_architecture_kind(self):
        workdir = os.path.join(self.get_temp_dir(), "odd")
        os.makedirs(workdir)
        open(os.path.join(workdir, "classifier.weights.h5"), "w").close()
        with open(os.path.join(workdir, "export_info.json"), "w") as f:
            json.dump({"model_name": "m", "class_names": NAMES,
                       "input_shape": [SIDE, SIDE, 3],
                       "preprocessing": PREP.to_dict(),
                       "architecture": {"kind": "supernet"}}, f)
        with self.assertRaisesRegex(ValueError, "'supernet'"):
            export.load_classifier(workdir)


class CommandLineTest(tf.test.TestCase):
    """`python -m pipelines.export` end to end, in subprocesses."""

    def test_export_then_refuse_then_missing_run(self):
        root = self.get_temp_dir()
        workdir, classifier = _fake_workdir(root)
        served = os.path.join(root, "served")
        command = [sys.executable, "-m", "pipelines.export",
                   f"--workdir={workdir}", f"--export_dir={served}",
                   "--version=3", "--model_name=lfm",
                   "--max_image_pixels=4096", "--max_image_bytes=100000"]
        result = _run(command)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        path = os.path.join(served, "lfm", "3")
        self.assertIn(path, result.stdout)
        with open(os.path.join(path, export.METADATA_FILE)) as f:
            self.assertEqual(json.load(f)["limits"],
                             {"max_image_bytes": 100000,
                              "max_image_pixels": 4096})
        images = _images(2, seed=3)
        self.assertAllClose(
            tf.saved_model.load(path).signatures["serving_default"](
                images=tf.constant(images))["probabilities"],
            _keras_probabilities(classifier, images), atol=1e-6)

        again = _run(command)
        self.assertEqual(again.returncode, 1)
        self.assertIn(f"error: {path} already exists; pass --overwrite",
                      again.stderr)

        missing = _run([sys.executable, "-m", "pipelines.export",
                        f"--workdir={root}/nothing", f"--export_dir={served}"])
        self.assertEqual(missing.returncode, 1)
        self.assertIn("export_info.json not found", missing.stderr)
        self.assertIn("python -m pipelines.train", missing.stderr)
        self.assertEqual(os.listdir(os.path.join(served, "lfm")), ["3"])


if __name__ == "__main__":
    tf.test.main()
