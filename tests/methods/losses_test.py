"""The loss axis: each loss against numpy, its limits, DRW, and its threading.

Numpy references are written from the papers' formulas, independently of the
TensorFlow code; the method checks confirm that every learner step descends
the configured loss while meta losses and evaluation stay plain CE.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf.methods import factory
from lfm_tf.methods import losses

COUNTS = np.array([50, 10, 2])
SIDE, CLASSES = 6, 3


def _example():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, CLASSES)) * 2.0
    labels = np.array([0, 1, 2, 2, 1])
    return labels, logits


def _np_ce(labels, logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def _np_p_true(labels, logits):
    return np.exp(-_np_ce(labels, logits))


class LossFunctionTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.labels, self.logits = _example()
        self.tf_logits = tf.constant(self.logits)

    def test_logit_adjusted_against_numpy(self):
        prior = COUNTS / COUNTS.sum()
        expected = _np_ce(self.labels, self.logits + 1.5 * np.log(prior))
        self.assertAllClose(
            losses.logit_adjusted_loss(self.labels, self.tf_logits, COUNTS,
                                       1.5), expected, rtol=1e-12)

    def test_logit_adjusted_at_tau_zero_is_ce(self):
        self.assertAllClose(
            losses.logit_adjusted_loss(self.labels, self.tf_logits, COUNTS,
                                       0.0),
            _np_ce(self.labels, self.logits), rtol=1e-12)

    def test_balanced_softmax_against_numpy(self):
        # Ren et al.: p_y = n_y e^{z_y} / sum_c n_c e^{z_c}.
        weighted = COUNTS * np.exp(self.logits)
        expected = -np.log(weighted[np.arange(5), self.labels]
                           / weighted.sum(axis=1))
        self.assertAllClose(
            losses.balanced_softmax_loss(self.labels, self.tf_logits, COUNTS),
            expected, rtol=1e-12)

    def test_balanced_softmax_with_uniform_counts_is_ce(self):
        self.assertAllClose(
            losses.balanced_softmax_loss(self.labels, self.tf_logits,
                                         [7, 7, 7]),
            _np_ce(self.labels, self.logits), rtol=1e-12)

    def test_ldam_margins_by_hand_and_ordered(self):
        margins = losses.ldam_margins(COUNTS, 0.5)
        expected = 0.5 * (COUNTS ** -0.25) / (2.0 ** -0.25)
        self.assertAllClose(margins, expected, rtol=1e-12)
        self.assertAlmostEqual(margins.max(), 0.5)
        # Tail (fewest examples) gets the largest margin.
        self.assertTrue(margins[2] > margins[1] > margins[0])

    def test_ldam_against_numpy(self):
        margins = losses.ldam_margins(COUNTS, 0.5)
        shifted = self.logits.copy()
        shifted[np.arange(5), self.labels] -= margins[self.labels]
        expected = _np_ce(self.labels, 3.0 * shifted)
        self.assertAllClose(
            losses.ldam_loss(self.labels, self.tf_logits, margins, 3.0),
            expected, rtol=1e-12)

    def test_ldam_on_a_cosine_head_puts_the_margin_on_the_cosine(self):
        # The paper: CE(s (cos - Delta_y e_y)); a cosine head's logits are
        # s_h cos, whatever s_h.
        margins = losses.ldam_margins(COUNTS, 0.5)
        cosines = np.tanh(self.logits)
        shifted = cosines.copy()
        shifted[np.arange(5), self.labels] -= margins[self.labels]
        expected = _np_ce(self.labels, 20.0 * shifted)
        for head_scale in (1.0, 30.0):
            self.assertAllClose(
                losses.ldam_loss(self.labels,
                                 tf.constant(head_scale * cosines), margins,
                                 20.0, cosine_scale=head_scale),
                expected, rtol=1e-12)

    def test_gce_against_numpy_and_its_limits(self):
        p = _np_p_true(self.labels, self.logits)
        self.assertAllClose(
            losses.generalized_cross_entropy(self.labels, self.tf_logits,
                                             0.7),
            (1 - p ** 0.7) / 0.7, rtol=1e-12)
        # q = 1: MAE-like 1 - p_y; q -> 0: CE (error O(q CE^2)).
        self.assertAllClose(
            losses.generalized_cross_entropy(self.labels, self.tf_logits,
                                             1.0), 1 - p, rtol=1e-12)
        self.assertAllClose(
            losses.generalized_cross_entropy(self.labels, self.tf_logits,
                                             1e-6),
            _np_ce(self.labels, self.logits), rtol=1e-5)

    def test_empty_class_is_refused(self):
        with self.assertRaisesRegex(ValueError, "empty classes \\[1\\]"):
            losses.balanced_softmax_loss(self.labels, self.tf_logits,
                                         [3, 0, 2])

    def test_every_configured_loss_is_dispatched(self):
        expected = {
            "ce": _np_ce(self.labels, self.logits),
            "focal": (1 - _np_p_true(self.labels, self.logits)) ** 2
            * _np_ce(self.labels, self.logits),
            "gce": (1 - _np_p_true(self.labels, self.logits) ** 0.7) / 0.7,
            "balanced_softmax": _np_ce(self.labels,
                                       self.logits + np.log(COUNTS)),
        }
        for name, values in expected.items():
            loss = losses.TrainingLoss(name, COUNTS)
            self.assertAllClose(loss(self.labels, self.tf_logits), values,
                                rtol=1e-12, msg=name)
        self.assertEqual(set(config_lib.LOSSES),
                         set(expected) | {"logit_adjusted", "ldam"})

    def test_unknown_loss_is_refused_on_construction(self):
        with self.assertRaisesRegex(ValueError, "loss='hinge'.*--loss"):
            losses.TrainingLoss("hinge")

    def test_drw_switches_on_at_its_step(self):
        loss = losses.TrainingLoss("gce", COUNTS, drw_start_step=6,
                                   drw_beta=0.9)
        plain = loss.base_loss(self.labels, self.tf_logits)
        weights = losses.class_balanced_weights(COUNTS, 0.9)[self.labels]
        for step in (0, 5):
            self.assertAllClose(loss(self.labels, self.tf_logits, step), plain)
        for step in (6, 40):
            self.assertAllClose(loss(self.labels, self.tf_logits,
                                     tf.constant(step, tf.int64)),
                                weights * plain)
        # The tail's weight is the largest.
        self.assertGreater(weights[2], weights[0])


class LossConfigTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.named_parameters(
        ("negative_tau", {"logit_adjust_tau": -0.1}, "logit_adjust_tau"),
        ("q_zero", {"gce_q": 0.0}, "gce_q"),
        ("q_above_one", {"gce_q": 1.5}, "gce_q"),
        ("unknown_loss", {"loss": "hinge"}, "loss='hinge'"),
        ("drw_after_training", {"drw_start_epoch": 3, "epochs": 3},
         "drw_start_epoch=3 with epochs=3"),
        ("first_order_lfm", {"loss": "ldam", "method": "lfm",
                             "hypergradient": "first_order"},
         "first_order.*exact.*finite_difference"),
        ("unsupported_method", {"loss": "gce", "method": "penalty"},
         "method='penalty'"),
        ("focal_method_with_other_loss", {"loss": "gce", "method": "focal"},
         "--method=erm --loss=gce"),
    )
    def test_bad_values_are_refused(self, overrides, message):
        with self.assertRaisesRegex(ValueError, message):
            config_lib.ExperimentConfig().replace(**overrides).validate()

    def test_valid_compositions(self):
        for overrides in ({"loss": "ldam", "drw_start_epoch": 2, "epochs": 3,
                           "method": "mwnet"},
                          {"loss": "logit_adjusted", "method": "lfm",
                           "hypergradient": "finite_difference"},
                          {"method": "lfm", "hypergradient": "first_order"}):
            config_lib.ExperimentConfig().replace(**overrides).validate()


def _build(method, **overrides):
    overrides.setdefault("grad_clip_norm", None)
    config = config_lib.ExperimentConfig(
        model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        optimizer=config_lib.OptimizerConfig(
            w1_learning_rate=0.5, w2_learning_rate=0.5,
            lr_schedule="constant"),
    ).replace(method=method, **overrides)
    facts = factory.DataFacts(
        num_classes=CLASSES, input_shape=(SIDE, SIDE, 3), num_train=10,
        num_meta=6, class_counts=COUNTS, steps_per_epoch=2,
    )
    keras.utils.set_random_seed(0)
    return factory.build_method(config.validate(), facts)


def _batches(dtype=tf.float64):
    rng = np.random.default_rng(0)
    train = {
        "image": tf.constant(rng.normal(size=(5, SIDE, SIDE, 3)), dtype),
        "label": tf.constant([0, 1, 2, 0, 1]),
        "clean_label": tf.constant([0, 1, 2, 2, 1]),
        "index": tf.constant([3, 0, 7, 5, 9]),
    }
    meta = {
        "image": tf.constant(rng.normal(size=(4, SIDE, SIDE, 3)), dtype),
        "label": tf.constant([0, 1, 2, 0]),
        "index": tf.constant([2, 5, 0, 1]),
    }
    return train, meta


class ThreadingTest(tf.test.TestCase, parameterized.TestCase):
    """The configured loss reaches the learner steps, and only them."""

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    def test_erm_step_descends_the_loss_and_eval_stays_plain(self):
        model = _build("erm", loss="balanced_softmax")
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        logits = model(train["image"], training=True)
        expected = losses.balanced_softmax_loss(train["label"], logits, COUNTS)
        logs = model.train_step({"train": train, "meta": meta})
        self.assertAllClose(float(logs["loss"]),
                            float(tf.reduce_mean(expected)), rtol=1e-10)
        # Evaluation (and export, which wraps `call`) sees plain logits and
        # reports plain CE.
        images, labels = meta["image"], meta["label"]
        plain = model.classifier(images, training=False)
        self.assertAllClose(model(images), plain)
        model.reset_metrics()
        logs = model.test_step((images, labels))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, plain)
        self.assertAllClose(float(logs["loss"]), float(tf.reduce_mean(ce)))

    def test_drw_switches_on_inside_the_compiled_step(self):
        # A vanishing learning rate keeps W fixed, so the reported loss
        # changes only where DRW switches on: epoch 1 = step 2.
        model = _build("erm", loss="ldam", drw_start_epoch=1, epochs=2,
                       w1_learning_rate=1e-12)
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        step = tf.function(model.train_step)
        logits = model(train["image"], training=True)
        plain = losses.ldam_loss(train["label"], logits,
                                 losses.ldam_margins(COUNTS, 0.5), 30.0)
        weights = losses.class_balanced_weights(COUNTS, 0.9999)[
            train["label"].numpy()]
        reported = []
        for _ in range(4):
            model.reset_metrics()
            reported.append(float(step({"train": train, "meta": meta})
                                  ["loss"]))
        before, after = float(tf.reduce_mean(plain)), float(
            tf.reduce_mean(weights * plain))
        self.assertAllClose(reported, [before, before, after, after],
                            rtol=1e-6)

    def test_cosine_head_ldam_step_descends_the_papers_loss(self):
        # A vanishing learning rate: the reported loss is the loss at the
        # built weights, which must be the paper's on the head's cosines.
        model = _build("erm", loss="ldam", head="cosine", head_scale=10.0,
                       w1_learning_rate=1e-12)
        self.assertEqual(model.training_loss.ldam_cosine_scale, 10.0)
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        logits = model.classifier(train["image"], training=True)
        self.assertLessEqual(float(tf.reduce_max(tf.abs(logits))), 10.0 + 1e-6)
        margins = losses.ldam_margins(COUNTS, 0.5)
        shifted = logits.numpy() / 10.0
        labels = train["label"].numpy()
        shifted[np.arange(len(labels)), labels] -= margins[labels]
        expected = _np_ce(labels, 30.0 * shifted).mean()
        logs = tf.function(model.train_step)({"train": train, "meta": meta})
        self.assertAllClose(float(logs["loss"]), expected, rtol=1e-5)
        dense = _build("erm", loss="ldam")
        self.assertIsNone(dense.training_loss.ldam_cosine_scale)

    @parameterized.named_parameters(
        ("mwnet_gce", "mwnet", {"loss": "gce"}),
        ("l2rw_ldam_drw", "l2rw", {"loss": "ldam", "drw_start_epoch": 0}),
        ("class_balanced_logit_adjusted", "class_balanced",
         {"loss": "logit_adjusted"}),
    )
    def test_one_step_of_each_composition(self, method, overrides):
        model = _build(method, **overrides)
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        before = [v.numpy().copy() for v in model.classifier.trainable_variables]
        logs = model.train_step({"train": train, "meta": meta})
        self.assertTrue(np.isfinite(float(logs["loss"])))
        self.assertTrue(any(
            not np.allclose(b, a.numpy())
            for b, a in zip(before, model.classifier.trainable_variables)))
        if method == "l2rw":
            # L2RW's meta loss is plain CE of W1 (before its step) on the
            # meta batch, whatever the training loss.
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
                meta["label"], model.w1.forward(
                    [tf.constant(v) for v in before], meta["image"]).logits)
            self.assertAllClose(float(logs["val_loss"]),
                                float(tf.reduce_mean(ce)))

    def test_lfm_learners_use_the_loss_and_meta_losses_stay_ce(self):
        model = _build("lfm", loss="logit_adjusted", logit_adjust_tau=0.7)
        train, meta = _batches()
        b = model.example_weight_table.gather(train["index"])
        logits = model.w1(train["image"], training=True)
        expected = tf.reduce_mean(b * losses.logit_adjusted_loss(
            train["label"], logits, COUNTS, 0.7))
        w1_step, _, w2_step, val_loss = model.run_stages(train, meta)
        self.assertAllClose(w1_step.loss, expected, rtol=1e-10)
        val_ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
            meta["label"],
            model.w2.forward(w2_step.params, meta["image"]).logits)
        self.assertAllClose(val_loss, tf.reduce_mean(val_ce), rtol=1e-10)

    @parameterized.named_parameters(
        ("exact", "exact", 1e-6),
        # DARTS' step crosses ReLU kinks of this tiny net (lfm_test.py).
        ("finite_difference", "finite_difference", 1e-1),
    )
    def test_lfm_hypergradient_matches_finite_differences(self, method,
                                                          tolerance):
        model = _build("lfm", loss="logit_adjusted", hypergradient=method)
        rng = np.random.default_rng(3)
        model.example_weight_table.values.assign(rng.uniform(0.5, 1.5, 10))
        model.weighting_table.values.assign(rng.uniform(0.5, 1.5, 6))
        train, meta = _batches()
        grads = model.hypergradients(train, meta)[-1]
        variables = model.hyper_variables()
        objective = lambda: model.run_stages(train, meta)[-1]  # noqa: E731
        errors = []
        for k, position in [(0, 3), (0, 7), (1, 2), (1, 0)]:
            analytic = tf.reshape(grads[k], [-1]).numpy()[position]
            numeric = testing.central_difference(objective, variables[k],
                                                 position)
            errors.append(abs(analytic - numeric) / max(abs(numeric), 1e-8))
        self.assertLess(max(errors), tolerance, errors)


if __name__ == "__main__":
    tf.test.main()
