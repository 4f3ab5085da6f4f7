"""MOLERE: the splitter's regularisers by hand, the meta step against FD."""

import math

import keras
import numpy as np
import tensorflow as tf

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf.methods import factory
from lfm_tf.methods import molere

SIDE, CLASSES = 6, 3


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _build(**overrides):
    config = config_lib.ExperimentConfig(
        model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        optimizer=config_lib.OptimizerConfig(
            w1_learning_rate=0.5, lr_schedule="constant",
            grad_clip_norm=None),
    ).replace(method="molere", **overrides)
    facts = factory.DataFacts(
        num_classes=CLASSES, input_shape=(SIDE, SIDE, 3), num_train=10,
        num_meta=6, steps_per_epoch=2)
    keras.utils.set_random_seed(0)
    return factory.build_method(config.validate(), facts), config


def _train_batch(dtype):
    rng = np.random.default_rng(0)
    return {
        "image": tf.constant(rng.normal(size=(6, SIDE, SIDE, 3)), dtype),
        "label": tf.constant([0, 1, 2, 0, 1, 2]),
        "clean_label": tf.constant([0, 1, 2, 2, 1, 2]),
        "index": tf.constant([3, 0, 7, 5, 9, 1]),
    }


class RegulariserTest(tf.test.TestCase):

    def test_ratio_loss_by_hand(self):
        # mean P(train) = 0.7; target [0.9, 0.1].
        got = molere.ratio_loss(tf.constant([0.8, 0.6]), 0.1)
        self.assertAllClose(got, _kl([0.9, 0.1], [0.7, 0.3]), rtol=1e-6)
        self.assertAllClose(molere.ratio_loss(tf.constant([0.9, 0.9]), 0.1),
                            0.0, atol=1e-6)

    def test_label_balance_loss_by_hand(self):
        labels = tf.constant([0, 0, 1])
        p_train = tf.constant([1.0, 0.5, 0.5])
        # p(y) = [2/3, 1/3]; train counts [1.5, 0.5]; val counts [0.5, 0.5].
        expected = (_kl([2 / 3, 1 / 3], [0.75, 0.25])
                    + _kl([2 / 3, 1 / 3], [0.5, 0.5]))
        self.assertAllClose(molere.label_balance_loss(p_train, labels, 2),
                            expected, rtol=1e-5)
        # A class-blind assignment keeps both conditionals at the prior.
        self.assertAllClose(
            molere.label_balance_loss(tf.constant([0.3, 0.3, 0.3]), labels, 2),
            0.0, atol=1e-6)

    def test_gap_loss_by_hand(self):
        logits = tf.constant([[0.0, math.log(3.0)], [0.0, 0.0],
                              [5.0, -5.0]])
        correct = tf.constant([True, False, True])
        # Item 0: P(train) = 3/4, correct -> -log 3/4; item 1: -log 1/2;
        # item 2 is a training-part item and does not count.
        got = molere.gap_loss(logits, correct, tf.constant([1.0, 1.0, 0.0]))
        self.assertAllClose(got, (-math.log(0.75) - math.log(0.5)) / 2)

    def test_objective_weights_and_adversarial_sign(self):
        logits = tf.constant([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
        labels = tf.constant([0, 1, 1])
        correct = tf.constant([True, False, True])
        mask = tf.constant([0.0, 1.0, 1.0])
        losses = tf.constant([0.2, 3.0, 1.0])
        total, parts = molere.splitter_objective(
            logits, labels, correct, mask, losses, 0.1, 2, w_gap=1.0,
            w_ratio=2.0, w_balance=3.0, w_adversarial=0.5)
        expected = (parts["gap_loss"] + 2 * parts["ratio_loss"]
                    + 3 * parts["balance_loss"]) / 6 - 0.5 * parts[
                        "soft_val_loss"]
        self.assertAllClose(total, expected)
        s = tf.nn.softmax(logits)[:, 0].numpy()
        self.assertAllClose(parts["soft_val_loss"],
                            (s * [0.2, 3.0, 1.0]).sum() / s.sum())
        # Raising P(val) of the high-loss item lowers the objective's
        # adversarial term: the splitter is pushed to make validation hard.
        with tf.GradientTape() as tape:
            tape.watch(logits)
            adversarial = -molere.soft_validation_loss(
                tf.nn.softmax(logits)[:, 0], losses)
        self.assertLess(float(tape.gradient(adversarial, logits)[1, 0]), 0.0)

    def test_budget_split_follows_the_probabilities(self):
        p_val = tf.constant([0.9, 0.9, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05,
                             0.05, 0.05])
        hits = np.zeros(10)
        for step in range(200):
            split = molere.budget_split(p_val, 0.2, tf.constant([1, step]))
            self.assertEqual(float(tf.reduce_sum(split)), 2.0)
            hits += split.numpy()
        # Items 0 and 1 carry most of the mass and are drawn far more often.
        self.assertGreater(hits[:2].min(), 3 * hits[2:].max())
        self.assertGreater(hits[2:].sum(), 0)  # Sampled, not thresholded.

    def test_initial_split_is_exactly_delta(self):
        split = molere.initial_split(50, 0.1, seed=2)
        self.assertEqual(split.sum(), 5)
        self.assertAllEqual(split, molere.initial_split(50, 0.1, seed=2))


class Float64Test(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    def test_meta_gradient_matches_finite_differences(self):
        model, _ = _build()
        train = _train_batch(tf.float64)
        mask = tf.constant([0.0, 1.0, 0.0, 1.0, 0.0, 0.0], tf.float64)
        params = model.learner.current()

        def lookahead_val_loss():
            with tf.GradientTape() as tape:
                tape.watch(params)
                ce, out = model.learner.losses(params, train["image"],
                                               train["label"])
                weights = model.example_weights(out.features)
                loss = tf.reduce_sum((1 - mask) * weights * ce) / 4.0
            ahead, _ = model.sgd.unroll(params, tape.gradient(loss, params),
                                        0)
            val, _ = model.learner.losses(ahead, train["image"],
                                          train["label"])
            return tf.reduce_sum(mask * val) / 2.0

        got, val_loss = model.meta_gradient(train, mask)
        self.assertAllClose(val_loss, lookahead_val_loss())
        phi = model.meta_net.trainable_variables
        for variable, grad in zip(phi, got):
            for position in sorted({0, variable.shape.num_elements() - 1}):
                numeric = testing.central_difference(
                    lookahead_val_loss, variable, position, h=1e-6)
                self.assertAllClose(grad.numpy().reshape(-1)[position],
                                    numeric, rtol=1e-5, atol=1e-10)


class TrainStepTest(tf.test.TestCase):

    def test_meta_step_moves_every_level_and_resplits_the_batch(self):
        model, config = _build(molere_meta_every=1, lrw_delta=0.3)
        factory.compile_method(model, config)
        train = _train_batch(tf.float32)
        levels = {
            "classifier": model.learner.variables,
            "meta_net": model.meta_net.trainable_variables,
            "splitter": model.splitter.trainable_variables,
        }
        before = {k: [v.numpy().copy() for v in vs]
                  for k, vs in levels.items()}
        self.assertEqual(model.validation_assignment.numpy().sum(), 3)
        # Two validation items in the batch (ids 0 and 7), one outside it.
        split_before = np.zeros(10, np.float32)
        split_before[[0, 7, 2]] = 1.0
        model.validation_assignment.assign(split_before)
        logs = model.train_step({"train": train, "meta": train})
        for name, variables in levels.items():
            self.assertTrue(any(
                not np.allclose(b, v.numpy())
                for b, v in zip(before[name], variables)), name)
        self.assertTrue(np.isfinite(float(logs["splitter_loss"])))
        split = model.validation_assignment.numpy()
        untouched = np.setdiff1d(np.arange(10), [3, 0, 7, 5, 9, 1])
        self.assertAllEqual(split[untouched], split_before[untouched])
        self.assertTrue(set(np.unique(split)) <= {0.0, 1.0})
        # The budget: round(0.3 * 6) = 2 of the batch's items in validation.
        self.assertEqual(split[[3, 0, 7, 5, 9, 1]].sum(), 2)

    def test_warmup_keeps_the_initial_split(self):
        model, config = _build(molere_meta_every=1, molere_warmup_epochs=1)
        factory.compile_method(model, config)
        split_before = model.validation_assignment.numpy().copy()
        model.train_step({"train": _train_batch(tf.float32),
                          "meta": _train_batch(tf.float32)})
        self.assertAllEqual(model.validation_assignment, split_before)


if __name__ == "__main__":
    tf.test.main()
