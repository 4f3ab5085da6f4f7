"""The trained classifier as a SavedModel for TF Serving.

Only the final classifier is exported: a `keras.Model` taking normalised
float32 images [B, H, W, 3] to logits [B, C]. W2, V, r, B, architecture
logits and supernets never are (`load_classifier` rebuilds the classifier
alone from `export_info.json` and `classifier.weights.h5`).

Signatures (method `tensorflow/serving/predict`):

* `serving_default`, input `images`: uint8 [batch, height, width, 3], or
  [batch, height, width, 1] for grayscale (tiled to RGB, as decoding a
  grayscale PNG with three channels does). Any height and width: images are
  resized in the graph to the classifier's input size, then go through the
  training preprocessing (`lfm_tf.data.pipeline.preprocess`). The signature
  declares the input's rank as unknown on purpose: a declared rank lets
  TensorFlow's graph optimiser assume it and skip the rank check, so a
  wrong rank would fail later with an obscure kernel message.
* `serving_bytes`, input `image_bytes`: string [batch], each an encoded
  JPEG, PNG, GIF or BMP image (any size; decoded to RGB in the graph).

Both return `probabilities` float32 [batch, C], `top_k_ids` int32
[batch, k], `top_k_scores` float32 [batch, k] and `class_names` string
[batch, k] (the names of the top-k classes), with k = min(top_k, C). An
empty batch (batch = 0) gives empty outputs.

Decoding is bounded, per image, by limits fixed at export:
`max_image_bytes` (encoded size) and `max_image_pixels` (height x width;
for animations, times an upper bound on the frame count). The dimensions
are read from the file's header (JPEG: `tf.image.extract_jpeg_shape`; PNG,
GIF, BMP and WebP: their header fields) before anything is decoded, so a
small file that would decode to gigabytes is refused without allocating
it. `serving_default` applies `max_image_pixels` to its pixel arrays too.

Bad input raises `InvalidArgumentError` in the graph (HTTP 400 /
INVALID_ARGUMENT from TF Serving) with one of `INVALID_RANK_MESSAGE`,
`INVALID_CHANNELS_MESSAGE`, `TOO_MANY_PIXELS_MESSAGE`,
`TOO_MANY_BYTES_MESSAGE`; a dtype other than the signature's is rejected
before the graph runs.
"""

import errno
import json
import os
import re
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from lfm_tf import config as config_lib
from lfm_tf import fileio
from lfm_tf.data import pipeline
from lfm_tf.models import backbones
from lfm_tf.models import ensemble

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
IMAGES_INPUT = "images"
BYTES_INPUT = "image_bytes"
OUTPUTS = ("probabilities", "top_k_ids", "top_k_scores", "class_names")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
METADATA_FILE = os.path.join("assets.extra", "lfm_export.json")
# TF Serving reads at most this many warm-up records per model version.
MAX_WARMUP_RECORDS = 1000

INVALID_RANK_MESSAGE = (
    "images must have rank 4, [batch, height, width, channels]; for one "
    "image send a batch of one, [1, height, width, 3]. Received shape:"
)
INVALID_CHANNELS_MESSAGE = (
    "images must have 3 (RGB) or 1 (grayscale) channels in the last axis; "
    "drop the alpha channel of RGBA images. Received shape:"
)
# Per image, fixed at export (`--max_image_bytes`, `--max_image_pixels`):
# 20 MiB holds any sane photo; 4096 x 4096 decodes to 48 MiB of RGB.
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
TOO_MANY_PIXELS_MESSAGE = "pixels (height x width) per image exceed"
TOO_MANY_BYTES_MESSAGE = "bytes per encoded image exceed"

EXPORT_INFO = "export_info.json"
WEIGHTS = "classifier.weights.h5"
TRAIN_COMMAND = "python -m pipelines.train --workdir=..."
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------- SavedModel


def _serving_preprocessing(preprocessing, input_shape):
    """The training preprocessing, resizing to the classifier's input size.

    Training resizes to `image_size` when it is set and otherwise feeds the
    source size, which is then the input size; either way resizing every
    request to the input side reproduces training (resizing to the same
    size is the identity).
    """
    height, width, channels = (int(d) for d in input_shape)
    if channels != 3 or height != width or height < 1:
        raise ValueError(
            f"Received input_shape={tuple(input_shape)}; expected a square "
            "RGB input (side, side, 3), as the training pipeline produces."
        )
    if preprocessing.image_size not in (None, height):
        raise ValueError(
            f"preprocessing.image_size={preprocessing.image_size} does not "
            f"match input_shape={tuple(input_shape)}; pass the input_shape "
            "the classifier was built with."
        )
    return pipeline.Preprocessing(
        image_size=height, mean=tuple(preprocessing.mean),
        std=tuple(preprocessing.std))


