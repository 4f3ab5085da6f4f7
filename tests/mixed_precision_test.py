"""mixed_float16: dynamic loss scaling through the unrolled train steps.

A float16 step is compared with the float32 step from the same weights and
batch. float16 rounds every activation to an 11-bit mantissa, so the two
differ by forward rounding (measured here: the same on this model with the
scale at 1 or at 2^15, i.e. nothing underflows at this size); the tolerances
below are a few times the measured differences and far below what a wrong
scale gives (an update or gradient off by S, or a skipped update: error
>= 1), so unscaled-seed or unscale-free code fails them.

The supernets (DARTS, LFM-DARTS) are tiny (4 channels, 3 cells, 1 node,
8x8 images, batch 4) because tracing second-order supernet steps is slow
on CPU. α's gradient there is badly conditioned: perturbing the float32
weights alone by float16's rounding (relative 4.9e-4) moves the float32
DARTS gradient by 3-11% and LFM-DARTS' by 17-48% (4 draws each), so their
float16 tolerances are wide; they still fail by orders of magnitude for a
gradient off by S.
α's own first Adam step is sign(g) * lr in both precisions, so α is
compared through its gradient, not its update.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from absl.testing import parameterized

from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import factory
from lfm_tf.methods import lrw
from lfm_tf.methods import search_factory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# |update16 - update32| / |update32| over all of a learner's weights (W1;
# W2 for LFM). Measured: ERM 0.032, L2RW 0.019, MW-Net 0.005, LFM 0.012,
# LFM-PS 0.016, DBL 0.018, LRW-Hard 0.032 (small CNN, width 8, digits,
# CPU); DARTS 0.035 (tiny supernet).
STEP_RTOL = 0.08
# LFM-DARTS (PS): W2's step follows a, which follows α's softmax and u
# through W1'; measured 0.083 (module doc: its conditioning).
SEARCH_STEP_RTOL = {"lfm_darts": 0.15}
# |grad16 - grad32| / |grad32| of the outer gradients (LFM: B, r, V;
# MW-Net and LRW: phi; DARTS: α; LFM-DARTS: α, r). Measured: MW-Net 0.0001,
# LFM 0.049, LFM-PS 0.036, LRW-Hard 0.0008.
HYPERGRADIENT_RTOL = 0.1
# α's gradients (module doc). Measured: DARTS (second order) 0.14,
# LFM-DARTS (PS) 0.56; float16-sized perturbations of the float32 weights
# alone move them by 0.03-0.11 and 0.17-0.48 (4 draws each).
SEARCH_HYPERGRADIENT_RTOL = {"darts": 0.5, "lfm_darts": 0.9}
# The tiny supernets' float16 backward overflows at Keras' initial S = 2^15
# (a dynamic scale would skip a few first steps and settle lower); they are
# compared from S = 2^8, which still scales every gradient.
SEARCH_INITIAL_SCALE = 2.0**8

_SEARCH = dict(
    batch_size=4, meta_batch_size=4, search_channels=4, search_cells=3,
    search_steps=1, search_primitives="none,skip_connect,sep_conv_3x3",
    arch_order="second", weighting_mode="positional", encoder="shared")

CASES = (
    ("erm", "erm", {}),
    ("l2rw", "l2rw", {}),
    ("mwnet", "mwnet", {}),
    ("lfm", "lfm", {}),
    ("lfm_ps", "lfm", {"encoder": "shared"}),
    ("dbl", "dbl", {}),
    ("lrw_hard", "lrw_hard", {"lrw_margin_folds": 1, "lrw_erm_epochs": 1}),
    ("darts", "darts", _SEARCH),
    ("lfm_darts_ps", "lfm_darts", _SEARCH),
)
# The one-step comparison and the skipped-step test run these.
OVERFLOW_CASES = tuple(c for c in CASES if c[0] not in ("l2rw", "lfm_ps"))


def _config(method, **overrides):
    values = dict(
        source="digits", num_meta_per_class=5, batch_size=32,
        meta_batch_size=24, backbone="small_cnn", width=8, method=method,
        augment=False, steps_per_epoch=1)
    values.update(overrides)
    return config_lib.ExperimentConfig().replace(**values).validate()


def _is_search(config):
    return config.method.method in config_lib.SEARCH_METHODS


def _prepare_data(config):
    """train_lib's data; LRW's re-split (its float32 first phase) too."""
    data = train_lib.prepare_data(config)
    if config.method.method in lrw.SELECTIONS:
        data = lrw.resplit(config, data)
    return data


def _build(config, data):
    """The method as train_lib (search_lib for search methods) builds it,
    from seed 0; α (search methods) set far from uniform, so every op's
    weight matters, and S to `SEARCH_INITIAL_SCALE`."""
    keras.utils.set_random_seed(0)
    policy = config.train.mixed_precision
    with train_lib._precision(policy):  # pylint: disable=protected-access
        if _is_search(config):
            model = search_factory.build_search_method(config,
                                                       data["facts"])
        else:
            model = factory.compile_method(
                factory.build_method(config, data["facts"]), config)
    if policy != "none":
        if _is_search(config):
            search_factory.float32_outputs(model)
        else:
            train_lib._float32_outputs(model)  # pylint: disable=protected-access
    if _is_search(config):
        rng = np.random.default_rng(1)
        for variable in model.arch_step.variables:
            variable.assign(rng.normal(scale=0.5, size=variable.shape))
        if model.loss_scale.enabled:
            model.loss_scale.loss_scale.assign(SEARCH_INITIAL_SCALE)
    return model


def _trace(model, fn):
    # autograph=False: Keras runs train_step unconverted too (autograph
    # mis-converts LFMDarts.train_step's zero-argument super()).
    return tf.function(fn, autograph=False)


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
    if hasattr(model, "architecture_gradient"):
        return tf.function(
            lambda: model.architecture_gradient(train, meta)[1])()
    return _trace(model, lambda: model.hypergradients(train, meta)[-1])()


def _slot_variables(model):
    """Everything a skipped step must leave alone: weights, momenta,
    optimizer moments and iteration counts."""
    variables = list(model.trainable_variables)
    for sgd in (model.sgd, getattr(model, "w2_sgd", None)):
        if sgd is not None:
            variables += list(sgd.momenta)
    optimizers = [getattr(model, name, None) for name in (
        "meta_optimizer", "example_weight_optimizer", "weighting_optimizer",
        "encoder_optimizer")]
    if hasattr(model, "arch_step"):
        optimizers.append(model.arch_step.optimizer)
    for optimizer in optimizers:
        if optimizer is not None:
            variables += list(optimizer.variables)
    return variables


def _first_trunk_layer(model):
    trunk = model.classifier.trunk
    return trunk.stem_conv if hasattr(trunk, "stem_conv") else trunk.layers[1]


class Float16StepTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*CASES)
    def test_float16_step_matches_float32_step(self, method, overrides):
        config32 = _config(method, **overrides)
        config16 = _config(method, mixed_precision="mixed_float16",
                           **overrides)
        # One split for both (LRW's margins would differ by rounding).
        data = _prepare_data(config32)
        batch = _first_batch(config32, data)
        updates, hypergradients = [], []
        for config in (config32, config16):
            model = _build(config, data)
            if method not in ("erm", "l2rw", "dbl"):
                hypergradients.append(
                    [g.numpy() for g in _hypergradients(model, batch)])
            variables = _learner_variables(model)
            before = [v.numpy() for v in variables]
            logs = _trace(model, model.train_step)(batch)
            updates.append([v.numpy() - b for v, b in zip(variables, before)])
        self.assertEqual(model.loss_scale.enabled, True)
        # The step was finite: the scale did not back off.
        self.assertEqual(float(logs["loss_scale"]),
                         SEARCH_INITIAL_SCALE if _is_search(config16)
                         else 2.0**15)
        self.assertEqual(int(model.loss_scale.good_steps.numpy()), 1)
        self.assertEqual(_first_trunk_layer(model).compute_dtype, "float16")
        self.assertEqual({v.dtype for v in model.trainable_variables},
                         {"float32"})
        self.assertGreater(np.linalg.norm(np.concatenate(
            [np.ravel(u) for u in updates[0]])), 0.0)
        step_error = _relative(*updates)
        hyper_error = (_relative(*hypergradients) if hypergradients
                       else None)
        logging.info("%s: float16 vs float32 update %.4f, outer gradient %s",
                     method, step_error, hyper_error)
        self.assertLess(step_error, SEARCH_STEP_RTOL.get(method, STEP_RTOL))
        if hypergradients:
            self.assertLess(hyper_error, SEARCH_HYPERGRADIENT_RTOL.get(
                method, HYPERGRADIENT_RTOL))

    def test_float32_runs_have_no_loss_scale_state(self):
        config = _config("lfm")
        model = _build(config, train_lib.prepare_data(config))
        self.assertFalse(model.loss_scale.enabled)
        self.assertEmpty(model.loss_scale.variables)


class OverflowTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(*OVERFLOW_CASES)
    def test_overflow_skips_the_step_and_halves_the_scale(self, method,
                                                          overrides):
        config = _config(method, mixed_precision="mixed_float16",
                         **overrides)
        data = _prepare_data(config)
        model = _build(config, data)
        # S * dL/d(activation) overflows float16 (max 65504).
        model.loss_scale.loss_scale.assign(1e30)
        state = _slot_variables(model)
        before = [v.numpy() for v in state]
        logs = _trace(model, model.train_step)(_first_batch(config, data))
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

    def test_every_method_validates(self):
        for method in config_lib.METHODS:
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
