"""Seconds per search step and peak memory: DARTS vs LFM-DARTS (with, without PS).

    python -m benchmarks.search_step --channels=8 --cells=5 --image_size=16 \
        --batch_size=16 --steps=5

On a GPU, the paper's supernet: --channels=16 --cells=8 --image_size=32
--batch_size=64. Each row runs in its own subprocess (its own peak memory)
on the same supernet and synthetic batch through `model.fit`. Reported:
time to the first step (tracing included), seconds per step after warm-up,
peak memory (GPU allocator peak, or CPU peak RSS above the RSS before
training), and ratios to second-order DARTS. Paper Table X: LFM-DARTS costs
~2.1x DARTS' memory without PS and ~1.1x with it.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_integer("channels", 8, "Supernet channels C.")
flags.DEFINE_integer("cells", 5, "Supernet cells.")
flags.DEFINE_integer("nodes", 4, "Intermediate nodes per cell.")
flags.DEFINE_string("primitives",
                    "none,max_pool_3x3,avg_pool_3x3,skip_connect,"
                    "sep_conv_3x3,sep_conv_5x5,dil_conv_3x3,dil_conv_5x5",
                    "Candidate ops.")
flags.DEFINE_integer("image_size", 16, "Side of the synthetic images.")
flags.DEFINE_integer("batch_size", 16, "Training and validation batch.")
flags.DEFINE_integer("steps", 5, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup_steps", 1, "Untimed steps after the first.")
flags.DEFINE_list("configs", "darts_first,darts_second,lfm_darts,lfm_darts_ps",
                  "Which rows to run.")
flags.DEFINE_string("run_one", None, "Internal: run one row, print JSON.")
FLAGS = flags.FLAGS

_ROWS = {
    "darts_first": dict(method="darts", arch_order="first"),
    "darts_second": dict(method="darts", arch_order="second"),
    "lfm_darts": dict(method="lfm_darts", encoder="small_cnn"),
    "lfm_darts_ps": dict(method="lfm_darts", encoder="shared"),
}
_SHARED = ("channels", "cells", "nodes", "primitives", "image_size",
           "batch_size", "steps", "warmup_steps")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_one(name):
    # pylint: disable=g-import-not-at-top
    import keras
    import numpy as np
    import tensorflow as tf

    from lfm_tf import config as config_lib
    from lfm_tf.methods import factory
    from lfm_tf.methods import search_factory
    # pylint: enable=g-import-not-at-top

    gpus = tf.config.list_physical_devices("GPU")
    size, batch = FLAGS.image_size, FLAGS.batch_size
    config = config_lib.ExperimentConfig().replace(
        search_channels=FLAGS.channels, search_cells=FLAGS.cells,
        search_steps=FLAGS.nodes, search_primitives=FLAGS.primitives,
        batch_size=batch, meta_batch_size=batch, weighting_mode="positional",
        **_ROWS[name]).validate()
    facts = factory.DataFacts(num_classes=10, input_shape=(size, size, 3),
                              num_train=50 * batch, num_meta=50 * batch,
                              steps_per_epoch=100)
    keras.utils.set_random_seed(0)
    model = search_factory.build_search_method(config, facts)
    rng = np.random.default_rng(0)

    def part(n):
        return {"image": rng.normal(size=(n, size, size, 3)).astype("float32"),
                "label": rng.integers(0, 10, n).astype("int32"),
                "index": rng.integers(0, n, n).astype("int32")}

    train = part(batch)
    train["clean_label"] = train["label"]
    total = 1 + FLAGS.warmup_steps + FLAGS.steps
    dataset = tf.data.Dataset.from_tensors(
        {"train": train, "meta": part(batch)}).repeat(total)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch_index, logs=None):
            times.append([time.perf_counter()])

        def on_train_batch_end(self, batch_index, logs=None):
            float(logs["loss"])  # Waits for the step to finish.
            times[-1].append(time.perf_counter())

    if gpus:
        tf.config.experimental.reset_memory_stats("GPU:0")
    rss_before = _rss_bytes()
    model.fit(dataset, epochs=1, steps_per_epoch=total, verbose=0,
              callbacks=[Timer()])
    steady = [end - start for start, end in times[1 + FLAGS.warmup_steps:]]
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                - rss_before)
    return {"name": name, "device": "GPU" if gpus else "CPU",
            "first_step_s": times[0][1] - times[0][0],
            "step_s": float(np.mean(steady)),
            "peak_memory_mb": peak / 2 ** 20}


def main(argv):
    del argv
    if FLAGS.run_one:
        print("RESULT " + json.dumps(_run_one(FLAGS.run_one)))
        return
    results = []
    for name in FLAGS.configs:
        if name not in _ROWS:
            raise app.UsageError(f"Unknown row {name!r}; expected "
                                 f"{list(_ROWS)}")
        args = [sys.executable, "-m", "benchmarks.search_step",
                f"--run_one={name}"] + [f"--{f}={FLAGS[f].value}"
                                         for f in _SHARED]
        out = subprocess.run(args, capture_output=True, text=True,
                             check=False)
        lines = [l for l in out.stdout.splitlines()
                 if l.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["name"] == "darts_second"),
                results[0])
    print(f"C={FLAGS.channels} cells={FLAGS.cells} nodes={FLAGS.nodes} "
          f"image={FLAGS.image_size} batch={FLAGS.batch_size} "
          f"device={base['device']} (ratios to {base['name']})")
    print(f"{'method':14s} {'first step s':>12s} {'step s':>8s} {'x':>6s} "
          f"{'peak MB':>9s} {'x':>6s}")
    for r in results:
        print(f"{r['name']:14s} {r['first_step_s']:12.1f} {r['step_s']:8.2f} "
              f"{r['step_s'] / base['step_s']:6.2f} "
              f"{r['peak_memory_mb']:9.0f} "
              f"{r['peak_memory_mb'] / max(base['peak_memory_mb'], 1e-9):6.2f}")
    print("command: python -m benchmarks.search_step " + " ".join(
        f"--{f}={FLAGS[f].value}" for f in _SHARED[:-1]))


if __name__ == "__main__":
    app.run(main)