def _check_classifier(classifier, input_shape, num_classes):
    """Calls it once: logits must be [batch, num_classes]."""
    logits = classifier(tf.zeros((1,) + tuple(input_shape), tf.float32),
                        training=False)
    shape = getattr(logits, "shape", None)
    if shape is None or tuple(shape) != (1, num_classes):
        received = tuple(shape) if shape is not None else type(logits)
        raise ValueError(
            f"The classifier returned {received} for one image; expected "
            f"logits of shape (1, {num_classes}) "
            "(one per class name). Export the final classifier only, not a "
            "supernet or a multi-output training model."
        )


def _too_many_pixels_message(max_pixels):
    return (f"{TOO_MANY_PIXELS_MESSAGE} max_image_pixels={max_pixels} (set at "
            "export with --max_image_pixels); resize the images before "
            "sending them.")


def _validated_images(images, max_pixels):
    """uint8 [B, h, w, 3], or InvalidArgumentError with a clear message.

    The result depends on the check through data (a `tf.cond`), not only a
    control dependency, so no graph rewrite can run the resize first.

    Args:
      images: uint8 of any shape (the signature's input).
      max_pixels: the most h * w accepted.
    """
    shape = tf.shape(images)
    rank = tf.size(shape)
    # Padded so that indexing is valid whatever the rank.
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], 0)
    channels = padded[3]
    pixels = tf.cast(padded[1], tf.int64) * tf.cast(padded[2], tf.int64)
    rank_ok = tf.equal(rank, 4)
    channels_ok = tf.logical_or(tf.equal(channels, 3), tf.equal(channels, 1))
    pixels_ok = pixels <= max_pixels
    valid = tf.logical_and(tf.logical_and(rank_ok, channels_ok), pixels_ok)
    message = tf.where(
        rank_ok,
        tf.where(channels_ok,
                 _too_many_pixels_message(max_pixels) + " Received shape:",
                 INVALID_CHANNELS_MESSAGE),
        INVALID_RANK_MESSAGE)

    def reject():
        check = tf.debugging.Assert(valid, [message, shape], summarize=8)
        with tf.control_dependencies([check]):
            return tf.zeros([0, 1, 1, 3], tf.uint8)

    checked = tf.cond(valid, lambda: tf.identity(images), reject)
    # Grayscale -> RGB: tile the one channel three times (x1 for RGB).
    rgb = tf.tile(checked, tf.stack([1, 1, 1, 3 // tf.maximum(channels, 1)]))
    return tf.ensure_shape(rgb, [None, None, None, 3])


# Formats `tf.io.decode_image` reads, told apart by their first bytes as it
# does; index 0 is "not an image" (decode_image then names the formats).
_FORMATS = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP")
_HEADER_BYTES = 32


def _unsigned(header, start, length, big_endian=False):
    """The unsigned integer in header[start:start + length], int64."""
    digits = tf.cast(header[start:start + length], tf.int64)
    if big_endian:
        digits = tf.reverse(digits, [0])
    weights = tf.constant([256 ** i for i in range(length)], tf.int64)
    return tf.reduce_sum(digits * weights)


def _count(encoded, pattern):
    """Non-overlapping occurrences of `pattern` in the string `encoded`."""
    return tf.cast(tf.size(tf.strings.split(encoded, pattern)), tf.int64) - 1


def _starts_with(header, magic, at=0):
    return tf.reduce_all(tf.equal(
        header[at:at + len(magic)],
        tf.constant(list(magic), tf.uint8)))


def encoded_image_size(encoded):
    """Format and decoded size of an encoded image, from its header only.

    Nothing is decoded: JPEG's size comes from `tf.image.extract_jpeg_shape`
    (markers only), the others' from fixed header fields. An animation
    counts every frame `decode_image` would decode, bounded from above
    (GIF: image separators preceded by a block terminator, plus one; WebP:
    `ANMF` chunks), so the bound never under-counts.

    Args:
      encoded: string scalar, an encoded image file.

    Returns:
      (format index into `_FORMATS` int32 scalar, int64 [3] (height,
      width, frames)); (0, zeros) for an unknown format.
    """
    padded = tf.strings.join([encoded, b"\0" * _HEADER_BYTES])
    header = tf.io.decode_raw(
        tf.strings.substr(padded, 0, _HEADER_BYTES), tf.uint8)

    def size(height, width, frames=1):
        return tf.stack([tf.cast(d, tf.int64)
                         for d in (height, width, frames)])

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)
        return size(shape[0], shape[1])

    def png():  # IHDR: width, height as big-endian uint32 at 16 and 20.
        return size(_unsigned(header, 20, 4, True),
                    _unsigned(header, 16, 4, True))

    def gif():  # Logical screen: width, height as uint16 at 6 and 8.
        # Every image separator (0x2c) but the first follows a block
        # terminator (0x00); the first does too unless it comes right
        # after the global colour table (counted then unless the table
        # ends with 0x00).
        flags = tf.cast(header[10], tf.int32)
        table = tf.where(flags >= 128,
                         3 * tf.bitwise.left_shift(
                             2, tf.bitwise.bitwise_and(flags, 7)), 0)
        start = tf.minimum(12 + table, tf.strings.length(padded) - 2)
        around = tf.strings.substr(padded, start, 2)
        uncounted = tf.logical_and(
            tf.equal(tf.strings.substr(around, 1, 1), b"\x2c"),
            tf.not_equal(tf.strings.substr(around, 0, 1), b"\x00"))
        frames = _count(encoded, b"\x00\x2c") + tf.cast(uncounted,
                                                          tf.int64)
        return size(_unsigned(header, 8, 2), _unsigned(header, 6, 2),
                    tf.maximum(frames, 1))

    def bmp():  # int32 width at 18, height at 22 (negative: top-down).
        def signed(start):
            value = _unsigned(header, start, 4)
            return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value))
        return size(signed(22), signed(18))

    def webp():
        def lossy():  # "VP8 ": 14-bit width, height at 26 and 28.
            return size(tf.bitwise.bitwise_and(_unsigned(header, 28, 2),
                                               0x3FFF),
                        tf.bitwise.bitwise_and(_unsigned(header, 26, 2),
                                               0x3FFF))

        def lossless():  # "VP8L": 14-bit width - 1, height - 1 at 21.
            bits = _unsigned(header, 21, 4)
            return size(tf.bitwise.bitwise_and(
                tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1,
                        tf.bitwise.bitwise_and(bits, 0x3FFF) + 1)

        def extended():  # "VP8X": 24-bit canvas width - 1, height - 1.
            animated = tf.bitwise.bitwise_and(header[20], 2) > 0
            frames = tf.where(animated,
                              tf.maximum(_count(encoded, b"ANMF"), 1),
                              tf.constant(1, tf.int64))
            return size(_unsigned(header, 27, 3) + 1,
                        _unsigned(header, 24, 3) + 1, frames)

        kind = tf.where(_starts_with(header, b"VP8 ", 12), 0,
                        tf.where(_starts_with(header, b"VP8L", 12), 1,
                                 tf.where(_starts_with(header, b"VP8X", 12),
                                          2, 3)))
        return tf.switch_case(kind, [lossy, lossless, extended,
                                     lambda: size(0, 0, 0)])

    # The magic numbers decode_image tests.
    index = tf.constant(0)
    for i, test in reversed(list(enumerate([
            _starts_with(header, b"\xff\xd8\xff"),
            _starts_with(header, b"\x89PNG\r\n\x1a\n"),
            _starts_with(header, b"GIF8"),
            _starts_with(header, b"BM"),
            tf.logical_and(_starts_with(header, b"RIFF"),
                           _starts_with(header, b"WEBP", 8))], start=1))):
        index = tf.where(test, i, index)

    def unknown():
        return tf.zeros([3], tf.int64)

    return index, tf.switch_case(index, [unknown, jpeg, png, gif, bmp, webp])


def _checked_decode(encoded, position, max_bytes, max_pixels, decode,
                    shape):
    """`decode(encoded)`, run only within the limits; else the error.

    The decode is a branch of a `tf.cond` on the check, so it never runs
    (nor allocates) for a refused image.

    Args:
      encoded: string scalar, one encoded image.
      position: int32 scalar, its index in the batch (for the message).
      max_bytes, max_pixels: the export's limits.
      decode: callable(encoded) -> uint8 `shape`, the decoded, resized
        image.
      shape: [side, side, 3].
    """
    length = tf.cast(tf.strings.length(encoded), tf.int64)
    index, size = tf.cond(
        length <= max_bytes, lambda: encoded_image_size(encoded),
        lambda: (tf.constant(0), tf.zeros([3], tf.int64)))
    height, width, frames = tf.unstack(size)
    pixels = height * width * frames
    bytes_ok = length <= max_bytes
    valid = tf.logical_and(bytes_ok, pixels <= max_pixels)

    def reject():
        bytes_message = tf.strings.format(
            "image_bytes[{}] has {} bytes: " + TOO_MANY_BYTES_MESSAGE +
            f" max_image_bytes={max_bytes} (set at export with "
            "--max_image_bytes); send a smaller file (re-encode it or "
            "resize the image).", [position, length])
        # tf.strings.format would quote the format's name: joined instead.
        pixels_message = tf.strings.join([
            tf.strings.format("image_bytes[{}] is a ", [position]),
            tf.gather(_FORMATS, index),
            tf.strings.format(
                " of height {} x width {} (x {} frames) = {} pixels: "
                + TOO_MANY_PIXELS_MESSAGE + f" max_image_pixels={max_pixels}"
                " (set at export with --max_image_pixels); resize the image "
                "before sending it.", [height, width, frames, pixels])])
        message = tf.where(bytes_ok, pixels_message, bytes_message)
        check = tf.debugging.Assert(valid, [message])
        with tf.control_dependencies([check]):
            return tf.zeros(shape, tf.uint8)

    return tf.cond(valid, lambda: decode(encoded), reject)


def _check_limit(name, value):
    integer = isinstance(value, (int, np.integer)) and not isinstance(
        value, bool)
    if not integer or value < 1:
        raise ValueError(
            f"Received {name}={value!r}; expected a positive integer (the "
            f"most accepted per image; default {_DEFAULT_LIMITS[name]}).")
    return int(value)


_DEFAULT_LIMITS = {"max_image_bytes": DEFAULT_MAX_IMAGE_BYTES,
                   "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS}


def write_saved_model(classifier, path, *, class_names, preprocessing,
                      input_shape, warmup_images=None, top_k=5,
                      max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
                      max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Exports `classifier` with its preprocessing, atomically.

    The SavedModel is written to a temporary directory next to `path`, then
    renamed to `path` (an existing `path` is replaced as a whole), so a
    reader never sees a half-written model.

    Args:
      classifier: `keras.Model`, normalised float32 [B, H, W, 3] -> logits
        [B, C].
      path: the SavedModel directory to write.
      class_names: C class names (index i names logit i).
      preprocessing: `lfm_tf.data.pipeline.Preprocessing` used in training.
      input_shape: (H, W, 3), the classifier's input.
      warmup_images: optional uint8 [n, h, w, 3] real examples, written as
        TF Serving warm-up requests (`assets.extra/`).
      top_k: classes returned per image (capped at C).
      max_image_bytes: the largest encoded image `serving_bytes` accepts.
      max_image_pixels: the most height x width per image (x frames for
        an animation) either signature accepts.

    Returns:
      `path`.

    Raises:
      ValueError: inconsistent arguments (see the message).
    """
    return _export(classifier, path, class_names=class_names,
                   preprocessing=preprocessing, input_shape=input_shape,
                   warmup_images=warmup_images, top_k=top_k, replace=True,
                   max_image_bytes=max_image_bytes,
                   max_image_pixels=max_image_pixels)


def _export(classifier, path, *, class_names, preprocessing, input_shape,
            warmup_images, top_k, replace, extra_metadata=None,
            max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
            max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """`write_saved_model`; `replace=False` never replaces `path`."""
    max_bytes = _check_limit("max_image_bytes", max_image_bytes)
    max_pixels = _check_limit("max_image_pixels", max_image_pixels)
    class_names = [str(name) for name in class_names]
    num_classes = len(class_names)
    if num_classes < 1:
        raise ValueError("Received no class_names; expected one per class.")
    if int(top_k) < 1:
        raise ValueError(f"Received top_k={top_k}; expected >= 1.")
    k = min(int(top_k), num_classes)
    input_shape = tuple(int(d) for d in input_shape)
    serving_prep = _serving_preprocessing(preprocessing, input_shape)
    if warmup_images is not None:
        warmup_images = _check_warmup_images(warmup_images)
    _check_classifier(classifier, input_shape, num_classes)
    names = tf.constant(class_names)
    side = input_shape[0]

    def classify(images):
        inputs = pipeline.preprocess(images, serving_prep)
        logits = classifier(inputs, training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        scores, ids = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "top_k_ids": ids,
            "top_k_scores": scores,
            "class_names": tf.gather(names, ids),
        }

    def nothing():
        # The classifier's kernels fail on an empty batch: skip them.
        return {
            "probabilities": tf.zeros([0, num_classes], tf.float32),
            "top_k_ids": tf.zeros([0, k], tf.int32),
            "top_k_scores": tf.zeros([0, k], tf.float32),
            "class_names": tf.fill([0, k], ""),
        }

    def predict(images):
        return tf.cond(tf.shape(images)[0] > 0, lambda: classify(images),
                       nothing)

    def serving_default(images):
        return predict(_validated_images(images, max_pixels))

    def decode(encoded):
        image = tf.io.decode_image(encoded, channels=3,
                                   expand_animations=False)
        return pipeline.resize(image, serving_prep)

    def serving_bytes(image_bytes):
        positions = tf.range(tf.size(image_bytes))
        images = tf.map_fn(
            lambda item: _checked_decode(item[0], item[1], max_bytes,
                                         max_pixels, decode,
                                         [side, side, 3]),
            (image_bytes, positions),
            fn_output_signature=tf.TensorSpec([side, side, 3], tf.uint8))
        return predict(images)

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.add_endpoint(
        SERVING_DEFAULT, serving_default,
        input_signature=[tf.TensorSpec(None, tf.uint8, name=IMAGES_INPUT)])
    archive.add_endpoint(
        SERVING_BYTES, serving_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    metadata = {
        "class_names": class_names,
        "input_shape": list(input_shape),
        "preprocessing": preprocessing.to_dict(),
        "top_k": k,
        "signatures": {
            SERVING_DEFAULT: {IMAGES_INPUT: "uint8 [batch, height, width, 3]"},
            SERVING_BYTES: {BYTES_INPUT: "string [batch], JPEG/PNG/GIF/BMP"},
        },
        "outputs": list(OUTPUTS),
        "limits": {"max_image_bytes": max_bytes,
                   "max_image_pixels": max_pixels},
        **(extra_metadata or {}),
    }

    def write(directory):
        archive.write_out(directory, verbose=False)
        _write_json(os.path.join(directory, METADATA_FILE), metadata)
        if warmup_images is not None and len(warmup_images):
            write_warmup_requests(directory, warmup_images)
        # A TF Serving container runs as another user: readable by all.
        fileio.make_readable(directory)

    _write_directory_atomically(path, write, replace=replace)
    return path


# ------------------------------------------------------------------ warm-up


def _check_warmup_images(images):
    images = np.asarray(images)
    if (images.dtype != np.uint8 or images.ndim != 4
            or images.shape[-1] not in (1, 3)):
        raise ValueError(
            f"Received warmup_images {images.dtype} {images.shape}; expected "
            "uint8 [n, height, width, 3] (real examples)."
        )
    if len(images) + 1 > MAX_WARMUP_RECORDS:
        raise ValueError(
            f"Received {len(images)} warmup_images; TF Serving replays at "
            f"most {MAX_WARMUP_RECORDS} records; pass at most "
            f"{MAX_WARMUP_RECORDS - 1} (a handful is enough)."
        )
    return images


def write_warmup_requests(saved_model_dir, images):
    """Writes `assets.extra/tf_serving_warmup_requests` into a SavedModel.

    TF Serving (with `--enable_model_warmup`, the default) replays these
    requests when it loads the version, before serving traffic, so the
    first real request does not pay for initialisation. One
    `PredictionLog` per image for `serving_default` (a batch of one), plus
    one for `serving_bytes` with all images PNG-encoded.

    Args:
      saved_model_dir: an exported SavedModel directory.
      images: uint8 [n, height, width, 3] real examples.
    """
    # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    images = _check_warmup_images(images)

    def record(signature_name, input_name, tensor):
        request = predict_pb2.PredictRequest()
        request.model_spec.signature_name = signature_name
        request.inputs[input_name].CopyFrom(tensor)
        log = prediction_log_pb2.PredictionLog()
        log.predict_log.request.CopyFrom(request)
        return log.SerializeToString()

    target = os.path.join(saved_model_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    encoded = [tf.io.encode_png(image).numpy() for image in images]
    with tf.io.TFRecordWriter(target) as writer:
        for image in images:
            writer.write(record(SERVING_DEFAULT, IMAGES_INPUT,
                                tf.make_tensor_proto(image[None])))
        writer.write(record(SERVING_BYTES, BYTES_INPUT,
                            tf.make_tensor_proto(encoded, dtype=tf.string)))


def read_warmup_images(saved_model_dir):
    """The images of a SavedModel's `serving_default` warm-up requests.

    Returns:
      uint8 [n, h, w, 3], or None when there is no warm-up file.
    """
    # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(saved_model_dir, WARMUP_FILE)
    if not os.path.exists(path):
        return None
    images = []
    for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(
            serialized).predict_log.request
        if request.model_spec.signature_name == SERVING_DEFAULT:
            images.append(tf.make_ndarray(request.inputs[IMAGES_INPUT]))
    return np.concatenate(images) if images else None


# ------------------------------------------------------------ atomic writes


def _write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def _write_directory_atomically(path, write, replace):
    """Runs `write(tmp)` on a fresh directory next to `path`, then renames.

    On any failure the temporary directory is removed and an existing
    `path` is left as it was. The temporary name starts with "." and is
    not numeric, so TF Serving, which watches numeric version directories,
    never loads it.

    Args:
      path: the directory to create.
      write: callable(directory) that fills the directory.
      replace: replace an existing `path`; otherwise FileExistsError.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    fileio.make_readable_dirs(parent)
    fileio.remove_stale_partials(parent, name)  # A killed export's.
    tmp = tempfile.mkdtemp(prefix=fileio.temporary_prefix(name), dir=parent)
    try:
        write(tmp)
        if not os.path.exists(path):
            try:
                os.rename(tmp, path)
                return
            except OSError as error:
                # Someone else created `path` meanwhile: never merge.
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if not replace:
            raise FileExistsError(
                f"{path} already exists (written by another export "
                "meanwhile?); it was left as it is.")
        old = tempfile.mkdtemp(prefix=fileio.temporary_prefix(
            name, "replaced"), dir=parent)
        os.rename(path, os.path.join(old, name))
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(os.path.join(old, name), path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- workdirs


def _required_file(workdir, name):
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {name} is written at the end of training by "
            f"`{TRAIN_COMMAND}`. Point --workdir at a finished training run, "
            "or train first."
        )
    return path


def read_export_info(workdir):
    """`<workdir>/export_info.json`, checked for the fields export needs."""
    path = _required_file(workdir, EXPORT_INFO)
    with open(path) as f:
        info = json.load(f)
    missing = [key for key in ("model_name", "class_names", "input_shape",
                               "preprocessing", "architecture")
               if key not in info]
    if missing:
        raise ValueError(
            f"{path} lacks {missing}; it was not written by this version of "
            f"`{TRAIN_COMMAND}`. Re-run training to rewrite it."
        )
    return info


def _build_architecture(info):
    """An unbuilt-weights classifier of the run's architecture."""
    architecture = info["architecture"]
    num_classes = len(info["class_names"])
    input_shape = tuple(int(d) for d in info["input_shape"])
    kind = architecture.get("kind")
    if kind == "backbone":
        model_config = config_lib.ModelConfig(**architecture["model"])
        model_config.validate()
        return backbones.build_backbone(model_config, num_classes,
                                        input_shape, name="classifier")
    if kind == "ensemble":
        # LFM-DR's W1 and W2 deployed together: the mean of their logits.
        model_config = config_lib.ModelConfig(**architecture["model"])
        model_config.validate()
        members = [
            backbones.build_backbone(model_config, num_classes, input_shape,
                                     name=f"member_{m}")
            for m in range(int(architecture.get("members", 2)))]
        return ensemble.LogitEnsemble(members, name="classifier")
    raise ValueError(
        f"export_info.json has architecture kind {kind!r}; expected "
        "'backbone' (a searched cell is a backbone with `genotype` set) or "
        "'ensemble'."
    )


def load_classifier(workdir):
    """Rebuilds a run's final classifier from its workdir.

    Reads `export_info.json` for the architecture, builds it and loads
    `classifier.weights.h5`. Nothing else of the run (W2, V, r, B,
    optimisers) is restored.

    Returns:
      (classifier, export_info dict).

    Raises:
      FileNotFoundError: a file of the run is missing (the message names
        it and the command that writes it).
      ValueError: export_info.json is incomplete or names an unknown
        architecture.
    """
    info = read_export_info(workdir)
    weights = _required_file(workdir, WEIGHTS)
    classifier = _build_architecture(info)
    classifier.load_weights(weights)
    return classifier, info


def _check_version(version):
    integer = isinstance(version, (int, np.integer)) and not isinstance(
        version, bool)
    if not integer or version < 1:
        raise ValueError(
            f"Received version={version!r}; expected a positive integer (TF "
            "Serving loads numeric version directories, highest = newest). "
            "Leave --version unset to use the next free number."
        )
    return int(version)


def _existing_versions(model_dir):
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir)
                  if d.isdigit() and os.path.isdir(os.path.join(model_dir, d)))


def export_for_serving(workdir, export_dir, *, version=None, overwrite=False,
                       model_name=None, max_image_bytes=None,
                       max_image_pixels=None):
    """Writes a run's classifier as `<export_dir>/<model_name>/<version>/`.

    That is TF Serving's layout: `<export_dir>/<model_name>` is the model's
    base path, each numeric subdirectory one version. The version is
    written to a temporary directory and renamed into place, so the server
    never loads a half-written one. Warm-up requests are carried over from
    the run's own SavedModel (`<workdir>/saved_model`, real examples) when
    it has them.

    Args:
      workdir: a finished `pipelines.train` run.
      export_dir: the directory holding the models' base paths.
      version: positive integer; default: one more than the newest version
        present, or 1.
      overwrite: replace an existing version (never done otherwise).
      model_name: default: export_info.json's `model_name`.
      max_image_bytes: per encoded image; default
        `DEFAULT_MAX_IMAGE_BYTES` (20 MiB).
      max_image_pixels: height x width per image; default
        `DEFAULT_MAX_IMAGE_PIXELS` (4096 x 4096).

    Returns:
      The version directory written.

    Raises:
      FileNotFoundError: the run's files are missing.
      FileExistsError: the version exists and `overwrite` is False.
      ValueError: a bad version or model name.
    """
    limits = {
        "max_image_bytes": _check_limit(
            "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES
            if max_image_bytes is None else max_image_bytes),
        "max_image_pixels": _check_limit(
            "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS
            if max_image_pixels is None else max_image_pixels),
    }
    info = read_export_info(workdir)
    _required_file(workdir, WEIGHTS)
    name = model_name or info["model_name"]
    if not _MODEL_NAME.match(str(name)):
        raise ValueError(
            f"Received model_name={name!r}; expected letters, digits, '.', "
            "'_' or '-' (it becomes a directory and part of request URLs)."
        )
    model_dir = os.path.join(export_dir, name)
    if version is None:
        version = max(_existing_versions(model_dir), default=0) + 1
    version = _check_version(version)
    target = os.path.join(model_dir, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(
            f"{target} already exists; pass --overwrite (overwrite=True) to "
            "replace it, or leave --version unset to write the next version."
        )
    classifier, info = load_classifier(workdir)
    warmup = read_warmup_images(os.path.join(workdir, "saved_model"))
    if warmup is None:
        logging.warning(
            "%s has no warm-up requests; the export has none (TF Serving "
            "will initialise on the first request).",
            os.path.join(workdir, "saved_model"))
    return _export(
        classifier, target,
        class_names=info["class_names"],
        preprocessing=pipeline.Preprocessing.from_dict(info["preprocessing"]),
        input_shape=info["input_shape"],
        warmup_images=warmup,
        top_k=5,
        replace=overwrite,
        extra_metadata={"model_name": name, "version": version,
                        "architecture": info["architecture"],
                        "workdir": os.path.abspath(workdir)},
        **limits,
    )
