"""Latency (p50/p99) and throughput of the exported signatures vs Keras.

    python -m benchmarks.serving_latency --backbone=small_cnn --image_size=32

Builds a classifier (weights do not change the cost), exports it with
`lfm_tf.export.write_saved_model`, loads the SavedModel back in this process
and times, at each batch size, in one run:

* `keras eager`: `classifier(floats, training=False)`, the model alone on
  already preprocessed floats (what calling the Keras model directly costs);
* `keras tf.function`: preprocessing + model + softmax + top-k compiled
  with `tf.function`, the same work as the signature, without SavedModel;
* `serving_default`: the loaded signature on uint8 pixels (validation,
  resize, normalisation, model, top-k, class names);
* `serving_bytes`: the loaded signature on PNG-encoded images (adds
  decoding).

Every timed call ends with `.numpy()` so the work is finished. This is the
in-process cost of the graph that TF Serving runs, not a server benchmark
(no network, JSON or batching scheduler).
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from lfm_tf import config as config_lib
from lfm_tf import export
from lfm_tf.data import pipeline
from lfm_tf.models import backbones

_BACKBONE = flags.DEFINE_string("backbone", "small_cnn", "Backbone.")
_WIDTH = flags.DEFINE_integer("width", None, "ModelConfig.width override.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Image side.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed calls per row.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed calls first.")


def _latencies(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times


def main(argv):
    del argv
    side = _IMAGE_SIZE.value
    model_config = config_lib.ModelConfig(backbone=_BACKBONE.value)
    if _WIDTH.value:
        model_config = config_lib.ModelConfig(backbone=_BACKBONE.value,
                                              width=_WIDTH.value)
    classifier = backbones.build_backbone(
        model_config.validate(), _NUM_CLASSES.value, (side, side, 3))
    prep = pipeline.Preprocessing(None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    names = [f"class_{i}" for i in range(_NUM_CLASSES.value)]
    path = os.path.join(tempfile.mkdtemp(), "model")
    export.write_saved_model(classifier, path, class_names=names,
                             preprocessing=prep, input_shape=(side, side, 3))
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    serve_bytes = loaded.signatures["serving_bytes"]

    @tf.function
    def keras_graph(images):
        logits = classifier(pipeline.preprocess(images, prep),
                            training=False)
        probabilities = tf.nn.softmax(logits)
        return probabilities, tf.math.top_k(probabilities, k=5)

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    print(f"backbone={_BACKBONE.value} width={model_config.width} "
          f"image={side}x{side} classes={_NUM_CLASSES.value} "
          f"params={classifier.count_params()} device={device} "
          f"cpus={os.cpu_count()} tf={tf.__version__} "
          f"repeats={_REPEATS.value}")
    print(f"{'path':20s} {'batch':>5s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'images/s':>9s}")
    for batch in (int(b) for b in _BATCH_SIZES.value):
        images = np.random.default_rng(0).integers(
            0, 256, (batch, side, side, 3), dtype=np.uint8)
        floats = pipeline.preprocess(images, prep)
        pixels = tf.constant(images)
        png = tf.constant([tf.io.encode_png(i).numpy() for i in images])
        rows = {
            "keras eager": lambda: classifier(floats, training=False)
            .numpy(),
            "keras tf.function": lambda: keras_graph(pixels)[0].numpy(),
            "serving_default": lambda: serve(images=pixels)
            ["probabilities"].numpy(),
            "serving_bytes": lambda: serve_bytes(image_bytes=png)
            ["probabilities"].numpy(),
        }
        for name, fn in rows.items():
            times = _latencies(fn, _REPEATS.value, _WARMUP.value)
            print(f"{name:20s} {batch:5d} {1e3 * np.median(times):8.2f} "
                  f"{1e3 * np.percentile(times, 99):8.2f} "
                  f"{batch / np.mean(times):9.0f}")


if __name__ == "__main__":
    app.run(main)
