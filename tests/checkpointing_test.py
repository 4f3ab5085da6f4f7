"""Whole-state checkpoints: what they hold, how they are written, the stream."""

import os

import keras
import numpy as np
import tensorflow as tf

from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import factory


def _config(method="lfm", **overrides):
    values = dict(
        source="digits", noise_type="uniform", noise_rate=0.4,
        num_meta_per_class=5, batch_size=32, meta_batch_size=25,
        backbone="small_cnn", width=8, epochs=1, steps_per_epoch=2,
        crop_padding=1, flip=False, method=method)
    values.update(overrides)
    return config_lib.ExperimentConfig().replace(**values)


def _every_variable(model):
    """Layers, metric trackers and every Keras optimizer of the model."""
    variables = list(model.variables) + list(model.metrics_variables)
    for name in ("example_weight_optimizer", "weighting_optimizer",
                 "encoder_optimizer", "meta_optimizer"):
        optimizer = getattr(model, name, None)
        if optimizer is not None:
            variables += list(optimizer.variables)
    return variables


def _build(config, data):
    keras.utils.set_random_seed(config.data.seed)
    return factory.compile_method(
        factory.build_method(config, data["facts"]), config)


class CheckpointContentTest(tf.test.TestCase):

    def test_restore_brings_back_every_variable(self):
        config = _config("lfm")
        data = train_lib.prepare_data(config)
        model = _build(config, data)
        model.fit(data["train"], epochs=1, steps_per_epoch=2, verbose=0)
        # Distinct values everywhere, so a variable that is not saved (or
        # restored into the wrong slot) cannot pass by being at its init.
        rng = np.random.default_rng(0)
        for variable in _every_variable(model):
            if variable.dtype in ("float32", "float64"):
                variable.assign(rng.normal(size=variable.shape).astype(
                    variable.dtype))
            else:
                variable.assign(np.full(variable.shape, 7, variable.dtype))
        manager = checkpointing.Manager(self.get_temp_dir())
        path = manager.save(model, {"global_step": 2})

        fresh = _build(config, data)
        before = [np.array(v) for v in _every_variable(fresh)]
        manager.restore(fresh, path)
        expected = _every_variable(model)
        actual = _every_variable(fresh)
        self.assertLen(actual, len(expected))
        changed = 0
        for want, got, old in zip(expected, actual, before):
            self.assertAllEqual(np.array(want), np.array(got), msg=want.path)
            changed += int(not np.array_equal(np.array(got), old))
        self.assertGreater(changed, len(actual) // 2)

    def test_mismatched_checkpoint_is_a_clear_error(self):
        erm_config = _config("erm")
        data = train_lib.prepare_data(erm_config)
        manager = checkpointing.Manager(self.get_temp_dir())
        path = manager.save(_build(erm_config, data), {"global_step": 0})
        lfm = _build(_config("lfm"), data)
        with self.assertRaisesRegex(ValueError, "does not match"):
            manager.restore(lfm, path)


class ManagerTest(tf.test.TestCase):

    def test_keeps_the_newest_and_ignores_partial_writes(self):
        directory = self.get_temp_dir()
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        manager = checkpointing.Manager(directory, keep=2)
        for step in (3, 6, 9):
            manager.save(model, {"global_step": step})
        # A write killed before its rename leaves only a tmp- directory.
        os.makedirs(os.path.join(directory, "tmp-ckpt-4"))
        self.assertEqual(sorted(os.listdir(directory)),
                         ["ckpt-2", "ckpt-3", "tmp-ckpt-4"])
        self.assertEqual(manager.latest_state()["global_step"], 9)
        self.assertEqual(manager.save(model, {"global_step": 12}),
                         os.path.join(directory, "ckpt-4"))

    def test_keep_must_be_positive(self):
        with self.assertRaisesRegex(ValueError, "keep=0"):
            checkpointing.Manager(self.get_temp_dir(), keep=0)

    def test_non_chief_keeps_nothing(self):
        directory = self.get_temp_dir()
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        manager = checkpointing.Manager(directory, is_chief=False,
                                        worker_id=1)
        manager.save(model, {"global_step": 1})
        self.assertEmpty(os.listdir(directory))


class StreamTest(tf.test.TestCase):

    def test_skipping_reproduces_the_stream_across_epochs(self):
        config = _config("lfm", batch_size=256, meta_batch_size=25)
        data = train_lib.prepare_data(config)
        steps = data["facts"].steps_per_epoch  # 5 batches per pass.

        def make():
            return train_lib._train_dataset(config, data)  # pylint: disable=protected-access

        def take(dataset, count):
            return [(b["train"]["index"].numpy(), b["train"]["image"].numpy(),
                     b["meta"]["index"].numpy())
                    for b in dataset.take(count)]

        straight = take(checkpointing.resumable_stream(make, 0),
                        3 * steps)
        start = steps + 2  # Mid-way through the second epoch.
        resumed = take(checkpointing.resumable_stream(make, start),
                       3 * steps - start)
        for want, got in zip(straight[start:], resumed):
            for a, b in zip(want, got):
                self.assertAllEqual(a, b)
        # Epochs really are reshuffled (the check above is not vacuous).
        self.assertNotAllEqual(straight[0][0], straight[steps][0])

    def test_phases_finish_the_killed_epoch_first(self):
        phases = train_lib._phases  # pylint: disable=protected-access
        self.assertEqual(phases(0, 7, 2), [(0, 2, 7)])
        self.assertEqual(phases(9, 7, 2), [(1, 2, 5)])
        self.assertEqual(phases(3, 7, 3), [(0, 1, 4), (1, 3, 7)])
        self.assertEqual(phases(7, 7, 2), [(1, 2, 7)])
        self.assertEqual(phases(14, 7, 2), [])


class ResumeGuardTest(tf.test.TestCase):

    def test_a_different_config_does_not_resume(self):
        workdir = self.get_temp_dir()
        config = _config("erm", epochs=1, steps_per_epoch=1)
        train_lib.train_and_evaluate(config, workdir)
        with self.assertRaisesRegex(ValueError,
                                    "data.noise_rate: 0.4 -> 0.2.*--overwrite"):
            train_lib.train_and_evaluate(
                config.replace(noise_rate=0.2), workdir)
        # Changing only how it runs is allowed; a finished run is evaluated
        # and exported again from its checkpoints, training no more steps
        # (pipelines.benchmark's reruns rely on it).
        metrics = train_lib.train_and_evaluate(
            config.replace(checkpoint_every_steps=5), workdir)
        self.assertLen(metrics["val_accuracy_per_epoch"], 1)
        self.assertLen(os.listdir(os.path.join(workdir, "backup")), 1)


if __name__ == "__main__":
    tf.test.main()
