"""Example-weight diagnostics and atomic writes."""

import os
import socket
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import callbacks
from lfm_tf import export
from lfm_tf import fileio
from lfm_tf.data import splits as splits_lib


class WeightSummaryTest(tf.test.TestCase):

    def test_clean_corrupted_and_per_class(self):
        splits = splits_lib.Splits(
            train_index=np.arange(4), train_labels=np.array([0, 0, 1, 1]),
            train_clean_labels=np.array([0, 1, 1, 1]),
            meta_index=np.array([], np.int64), meta_labels=np.array([]),
            test_index=np.array([], np.int64), test_from_train=True,
            transition_matrix=np.eye(2), num_classes=3, seed=0)
        summary = callbacks.example_weight_summary([1.0, 0.2, 0.8, 0.6],
                                                   splits)
        self.assertAllClose(summary["b_corrupted_mean"], 0.2)
        self.assertAllClose(summary["b_clean_mean"], 0.8)
        self.assertAllClose(summary["b_per_class"][:2], [0.6, 0.7])
        self.assertIsNone(summary["b_per_class"][2])


class StopOnNonFiniteTest(tf.test.TestCase, parameterized.TestCase):

    def _callback(self, weights, **kwargs):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.layers[0].kernel.assign(np.asarray(weights, np.float32))
        callback = callbacks.StopOnNonFinite(
            settings={"w1_learning_rate": 10.0}, **kwargs)
        callback.set_model(model)
        return callback

    def test_finite_run_passes(self):
        callback = self._callback([[1.0], [2.0]], steps_per_epoch=2,
                                  checkpoint_every_steps=1)
        for batch in range(2):
            callback.on_train_batch_end(batch, {"loss": 0.5, "a_corrupted":
                                                float("nan")})
        callback.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.7})

    def test_loss_names_the_step_of_a_resumed_run(self):
        callback = self._callback([[1.0], [2.0]], steps_per_epoch=4,
                                  start_step=5)
        callback.on_train_batch_end(1, {"loss": 0.5})
        with self.assertRaisesRegex(
                callbacks.NonFiniteError,
                r"loss \(w2_loss=inf\) at epoch 2, step 3 of 4 \(global step "
                r"7\).*--w1_learning_rate=10.0.*--grad_clip_norm"):
            callback.on_train_batch_end(2, {"loss": 0.5, "w2_loss": np.inf})

    @parameterized.parameters(np.nan, np.inf)
    def test_weights_checked_where_a_checkpoint_is_written(self, bad):
        # Step 3 checkpoints (every 3); step 2 does not, the epoch end does.
        callback = self._callback([[bad], [2.0]], steps_per_epoch=4,
                                  checkpoint_every_steps=3)
        callback.on_train_batch_end(0, {"loss": 0.5})
        callback.on_train_batch_end(1, {"loss": 0.5})
        with self.assertRaisesRegex(
                callbacks.NonFiniteError,
                r"NaN/Inf weights in 1 variable\(s\) \(.*kernel\) at epoch 1,"
                r" step 3 of 4"):
            callback.on_train_batch_end(2, {"loss": 0.5})
        at_epoch_end = self._callback([[bad], [2.0]], steps_per_epoch=1)
        with self.assertRaisesRegex(callbacks.NonFiniteError,
                                    "weights.*epoch 1, step 1 of 1"):
            at_epoch_end.on_train_batch_end(0, {"loss": 0.5})
            at_epoch_end.on_epoch_end(0, {"loss": 0.5})


class FileIoTest(tf.test.TestCase):

    def test_atomic_write_leaves_no_temporaries(self):
        path = os.path.join(self.get_temp_dir(), "sub", "f.json")
        fileio.write_text(path, "{}")
        fileio.write_text(path, "[1]")
        with open(path) as f:
            self.assertEqual(f.read(), "[1]")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["f.json"])

    def test_a_killed_exports_partial_goes_a_live_ones_stays(self):
        parent = self.get_temp_dir()
        host = socket.gethostname()
        dead = subprocess.run([sys.executable, "-c",
                               "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        dead_pid = int(dead.stdout)
        names = {
            "dead": f".3.partial-{dead_pid}@{host}-ab12",
            "old_style": ".3.partial-k9x2",  # Before writers were named.
            "dead_replaced": f".3.replaced-{dead_pid}@{host}-cd",
            "live": f".3.partial-{os.getpid()}@{host}-ef",
            "other_host": f".3.partial-{dead_pid}@elsewhere.example-gh",
            "other_version": f".4.partial-{dead_pid}@{host}-ij",
        }
        for name in names.values():
            os.makedirs(os.path.join(parent, name, "variables"))
        # As the next export of version 3 runs it.
        export._write_directory_atomically(  # pylint: disable=protected-access
            os.path.join(parent, "3"),
            lambda d: open(os.path.join(d, "saved_model.pb"), "w").close(),
            replace=False)
        left = sorted(os.listdir(parent))
        self.assertEqual(left, sorted(
            ["3", names["live"], names["other_host"], names["other_version"]]))

    def test_remove_partials_keeps_finished_files(self):
        root = self.get_temp_dir()
        left = [".saved_model.partial-ab12", ".saved_model.replaced-cd",
                ".tmp-x", os.path.join("stage_0", ".tmp-y"), "m.tmp.npz"]
        kept = ["saved_model", "config.json", os.path.join("stage_0", "r")]
        # A killed export leaves a directory; the rest are files.
        os.makedirs(os.path.join(root, left[0], "variables"))
        os.makedirs(os.path.join(root, "saved_model"))
        for name in left[1:] + kept[1:]:
            os.makedirs(os.path.dirname(os.path.join(root, name)),
                        exist_ok=True)
            with open(os.path.join(root, name), "w") as f:
                f.write("x")
        removed = fileio.remove_partials(root)
        self.assertEqual(removed, sorted(os.path.join(root, n) for n in left))
        for name in kept:
            self.assertTrue(os.path.exists(os.path.join(root, name)), name)


if __name__ == "__main__":
    tf.test.main()
