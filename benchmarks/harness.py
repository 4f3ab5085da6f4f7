"""What the step benchmarks share: a synthetic batch, a timed `fit`, rows.

Every row of a step benchmark runs in its own subprocess so that its peak
memory is its own and no earlier row's graphs or allocator state leak into
it: the parent calls `run_rows`, which starts `python -m <module>
--run_one=<row> <flags>` per row; the child measures with `timed_fit` and
prints its dict with `emit`.
"""

import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Sequence

from absl import app

_RESULT = "RESULT "


def synthetic_element(image_size: int, batch_size: int, num_train: int,
                      num_meta: int, seed: int = 0) -> Dict:
    """One `{"train": ..., "meta": ...}` element of random data.

    Args:
      image_size: side of the square RGB images.
      batch_size: examples in each of the training and meta batches.
      num_train: number of training examples the ids index (B's rows).
      num_meta: number of meta examples the ids index (r's rows).
      seed: numpy seed.

    Returns:
      `train`: image [batch, size, size, 3] float32, label, clean_label and
      index [batch] int32; `meta`: image, label, index.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)

    def part(index_range):
        shape = (batch_size, image_size, image_size, 3)
        return {
            "image": rng.normal(size=shape).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
            # Distinct ids, as a shuffled epoch gives.
            "index": rng.permutation(index_range)[:batch_size].astype(
                np.int32),
        }

    train = part(num_train)
    train["clean_label"] = train["label"]
    return {"train": train, "meta": part(num_meta)}


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed_fit(model, element: Dict, warmup_steps: int, steps: int) -> Dict:
    """Trains `model` on `element` repeated, through the real `model.fit`.

    Args:
      model: a compiled method model.
      element: the batch every step sees (see `synthetic_element`).
      warmup_steps: untimed steps after the first (tracing) step.
      steps: timed steps.

    Returns:
      `device` (`GPU` or `CPU`), `first_step_s` (tracing included),
      `step_s` and `step_s_std` (per timed step), and `peak_memory_mb`: the
      GPU allocator's peak, or on the CPU the process's peak RSS above its
      RSS just before training (model and data already built).
    """
    # pylint: disable=g-import-not-at-top
    import keras
    import numpy as np
    import tensorflow as tf
    # pylint: enable=g-import-not-at-top

    gpus = tf.config.list_physical_devices("GPU")
    total = 1 + warmup_steps + steps
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
    steady = [end - start for start, end in times[1 + warmup_steps:]]
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                - rss_before)
    return {
        "device": "GPU" if gpus else "CPU",
        "first_step_s": times[0][1] - times[0][0],
        "step_s": float(np.mean(steady)),
        "step_s_std": float(np.std(steady)),
        "peak_memory_mb": peak / 2 ** 20,
    }


def emit(result: Dict):
    """Prints a child's result where `run_rows` finds it."""
    sys.stdout.write(_RESULT + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_rows(module: str, rows: Sequence[str], known: Sequence[str],
             flags: Sequence[str]) -> List[Dict]:
    """Runs `python -m module --run_one=<row> *flags` for each row.

    Args:
      module: the benchmark's module, e.g. `benchmarks.step_time`.
      rows: the row names, passed as `--run_one`.
      known: every row the module defines; checked before any child starts.
      flags: the other flags every child gets.

    Returns:
      the children's `emit`ted dicts, in row order.

    Raises:
      app.UsageError: a row is not in `known`.
      RuntimeError: a child printed no result; names the row and shows the
        end of its stderr.
    """
    unknown = [row for row in rows if row not in known]
    if unknown:
        raise app.UsageError(
            f"Unknown --configs rows {unknown}; expected some of "
            f"{list(known)}.")
    results = []
    for row in rows:
        child = subprocess.run(
            [sys.executable, "-m", module, f"--run_one={row}", *flags],
            capture_output=True, text=True, check=False)
        lines = [line for line in child.stdout.splitlines()
                 if line.startswith(_RESULT)]
        if not lines:
            raise RuntimeError(
                f"Row {row!r} of {module} printed no result (exit "
                f"{child.returncode}):\n{child.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len(_RESULT):]))
        sys.stderr.write(f"done: {results[-1]}\n")
        sys.stderr.flush()
    return results


def ratio_table(results: Sequence[Dict], base: Dict, width: int) -> str:
    """Rows of first-step time, step time and peak memory, with ratios.

    Args:
      results: dicts with `name`, `first_step_s`, `step_s`,
        `peak_memory_mb`.
      base: the row the ratios divide by.
      width: width of the name column.
    """
    lines = [f"{'method':{width}s} {'first step s':>12s} {'step ms':>9s} "
             f"{'x':>6s} {'peak MB':>9s} {'x':>6s}"]
    for r in results:
        lines.append(
            f"{r['name']:{width}s} {r['first_step_s']:12.1f} "
            f"{1000 * r['step_s']:9.1f} {r['step_s'] / base['step_s']:6.2f} "
            f"{r['peak_memory_mb']:9.0f} "
            f"{r['peak_memory_mb'] / max(base['peak_memory_mb'], 1e-9):6.2f}")
    return "\n".join(lines)
