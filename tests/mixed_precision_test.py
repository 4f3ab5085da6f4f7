"""mixed_float16: dynamic loss scaling through the unrolled train steps.

A float16 step is compared with the float32 step from the same weights and
batch. float16 rounds every activation to an 11-bit mantissa, so the two
differ by forward rounding (measured here: the same on this model with the
scale at 1 or at 2^15, i.e. nothing underflows at this size); the tolerances
below are a few times the measured differences and far below what a wrong
scale gives (an update off by S = 2^15, or a skipped update: error >= 1).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import factory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# |update16 - update32| / |update32| over all of a learner's weights (W1;
# W2 for LFM). Measured: ERM 0.032, L2RW 0.019, MW-Net 0.005, LFM 0.012,
# LFM-PS 0.016 (small CNN, width 8, digits, CPU).
STEP_RTOL = 0.08
# |grad16 - grad32| / |grad32| of the outer gradients (LFM: B, r, V;
# MW-Net: phi). Measured: MW-Net 0.0001, LFM 0.049, LFM-PS 0.036.
HYPERGRADIENT_RTOL = 0.1

CASES = (
    ("erm", "erm", {}),
    ("l2rw", "l2rw", {}),
    ("mwnet", "mwnet", {}),
    ("lfm", "lfm", {}),
    ("lfm_ps", "lfm", {"encoder": "shared"}),
)


def _config(method, **overrides):
    values = dict(
        source="digits", num_meta_per_class=5, batch_size=32,
        meta_batch_size=24, backbone="small_cnn", width=8, method=method,
        augment=False, steps_per_epoch=1)
    values.update(overrides)
    return config_lib.ExperimentConfig().replace(**values).validate()


def _build(config, data):
    """The method as train_lib builds it, from seed 0."""
    keras.utils.set_random_seed(0)
    policy = config.train.mixed_precision
    with train_lib._precision(policy):  # pylint: disable=protected-access
        model = factory.compile_method(
            factory.build_method(config, data["facts"]), config)
    if policy != "none":
        train_lib._float32_outputs(model)  # pylint: disable=protected-access
    return model


def _first_batch(config, data):
    return next(iter(train_lib._train_dataset(config, data)))  # pylint: disable=protected-access


def _relative(expected, actual):
    """|expected - actual| / |expected| over lists of arrays, flattened."""
    expected = np.concatenate([np.ravel(e) for e in expected])
    actual = np.concatenate([np.ravel(a) for a in actual])
    return float(np.linalg.norm(expected - actual) / max(
        np.linalg.norm(expected), 1e-30))


def _learner_variables(model):
    variables = list(model.learner_variables())
    if hasattr(model, "w2"):
        seen = {id(v) for v in variables}
        variables += [v for v in model.w2.variables if id(v) not in seen]
    return variables


def _hypergradients(model, batch):
    train, meta = batch["train"], batch["meta"]
    if hasattr(model, "meta_gradient"):
        return tf.function(lambda: model.meta_gradient(train, meta)[0])()
    return tf.function(lambda: model.hypergradients(train, meta)[-1])()


def _slot_variables(model):
    """Everything a skipped step must leave alone: weights, momenta,
    optimizer moments and iteration counts."""
    variables = list(model.trainable_variables)
    for sgd in (model.sgd, getattr(model, "w2_sgd", None)):
        if sgd is not None:
            variables += list(sgd.momenta)
    for name in ("meta_optimizer", "example_weight_optimizer",
                 "weighting_optimizer", "encoder_optimizer"):
        optimizer = getattr(model, name, None)
        if optimizer is not None:
            variables += list(optimizer.variables)
    return variables


class Float16StepTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*CASES)
    def test_float16_step_matches_float32_step(self, method, overrides):
        config32 = _config(method, **overrides)
        config16 = _config(method, mixed_precision="mixed_float16",
                           **overrides)
        data = train_lib.prepare_data(config32)
        batch = _first_batch(config32, data)
        updates, hypergradients = [], []
        for config in (config32, config16):
            model = _build(config, data)
            if method != "erm" and method != "l2rw":
                hypergradients.append(
                    [g.numpy() for g in _hypergradients(model, batch)])
            variables = _learner_variables(model)
            before = [v.numpy() for v in variables]
            logs = tf.function(model.train_step)(batch)
            updates.append([v.numpy() - b for v, b in zip(variables, before)])
        self.assertEqual(model.loss_scale.enabled, True)
        # The step was finite: the scale did not back off.
        self.assertEqual(float(logs["loss_scale"]), 2.0**15)
        self.assertEqual(int(model.loss_scale.good_steps.numpy()), 1)
        self.assertEqual(model.classifier.trunk.layers[1].compute_dtype,
                         "float16")
        self.assertEqual({v.dtype for v in model.trainable_variables},
                         {"float32"})
        self.assertGreater(np.linalg.norm(np.concatenate(
            [np.ravel(u) for u in updates[0]])), 0.0)
        self.assertLess(_relative(*updates), STEP_RTOL)
        if hypergradients:
            self.assertLess(_relative(*hypergradients), HYPERGRADIENT_RTOL)

    def test_float32_runs_have_no_loss_scale_state(self):
        config = _config("lfm")
        model = _build(config, train_lib.prepare_data(config))
        self.assertFalse(model.loss_scale.enabled)
        self.assertEmpty(model.loss_scale.variables)


class OverflowTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*CASES[:1], *CASES[2:4])
    def test_overflow_skips_the_step_and_halves_the_scale(self, method,
                                                          overrides):
        config = _config(method, mixed_precision="mixed_float16",
                         **overrides)
        data = train_lib.prepare_data(config)
        model = _build(config, data)
        # S * dL/d(activation) overflows float16 (max 65504).
        model.loss_scale.loss_scale.assign(1e30)
        state = _slot_variables(model)
        before = [v.numpy() for v in state]
        logs = tf.function(model.train_step)(_first_batch(config, data))
        for variable, value in zip(state, before):
            self.assertAllEqual(variable.numpy(), value, msg=variable.path)
        self.assertAllClose(float(logs["loss_scale"]), 5e29)
        self.assertEqual(int(model.loss_scale.good_steps.numpy()), 0)
        # The batch is consumed: the step counter (LR schedule) moves on.
        self.assertEqual(int(model.step_counter.numpy()), 1)


class GradientScalingTest(tf.test.TestCase):

    def test_scaled_gradient_survives_where_float16_underflows(self):
        config = _config("erm", mixed_precision="mixed_float16")
        data = train_lib.prepare_data(config)
        model = _build(config, data)
        reference = _build(_config("erm"), data)
        train = _first_batch(config, data)["train"]

        def gradients(method_model, factor, scaled):
            with tf.GradientTape() as tape:
                losses, _ = method_model.learner_losses(train["image"],
                                                        train["label"])
                # A loss this small stands for a late, well-fitted batch.
                loss = factor * tf.reduce_mean(losses)
            variables = method_model.learner_variables()
            if scaled:
                grads = method_model.loss_scale.gradient(tape, loss,
                                                         variables)
            else:
                grads = tape.gradient(loss, variables)
            # The first conv: its gradient crosses every float16 layer.
            return grads[0].numpy()

        expected = gradients(reference, 1e-6, scaled=False)
        unscaled = gradients(model, 1e-6, scaled=False)
        scaled = gradients(model, 1e-6, scaled=True)
        self.assertLess(_relative([expected], [scaled]), STEP_RTOL)
        self.assertGreater(_relative([expected], [unscaled]), 0.5)


class CheckpointTest(tf.test.TestCase):

    def test_checkpoint_restores_the_loss_scale(self):
        config = _config("erm", mixed_precision="mixed_float16")
        data = train_lib.prepare_data(config)
        model = _build(config, data)
        model.loss_scale.loss_scale.assign(1024.0)
        model.loss_scale.good_steps.assign(7)
        manager = checkpointing.Manager(self.get_temp_dir())
        path = manager.save(model, {"global_step": 0})
        fresh = _build(config, data)
        self.assertEqual(float(fresh.loss_scale.loss_scale.numpy()), 2.0**15)
        manager.restore(fresh, path)
        self.assertEqual(float(fresh.loss_scale.loss_scale.numpy()), 1024.0)
        self.assertEqual(int(fresh.loss_scale.good_steps.numpy()), 7)


class ConfigTest(tf.test.TestCase):

    def test_covered_methods_validate(self):
        for method in config_lib.FLOAT16_METHODS:
            _config(method, mixed_precision="mixed_float16")

    def test_other_methods_are_refused_with_the_fix(self):
        for method in ("dbl", "penalty", "molere", "darts", "lfm_darts"):
            with self.assertRaisesRegex(
                    ValueError, f"mixed_float16' with method='{method}'.*"
                    "mixed_precision=mixed_bfloat16"):
                _config(method, mixed_precision="mixed_float16")


class SmokeRunTest(tf.test.TestCase):

    def test_pipelines_train_with_float16_finishes(self):
        workdir = self.get_temp_dir()
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.train",
             "--flagfile=configs/smoke/train_lfm.flags",
             "--mixed_precision=mixed_float16", "--steps_per_epoch=2",
             f"--workdir={workdir}"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(os.path.join(workdir, "config.json")) as f:
            self.assertEqual(json.load(f)["train"]["mixed_precision"],
                             "mixed_float16")
        with open(os.path.join(workdir, "metrics.json")) as f:
            self.assertBetween(json.load(f)["test_accuracy"], 0.0, 1.0)
        self.assertTrue(os.path.exists(
            os.path.join(workdir, "saved_model", "saved_model.pb")))


if __name__ == "__main__":
    tf.test.main()
