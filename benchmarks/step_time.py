"""Seconds per training step and peak memory of every method, as ratios to ERM.

    python -m benchmarks.step_time --backbone=resnet32 --batch_size=100 \
        --steps=20

Each configuration runs in its own subprocess (so peak memory is its own) on
the same backbone, image size and batch of synthetic data, through the real
`model.fit` path. Reported per configuration: time to the first step
(tracing), mean seconds per step after warm-up, and peak memory: on a GPU
the allocator's peak, on the CPU the process's peak RSS above its RSS just
before training (model and data built). Runs unchanged on a GPU machine.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_string("backbone", "resnet32", "Classifier backbone.")
flags.DEFINE_integer("width", 16, "small_cnn width / WRN widen factor.")
flags.DEFINE_integer("image_size", 32, "Side of the synthetic images.")
flags.DEFINE_integer("batch_size", 100, "Training (and meta) batch size.")
flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after the first.")
flags.DEFINE_string("encoder", "small_cnn", "V for the non-PS LFM rows.")
flags.DEFINE_list(
    "configs",
    "erm,l2rw,mwnet,lfm_exact,lfm_finite_difference,lfm_first_order,"
    "lfm_exact_ps,lfm_finite_difference_ps,lfm_first_order_ps",
    "Which rows to run.",
)
flags.DEFINE_string("run_one", None, "Internal: run one row and print JSON.")
FLAGS = flags.FLAGS

_ROWS = {
    "erm": dict(method="erm"),
    "focal": dict(method="focal"),
    "l2rw": dict(method="l2rw"),
    "mwnet": dict(method="mwnet"),
    "dbl": dict(method="dbl"),
    "penalty": dict(method="penalty"),
    "penalty_t5": dict(method="penalty", penalty_inner_steps=5),
    # LRW's second phase (its per-step cost); the first phase is ERM.
    "lrw_hard": dict(method="lrw_hard"),
    # Every step a meta-net and splitter step (K = 1): the worst case.
    "molere": dict(method="molere", molere_meta_every=1),
    "lfm_exact": dict(method="lfm", hypergradient="exact"),
    "lfm_finite_difference": dict(method="lfm",
                                  hypergradient="finite_difference"),
    "lfm_first_order": dict(method="lfm", hypergradient="first_order"),
    "lfm_exact_ps": dict(method="lfm", hypergradient="exact",
                         encoder="shared"),
    "lfm_finite_difference_ps": dict(method="lfm",
                                     hypergradient="finite_difference",
                                     encoder="shared"),
    "lfm_first_order_ps": dict(method="lfm", hypergradient="first_order",
                               encoder="shared"),
}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_one(name):
    import keras  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from lfm_tf import config as config_lib  # pylint: disable=g-import-not-at-top
    from lfm_tf.methods import factory  # pylint: disable=g-import-not-at-top

    gpus = tf.config.list_physical_devices("GPU")
    size, batch = FLAGS.image_size, FLAGS.batch_size
    overrides = dict(backbone=FLAGS.backbone, width=FLAGS.width,
                     batch_size=batch, meta_batch_size=batch,
                     encoder=FLAGS.encoder)
    overrides.update(_ROWS[name])
    config = config_lib.ExperimentConfig().replace(**overrides).validate()
    num_train, num_meta = 50 * batch, 10 * batch
    facts = factory.DataFacts(
        num_classes=10, input_shape=(size, size, 3), num_train=num_train,
        num_meta=num_meta, class_counts=np.full(10, num_train // 10),
        steps_per_epoch=100,
    )
    keras.utils.set_random_seed(0)
    model = factory.compile_method(factory.build_method(config, facts), config)
    rng = np.random.default_rng(0)

    def part(n, index_range):
        return {
            "image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32),
            "index": rng.integers(0, index_range, n).astype(np.int32),
        }

    train = part(batch, num_train)
    train["clean_label"] = train["label"]
    element = {"train": train, "meta": part(batch, num_meta)}
    total = 1 + FLAGS.warmup_steps + FLAGS.steps
    dataset = tf.data.Dataset.from_tensors(element).repeat(total)

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
        peak = _peak_rss_bytes() - rss_before
    return {
        "name": name,
        "device": "GPU" if gpus else "CPU",
        "first_step_s": times[0][1] - times[0][0],
        "step_s": float(np.mean(steady)),
        "step_s_std": float(np.std(steady)),
        "peak_memory_mb": peak / 2 ** 20,
    }


def main(argv):
    del argv
    if FLAGS.run_one:
        print("RESULT " + json.dumps(_run_one(FLAGS.run_one)))
        return
    results = []
    for name in FLAGS.configs:
        if name not in _ROWS:
            raise app.UsageError(f"Unknown row {name!r}; expected {list(_ROWS)}")
        args = [sys.executable, "-m", "benchmarks.step_time",
                f"--run_one={name}"] + [
                    f"--{f}={FLAGS[f].value}" for f in
                    ("backbone", "width", "image_size", "batch_size", "steps",
                     "warmup_steps", "encoder")]
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    erm = next((r for r in results if r["name"] == "erm"), results[0])
    print(f"backbone={FLAGS.backbone} image={FLAGS.image_size} "
          f"batch={FLAGS.batch_size} device={erm['device']} "
          f"(ratios to {erm['name']})")
    print(f"{'method':28s} {'first step s':>12s} {'step ms':>9s} "
          f"{'x ERM':>6s} {'peak MB':>9s} {'x ERM':>6s}")
    for r in results:
        print(f"{r['name']:28s} {r['first_step_s']:12.1f} "
              f"{1000 * r['step_s']:9.1f} {r['step_s'] / erm['step_s']:6.2f} "
              f"{r['peak_memory_mb']:9.0f} "
              f"{r['peak_memory_mb'] / max(erm['peak_memory_mb'], 1e-9):6.2f}")
    print("command: python -m benchmarks.step_time " + " ".join(
        f"--{f}={FLAGS[f].value}" for f in
        ("backbone", "width", "image_size", "batch_size", "steps")))


if __name__ == "__main__":
    app.run(main)
