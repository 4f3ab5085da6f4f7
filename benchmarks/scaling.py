"""Scaling efficiency: training steps/s at 1..N replicas, for each method.

    python -m benchmarks.scaling --max_replicas=8 --per_replica_batch=64
    python -m benchmarks.scaling --cpu_devices=2 --backbone=small_cnn \
        --image_size=8 --per_replica_batch=16 --steps=10     # CPU only

Weak scaling: every replica keeps `per_replica_batch` examples (training and
meta), so k replicas train on a global batch k times larger. Each row runs in
its own subprocess under `MirroredStrategy` over the first k GPUs (or, with
no GPU, over `--cpu_devices` logical CPUs; these share the host's cores, so
CPU numbers test the code path, not the speed-up). Reported per method and k:
global steps/s, examples/s and the efficiency

    efficiency(k) = examples/s at k replicas / (k * examples/s at 1 replica)

with the all-reduces of the replica-consistent hypergradient (inner
gradients, meta batch, BatchNorm statistics) included. Runs unchanged on a
machine with N GPUs. Results are printed as a table and, with `--output`,
written as JSON.
"""

import json
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

from benchmarks import harness

flags.DEFINE_list("methods", "erm,mwnet,lfm", "Methods to measure.")
flags.DEFINE_integer("max_replicas", None,
                     "Largest replica count (default: every GPU, or "
                     "--cpu_devices without a GPU).")
flags.DEFINE_integer("cpu_devices", 2,
                     "Logical CPU devices to create when there is no GPU.")
flags.DEFINE_string("backbone", "resnet32", "Classifier backbone.")
flags.DEFINE_integer("width", 16, "small_cnn width / WRN widen factor.")
flags.DEFINE_integer("image_size", 32, "Side of the synthetic images.")
flags.DEFINE_integer("per_replica_batch", 64,
                     "Training and meta examples per replica.")
flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after the first.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.DEFINE_string("run_one", None,
                    "Internal: 'method:replicas'; prints one JSON row.")
FLAGS = flags.FLAGS


def _devices(tf, replicas):
    """The first `replicas` GPUs, or logical CPUs when there is no GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return [d.name for d in gpus[:replicas]]
    return [d.name for d in tf.config.list_logical_devices("CPU")[:replicas]]


def _run_one(method, replicas):
    """Times one (method, replicas) row in this process; returns a dict."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] *
            FLAGS.cpu_devices)
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from lfm_tf import config as config_lib  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import factory  # pylint: disable=g-import-not-at-top

    devices = _devices(tf, replicas)
    if len(devices) < replicas:
        raise ValueError(
            f"Received replicas={replicas} but only {len(devices)} devices "
            "exist; expected at most that many. Lower --max_replicas or "
            "raise --cpu_devices.")
    strategy = tf.distribute.MirroredStrategy(devices)
    size = FLAGS.image_size
    batch = FLAGS.per_replica_batch * replicas
    config = config_lib.ExperimentConfig().replace(
        method=method, backbone=FLAGS.backbone, width=FLAGS.width,
        batch_size=batch, meta_batch_size=batch).validate()
    num_train, num_meta = 50 * batch, 10 * batch
    facts = factory.DataFacts(
        num_classes=10, input_shape=(size, size, 3), num_train=num_train,
        num_meta=num_meta, class_counts=np.full(10, num_train // 10),
        steps_per_epoch=100)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = factory.compile_method(
            factory.build_method(config, facts), config)
    element = harness.synthetic_element(size, batch, num_train, num_meta)
    seconds = harness.timed_fit(model, element, FLAGS.warmup_steps,
                                FLAGS.steps)["step_s"]
    return {
        "method": method, "replicas": replicas, "global_batch": batch,
        "devices": devices, "seconds_per_step": seconds,
        "steps_per_second": 1.0 / seconds,
        "examples_per_second": batch / seconds,
    }


def _replica_counts():
    if FLAGS.max_replicas:
        top = FLAGS.max_replicas
    else:
        probe = subprocess.run(
            [sys.executable, "-c",
             "import tensorflow as tf; "
             "print(len(tf.config.list_physical_devices('GPU')))"],
            capture_output=True, text=True, check=True)
        top = int(probe.stdout.strip().splitlines()[-1]) or FLAGS.cpu_devices
    counts, k = [], 1
    while k < top:
        counts.append(k)
        k *= 2
    return counts + [top]


def main(argv):
    del argv
    if FLAGS.run_one:
        method, replicas = FLAGS.run_one.split(":")
        sys.stdout.write(json.dumps(_run_one(method, int(replicas))) + "\n")
        return
    passthrough = [a for a in sys.argv[1:]
                   if not a.startswith(("--output", "--methods"))]
    rows = []
    for method in FLAGS.methods:
        base = None
        for replicas in _replica_counts():
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling",
                 f"--run_one={method}:{replicas}", *passthrough],
                capture_output=True, text=True, check=False)
            if result.returncode != 0:
                logging.error("%s at %d replicas failed:\n%s", method,
                              replicas, result.stderr[-3000:])
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            if replicas == 1:
                base = row["examples_per_second"]
            row["efficiency"] = (row["examples_per_second"] / (replicas * base)
                                 if base else None)
            rows.append(row)
            logging.info("%s", row)
    header = (f"{'method':<8} {'replicas':>8} {'global batch':>12} "
              f"{'steps/s':>8} {'examples/s':>11} {'efficiency':>10}")
    lines = [header]
    for row in rows:
        efficiency = ("-" if row["efficiency"] is None
                      else f"{row['efficiency']:.2f}")
        lines.append(
            f"{row['method']:<8} {row['replicas']:>8} "
            f"{row['global_batch']:>12} {row['steps_per_second']:>8.2f} "
            f"{row['examples_per_second']:>11.1f} {efficiency:>10}")
    sys.stdout.write("\n".join(lines) + "\n")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
