"""Kill -9 mid-run, rerun the same command: the run ends bit-identical.

Real `python -m pipelines.train` subprocesses on the digits smoke config with
`--deterministic`: one uninterrupted run, and one that is SIGKILLed once a
mid-run checkpoint exists and then restarted with the same command. Every
variable of the final whole-state checkpoint (W1, W2, V, B, r, every
optimizer slot, step counter), the exported classifier and the validation
curve must be equal bit for bit.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
EPOCHS, STEPS = 2, 7


def _command(method, workdir):
    return [
        sys.executable, "-m", "pipelines.train",
        f"--flagfile=configs/smoke/train_{method}.flags", "--deterministic",
        f"--epochs={EPOCHS}", f"--steps_per_epoch={STEPS}",
        "--checkpoint_every_steps=3", "--checkpoints_to_keep=2",
        f"--workdir={workdir}",
    ]


def _run(method, workdir):
    result = subprocess.run(_command(method, workdir), cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _latest_state(workdir):
    states = sorted(
        glob.glob(os.path.join(workdir, "backup", "ckpt-*", "state.json")),
        key=lambda p: int(p.split("ckpt-")[1].split(os.sep)[0]))
    if not states:
        return None
    with open(states[-1]) as f:
        return json.load(f)


def _run_and_kill(method, workdir):
    """Starts the run; SIGKILLs it once a mid-run checkpoint exists."""
    process = subprocess.Popen(
        _command(method, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and process.poll() is None:
            state = _latest_state(workdir)
            if state is not None and state["global_step"] >= 3:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        process.wait()
    return process.returncode, _latest_state(workdir)


def _final_checkpoint(workdir):
    path = max(glob.glob(os.path.join(workdir, "backup", "ckpt-*")),
               key=lambda p: int(p.rsplit("-", 1)[1]))
    reader = tf.train.load_checkpoint(os.path.join(path, "state.ckpt"))
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")}


def _h5_arrays(path):
    arrays = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, o: arrays.__setitem__(name, np.array(o))
                     if isinstance(o, h5py.Dataset) else None)
    return arrays


class ResumeTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("lfm", "erm")
    def test_killed_run_resumes_to_identical_weights(self, method):
        straight = os.path.join(self.get_temp_dir(), f"{method}_straight")
        resumed = os.path.join(self.get_temp_dir(), f"{method}_resumed")
        _run(method, straight)

        returncode, state = _run_and_kill(method, resumed)
        self.assertEqual(returncode, -signal.SIGKILL, "not killed mid-run")
        self.assertLess(state["global_step"], EPOCHS * STEPS)
        self.assertFalse(os.path.exists(os.path.join(resumed,
                                                     "metrics.json")))
        result = _run(method, resumed)
        self.assertIn("Resumed from", result.stderr)

        expected, actual = _final_checkpoint(straight), _final_checkpoint(
            resumed)
        self.assertEqual(sorted(expected), sorted(actual))
        if method == "lfm":
            names = " ".join(expected)
            for part in ("example_weight_table", "weighting_table",
                         "example_weight_optimizer", "encoder_optimizer",
                         "weighting_optimizer", "step_counter"):
                self.assertIn(part, names)
        for name in expected:
            self.assertAllEqual(expected[name], actual[name], msg=name)
        first = _h5_arrays(os.path.join(straight, "classifier.weights.h5"))
        second = _h5_arrays(os.path.join(resumed, "classifier.weights.h5"))
        self.assertNotEmpty(first)
        for name in first:
            self.assertAllEqual(first[name], second[name], msg=name)
        with open(os.path.join(straight, "metrics.json")) as f:
            straight_metrics = json.load(f)
        with open(os.path.join(resumed, "metrics.json")) as f:
            resumed_metrics = json.load(f)
        self.assertLen(resumed_metrics["val_accuracy_per_epoch"], EPOCHS)
        # The killed process's epochs still count in the run's time.
        self.assertLen(resumed_metrics["epoch_seconds"], EPOCHS)
        self.assertGreater(min(resumed_metrics["epoch_seconds"]), 0)
        self.assertEqual(straight_metrics["val_accuracy_per_epoch"],
                         resumed_metrics["val_accuracy_per_epoch"])
        self.assertEqual(straight_metrics["test_accuracy"],
                         resumed_metrics["test_accuracy"])


if __name__ == "__main__":
    tf.test.main()
