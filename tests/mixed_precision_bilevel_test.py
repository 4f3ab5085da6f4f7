"""mixed_float16 for the penalty method and MOLERE: dynamic loss scaling.

As tests/mixed_precision_test.py: a float16 step is compared with the
float32 step from the same weights and batch (small CNN of width 4, digits,
8 training and 8 meta examples). The penalty method takes T = 2 inner Adam
steps on v with Hessian-vector products of g, one Adam step on u, and its
gradient-norm test passes (eps = 1e6), so nu, rho and lambda move; MOLERE
takes a classifier step, a meta-net lookahead step and a splitter step and
re-splits the batch (K = 1, no warm-up).

What each comparison catches: an update off by S = 2^15 (a gradient left
scaled, or unscaled twice) or a skipped update is off by >= 1 relative. Adam's
first step is invariant to a gradient's scale, so the Adam-stepped tables
(v, u, phi, Theta) cannot show a wrong S; the gradients that feed them are
compared directly (grad_u and grad_v of the penalty objectives, grad_v g,
MOLERE's lookahead gradient of phi), and nu (+= rho grad_v g) and MOLERE's
classifier (SGD) carry their scale into the update. The tolerances are a
few times the float16 rounding measured here, far below 1.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from absl.testing import parameterized

from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import factory
from lfm_tf.methods import penalty

# |x16 - x32| / |x32| over a group of variables or gradients; a wrong S or
# a skipped update gives >= 1. Measured (CPU), penalty: grad_u 0.036,
# grad_v 0.0022, grad_v g 0.016; updates of v 0.025 (Adam's first steps are
# about lr * sign(g), and rounding flips the sign of the smallest entries),
# u 2e-6, nu 0.0031.
PENALTY_TOLERANCES = {
    "grad_u": 0.1, "grad_v": 0.01, "lower_grads": 0.05,
    "v": 0.1, "u": 1e-3, "nu": 0.02,
}
# MOLERE: phi's lookahead gradient 0.013 (0.053 on another batch of this
# size), updates of theta 0.0096, phi 0.14 (Adam's signs, as v above),
# Theta 5e-5 (float32 throughout; only its float16-computed input features
# differ).
MOLERE_TOLERANCES = {
    "phi_grad": 0.15, "theta": 0.05, "phi": 0.5, "splitter": 1e-3,
}

PENALTY = dict(penalty_inner_steps=2, penalty_epsilon=1e6,
               penalty_learner_learning_rate=1e-3)
# MOLERE's phi gradient is a second-order difference on the delta * B
# validation items of the batch: 16 examples (4 validation) and width 8 keep
# its float16 rounding well below 1 (8 examples, width 4: 0.11, the same with
# S = 1, i.e. rounding, not scaling).
MOLERE = dict(molere_meta_every=1, molere_warmup_epochs=0, lrw_delta=0.25,
              meta_net_hidden=8, molere_splitter_hidden=8, batch_size=16,
              width=8)


def _config(method, **overrides):
    values = dict(
        source="digits", num_meta_per_class=5, batch_size=8,
        meta_batch_size=8, backbone="small_cnn", width=4, method=method,
        augment=False, steps_per_epoch=2)
    values.update(PENALTY if method == "penalty" else MOLERE)
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


def _gradients(model, batch):
    """{name: [arrays]}: the gradients the step's updates come from, at the
    model's current weights (no side effects)."""
    train = batch["train"]
    index = tf.cast(train["index"], tf.int32)
    if isinstance(model, penalty.Penalty):
        result = tf.function(lambda: model.penalty_terms(
            train, batch["meta"],
            tf.gather(model.example_weight_logits, index)))()
        return {"grad_u": [result.grad_u.numpy()],
                "grad_v": [g.numpy() for g in result.grad_v],
                "lower_grads": [g.numpy() for g in result.lower_grads]}
    mask = tf.gather(model.validation_assignment, index)
    grads, _ = tf.function(lambda: model.meta_gradient(train, mask))()
    return {"phi_grad": [g.numpy() for g in grads]}


def _updated_groups(model):
    """{name: variables} whose one-step updates are compared."""
    if isinstance(model, penalty.Penalty):
        return {"v": model.learner.variables,
                "u": [model.example_weight_logits],
                "nu": model.multipliers}
    return {"theta": model.learner.variables,
            "phi": model.meta_net.trainable_variables,
            "splitter": model.splitter.trainable_variables}


def _all_state(model):
    """Every variable but the loss scale's, the step counter and the
    metrics': the model's and each optimizer's."""
    skip = {id(v) for v in model.loss_scale.variables}
    skip.add(id(model.step_counter))
    skip.update(id(v) for metric in model.metrics for v in metric.variables)
    variables = list(model.variables)
    for name in ("meta_optimizer", "splitter_optimizer"):
        optimizer = getattr(model, name, None)
        if optimizer is not None:
            variables += list(optimizer.variables)
    seen, out = set(), []
    for variable in variables:
        if id(variable) not in skip and id(variable) not in seen:
            seen.add(id(variable))
            out.append(variable)
    return out


