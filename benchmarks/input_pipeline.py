"""Images per second of the training input pipeline, after the first epoch.

    python -m benchmarks.input_pipeline \
        --data_path=../shared/data/cifar10-jpeg.tar.gz

Long-tailed (IF 100) CIFAR-10 with 40% flip noise, batch 100, the zipped
train + meta element exactly as `lfm_tf.train_lib` builds it. The first
epoch is timed on its own (building the dataset, moving the pixels into the
graph, warming the autotuner); epochs 2..k are what training sees. Loading
the source (extraction and decoding on a cold cache, the `.npz` on a warm
one) is timed separately. Compare the figure with the images/s an LFM step
consumes (`benchmarks.step_time`): the pipeline must never be the bottleneck.
"""

import os
import sys
import time

from absl import app
from absl import flags

from lfm_tf import config as config_lib
from lfm_tf.data import pipeline
from lfm_tf.data import sources
from lfm_tf.data import splits as splits_lib

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string(
    "data_path", "../shared/data/cifar10-jpeg.tar.gz",
    "Folder or .tar.gz of class folders; a relative path is relative to the "
    "repository root.")
flags.DEFINE_string("cache_dir", None, "Extraction cache (~/.cache/lfm_tf).")
flags.DEFINE_float("imbalance_factor", 100.0, "Long-tail imbalance factor.")
flags.DEFINE_enum("noise_type", "flip", list(config_lib.NOISE_TYPES),
                  "Label noise type.")
flags.DEFINE_float("noise_rate", 0.4, "Label noise rate.")
flags.DEFINE_integer("batch_size", 100, "Training batch size.")
flags.DEFINE_integer("meta_batch_size", 100, "Meta batch size.")
flags.DEFINE_integer("cutout", 16, "Cutout side (0: off).")
flags.DEFINE_integer("epochs", 5, "Epochs in all; epochs 2..k are timed.")
FLAGS = flags.FLAGS


def _resolve(path):
    return path if os.path.isabs(path) else os.path.normpath(
        os.path.join(_REPO_ROOT, path))


def _one_epoch(dataset):
    """(training images, meta images, seconds) of one pass."""
    train = meta = 0
    begin = time.perf_counter()
    for element in dataset:
        train += int(element["train"]["image"].shape[0])
        meta += int(element["meta"]["image"].shape[0])
    return train, meta, time.perf_counter() - begin


def main(argv):
    del argv
    if FLAGS.epochs < 2:
        raise app.UsageError("--epochs must be >= 2 (the first is untimed).")
    config = config_lib.DataConfig(
        source="folder", data_path=_resolve(FLAGS.data_path),
        cache_dir=FLAGS.cache_dir, imbalance_factor=FLAGS.imbalance_factor,
        noise_type=FLAGS.noise_type, noise_rate=FLAGS.noise_rate,
        batch_size=FLAGS.batch_size, meta_batch_size=FLAGS.meta_batch_size,
        cutout=FLAGS.cutout,
    ).validate()

    start = time.perf_counter()
    source = sources.load_source(config)
    load_s = time.perf_counter() - start
    splits = splits_lib.make_splits(
        source.train_labels, source.num_classes, config,
        num_test=None if source.test_labels is None
        else len(source.test_labels),
        similar=splits_lib.similar_classes(
            source.train_images, source.train_labels, source.num_classes))
    mean, std = pipeline.normalization_stats(
        source.train_images[splits.train_index])
    preprocessing = pipeline.Preprocessing(None, tuple(mean), tuple(std))

    start = time.perf_counter()
    dataset = pipeline.make_train_dataset(source, splits, config,
                                          preprocessing)
    _one_epoch(dataset)
    build_and_first_s = time.perf_counter() - start
    train = meta = 0
    seconds = 0.0
    for _ in range(FLAGS.epochs - 1):
        epoch_train, epoch_meta, elapsed = _one_epoch(dataset)
        train, meta, seconds = (train + epoch_train, meta + epoch_meta,
                                seconds + elapsed)

    print(f"data: {len(splits.train_index)} train examples "
          f"(noise {splits.is_corrupted.mean():.3f}), "
          f"{len(splits.meta_index)} meta, "
          f"{pipeline.steps_per_epoch(splits, config)} steps/epoch")
    print(f"source load: {load_s:.1f} s; dataset build + first epoch: "
          f"{build_and_first_s:.2f} s")
    print(f"input pipeline, epochs 2..{FLAGS.epochs}: "
          f"{train / seconds:,.0f} training images/s "
          f"({(train + meta) / seconds:,.0f} images/s with the meta batches;"
          f" {seconds / (FLAGS.epochs - 1):.2f} s/epoch)")
    print("command: " + " ".join([os.path.basename(sys.executable),
                                  "-m", "benchmarks.input_pipeline"]
                                 + sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