class Float16StepTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("penalty", "penalty", PENALTY_TOLERANCES),
        ("molere", "molere", MOLERE_TOLERANCES))
    def test_float16_step_matches_float32_step(self, method, tolerances):
        config32 = _config(method)
        config16 = _config(method, mixed_precision="mixed_float16")
        data = train_lib.prepare_data(config32)
        batch = _first_batch(config32, data)
        gradients, updates, models = [], [], []
        for config in (config32, config16):
            model = _build(config, data)
            gradients.append(_gradients(model, batch))
            groups = _updated_groups(model)
            before = {k: [v.numpy() for v in vs] for k, vs in groups.items()}
            logs = tf.function(model.train_step)(batch)
            updates.append({
                k: [v.numpy() - b for v, b in zip(vs, before[k])]
                for k, vs in groups.items()})
            models.append(model)
        model32, model16 = models
        self.assertTrue(model16.loss_scale.enabled)
        self.assertEqual(model16.classifier.trunk.layers[1].compute_dtype,
                         "float16")
        # The step was finite: the scale did not back off.
        self.assertEqual(float(logs["loss_scale"]), 2.0**15)
        self.assertEqual(int(model16.loss_scale.good_steps.numpy()), 1)
        errors = {}
        for name, expected in gradients[0].items():
            errors[name] = _relative(expected, gradients[1][name])
        for name, expected in updates[0].items():
            self.assertGreater(np.linalg.norm(np.concatenate(
                [np.ravel(u) for u in expected])), 0.0, msg=name)
            errors[name] = _relative(expected, updates[1][name])
        logging.info("%s float16 vs float32: %s", method, errors)
        self.assertEqual(set(errors), set(tolerances))
        for name, error in errors.items():
            self.assertLess(error, tolerances[name], msg=name)
        if method == "penalty":
            # The gradient-norm test fired in both.
            for model in models:
                self.assertAllClose(model.schedule_variables.rho, 1e-2 * 1.1)
        else:
            # phi and Theta in float32 (their inputs are float32 features).
            self.assertEqual(model16.splitter.layers[0].compute_dtype,
                             "float32")
            self.assertEqual(model16.meta_net.layers[0].compute_dtype,
                             "float32")
            # Both re-split the batch within the budget: round(0.25 * 16).
            index = batch["train"]["index"].numpy()
            for model in models:
                self.assertEqual(int(model.meta_optimizer.iterations), 1)
                self.assertEqual(
                    model.validation_assignment.numpy()[index].sum(), 4)


class OverflowTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        # One step per epoch: u's renormalisation (data position, as the
        # step counter) still runs; everything else keeps its value.
        ("penalty", "penalty", {"steps_per_epoch": 1}, 0),
        ("molere_meta_step", "molere", {}, 0),
        # K = 2 at step 1: no meta update; the classifier step overflows.
        ("molere_off_grid", "molere", {"molere_meta_every": 2}, 1),
    )
    def test_overflow_changes_nothing_and_halves_the_scale(
            self, method, overrides, step):
        config = _config(method, mixed_precision="mixed_float16",
                         **overrides)
        data = train_lib.prepare_data(config)
        model = _build(config, data)
        model.step_counter.assign(step)
        if method == "penalty":
            # Away from renormalisation's fixed point u = 0.
            rng = np.random.default_rng(0)
            model.example_weight_logits.assign(rng.normal(
                size=model.example_weight_logits.shape).astype(np.float32))
            renormalized = penalty.renormalize_logits(
                model.example_weight_logits).numpy()
        # S * dL/d(activation) overflows float16 (max 65504).
        model.loss_scale.loss_scale.assign(1e30)
        state = _all_state(model)
        before = [v.numpy() for v in state]
        logs = tf.function(model.train_step)(_first_batch(config, data))
        for variable, value in zip(state, before):
            if (method == "penalty"
                    and variable is model.example_weight_logits):
                value = renormalized
            self.assertAllEqual(variable.numpy(), value, msg=variable.path)
        self.assertAllClose(float(logs["loss_scale"]), 5e29)
        self.assertEqual(int(model.loss_scale.good_steps.numpy()), 0)
        # The batch is consumed: the step counter (LR schedule) moves on.
        self.assertEqual(int(model.step_counter.numpy()), step + 1)


class CheckpointTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters("penalty", "molere")
    def test_checkpoint_restores_the_loss_scale(self, method):
        config = _config(method, mixed_precision="mixed_float16")
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


if __name__ == "__main__":
    tf.test.main()
