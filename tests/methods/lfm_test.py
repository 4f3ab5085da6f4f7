"""LFM-DR: hypergradients against central finite differences, stage purity.

All checks run in float64 on a tiny CNN with BatchNorm, the trunk/head
backbone the product uses (`small_cnn`), so they cover exactly the code that
trains real models.
"""

import functools

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf import train_lib
from lfm_tf.methods import factory
from lfm_tf.methods import lfm

NUM_TRAIN, NUM_META, BATCH, META_BATCH, CLASSES, SIDE = 10, 6, 5, 4, 3, 6


def _build(**overrides):
    overrides.setdefault("grad_clip_norm", None)
    config = config_lib.ExperimentConfig(
        model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        optimizer=config_lib.OptimizerConfig(
            w1_learning_rate=0.5, w2_learning_rate=0.5,
            lr_schedule="constant"),
    ).replace(**overrides)
    facts = factory.DataFacts(
        num_classes=CLASSES, input_shape=(SIDE, SIDE, 3),
        num_train=NUM_TRAIN, num_meta=NUM_META, steps_per_epoch=2,
    )
    keras.utils.set_random_seed(0)
    model = factory.build_method(config.validate(), facts)
    rng = np.random.default_rng(3)
    table = model.example_weight_table
    table.values.assign(rng.uniform(0.5, 1.5, table.size))
    weighting = model.weighting_table.values
    weighting.assign(rng.uniform(0.5, 1.5, weighting.shape[0]))
    return model


def _batches():
    rng = np.random.default_rng(0)
    train = {
        "image": tf.constant(rng.normal(size=(BATCH, SIDE, SIDE, 3))),
        "label": tf.constant([0, 1, 2, 0, 1]),
        "clean_label": tf.constant([0, 1, 2, 2, 1]),
        "index": tf.constant([3, 0, 7, 5, 9]),
    }
    meta = {
        "image": tf.constant(rng.normal(size=(META_BATCH, SIDE, SIDE, 3))),
        "label": tf.constant([0, 1, 2, 0]),
        "index": tf.constant([2, 5, 0, 1]),
    }
    return train, meta


def _checked_entries(model):
    """(variable index in hyper_variables, flat position) pairs to check."""
    # B per training example (the batch's indices 3, 0, 7, 9), or per class.
    b_positions = ([3, 0, 7, 9] if model.example_weight_table.size == NUM_TRAIN
                   else range(CLASSES))
    entries = [(0, p) for p in b_positions] + [(1, 2), (1, 3), (1, 0)]
    if len(model.hyper_variables()) > 2:
        entries += [(2, 0), (2, 7)]
    return entries


# (name, sharing overrides, momentum on, clip binding) for the chained
# modes: separate networks, PS and single network, each once plain (no
# clip, no momentum) and once with both (the clip binding in both steps;
# Nesterov momentum with random buffers, weight decay 0.05). Two cases per
# sharing, not four, to keep CI's time.
_CHAINED_CASES = [
    (f"{sharing}_{'clipped_momentum' if both else 'plain'}", overrides,
     both, both)
    for sharing, overrides in (
        ("separate", {}), ("parameter_sharing", {"encoder": "shared"}),
        ("single_network", {"single_network": True}))
    for both in (False, True)
] + [
    # `shared` (W2 weighted by b a / mean(b a)): the main job's single
    # network, once plain and once clipped with momentum, and its a = 1
    # ablation on separate networks.
    ("shared_single_network_plain",
     {"lfm_objective": "shared", "single_network": True}, False, False),
    ("shared_single_network_clipped_momentum",
     {"lfm_objective": "shared", "single_network": True}, True, True),
    ("shared_separate_without_mistakes",
     {"lfm_objective": "shared", "mistake_weighting": "none"}, False, False),
    ("normalised_b_shared_single_network_clipped_momentum",
     {"lfm_objective": "shared", "single_network": True,
      "example_weight_normalization": "batch_mean"}, True, True),
    # B per class under the main job's objective.
    ("class_weights_shared_single_network",
     {"lfm_objective": "shared", "single_network": True,
      "example_weight_granularity": "class"}, False, False),
]


def _chained_model(mode, overrides, momentum, clipped, **extra):
    """A model for one `_CHAINED_CASES` case; with `clipped`, checks that
    both steps' clips bind."""
    if momentum:
        extra.update(momentum=0.9, weight_decay=0.05)
    else:
        extra.update(momentum=0.0)
    model = _build(hypergradient=mode, grad_clip_norm=0.05 if clipped
                   else None, **overrides, **extra)
    if momentum:
        # Zero buffers would make momentum a no-op on the first step.
        rng = np.random.default_rng(5)
        for sgd in (model.sgd, model.w2_sgd):
            sgd.nesterov = True
            for m in sgd.momenta:
                m.assign(rng.normal(scale=0.1, size=m.shape))
    if clipped:
        train, meta = _batches()
        w1_step, _, w2_step, _ = model.run_stages(train, meta)
        assert bool(model.sgd.clip_binds(w1_step.grads))
        assert bool(model.w2_sgd.clip_binds(w2_step.grads))
    return model


def _heads_only_step(model, learner, sgd, params, batch, weights):
    """`LFM._unrolled_step` in which only the head moves with B or a: the
    trunk's gradient (and so its share of the clip norm) and its W' are
    constants."""
    k = learner.num_trunk_variables
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses, out = learner.train_losses(params, batch["image"],
                                           batch["label"])
        loss = tf.reduce_mean(tf.cast(weights, losses.dtype) * losses)
    grads = tape.gradient(loss, params)
    grads = [tf.stop_gradient(g) for g in grads[:k]] + list(grads[k:])
    new_params, new_momenta = sgd.unroll(params, grads, model.step_counter)
    frozen = [tf.stop_gradient(p) for p in new_params[:k]]
    return lfm.Step(frozen + list(new_params[k:]), new_momenta, out.states,
                    loss, out.logits, out.features, grads)


class LfmHypergradientTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    def _errors(self, model, objective, h=1e-5):
        train, meta = _batches()
        grads = model.hypergradients(train, meta)[-1]
        variables = model.hyper_variables()
        errors = []
        for k, position in _checked_entries(model):
            analytic = tf.convert_to_tensor(grads[k]).numpy().reshape(-1)
            numeric = testing.central_difference(
                objective, variables[k], position, h)
            errors.append(
                abs(analytic[position] - numeric) / max(abs(numeric), 1e-8))
        return np.array(errors)

    def _objective(self, model):
        train, meta = _batches()
        return lambda: model.run_stages(train, meta)[-1]

    @parameterized.named_parameters(
        ("separate_networks", {}),
        ("parameter_sharing", {"encoder": "shared"}),
        ("single_network", {"single_network": True}),
        ("cosine_positional", {"similarity": "cosine",
                               "weighting_mode": "positional",
                               "meta_batch_size": META_BATCH}),
        ("l2_without_x", {"similarity": "l2", "use_similarity": False}),
        # The objectives (README, "LFM objectives") and the a = 1 ablation.
        ("shared_objective", {"lfm_objective": "shared"}),
        ("shared_without_mistakes", {"lfm_objective": "shared",
                                     "mistake_weighting": "none"}),
        ("shared_single_network", {"lfm_objective": "shared",
                                   "single_network": True}),
        ("both_objective", {"lfm_objective": "both"}),
        ("both_parameter_sharing", {"lfm_objective": "both",
                                    "encoder": "shared"}),
        # The mistake term's knobs (README, "The mistake term").
        # B per class (b_i = B[y_i]): its gradient sums over a class.
        ("class_weights", {"example_weight_granularity": "class"}),
        ("class_weights_shared_single_network",
         {"example_weight_granularity": "class", "lfm_objective": "shared",
          "single_network": True, "mistake_centering": True,
          "mistake_temperature": 0.1}),
        # Stage 1 weighted by b / mean_batch(b): B's scale drops out.
        ("normalised_b_shared_single_network",
         {"example_weight_normalization": "batch_mean",
          "lfm_objective": "shared", "single_network": True}),
        ("class_mistakes_temperature", {"mistake_signal": "class",
                                        "mistake_temperature": 0.3,
                                        "mistake_centering": True,
                                        "weighting_init": 2.0,
                                        "single_network": True}),
        # The main job's LFM on the normalised head LDAM is defined on.
        ("cosine_head_shared_single_network",
         {"head": "cosine", "head_scale": 5.0, "lfm_objective": "shared",
          "single_network": True}),
        # Clipping shrinks the gradients ~100x: a larger step keeps the
        # central difference above round-off, at ~1e-6 truncation error.
        ("with_clipping", {"grad_clip_norm": 0.05}, 1e-4, 1e-5),
    )
    def test_exact_matches_finite_differences(self, overrides, h=1e-5,
                                              tolerance=1e-6):
        model = _build(hypergradient="exact", **overrides)
        errors = self._errors(model, self._objective(model), h)
        self.assertLess(errors.max(), tolerance, errors)

    @parameterized.named_parameters(
        ("separate", {}), ("parameter_sharing", {"encoder": "shared"}),
        ("single_network", {"single_network": True}))
    def test_finite_difference_method_is_close(self, overrides):
        # DARTS' step (0.01 / |v|) crosses ReLU kinks of this tiny net, so
        # its error is a few percent (2 %, 14 %, 7 % measured), not
        # O(eps^2).
        model = _build(hypergradient="finite_difference", **overrides)
        errors = self._errors(model, self._objective(model))
        self.assertLess(errors.max(), 0.2, errors)

    @parameterized.named_parameters(*_CHAINED_CASES)
    def test_finite_difference_matches_the_full_objective(
            self, overrides, momentum, clipped):
        """Each case against central differences of the whole three-stage
        objective. A step of 1e-5 / |v| keeps the mixed terms' central
        differences off this tiny net's ReLU kinks, which DARTS' 0.01
        crosses (`test_finite_difference_method_is_close`)."""
        model = _chained_model("finite_difference", overrides, momentum,
                               clipped, fd_epsilon=1e-5)
        errors = self._errors(model, self._objective(model),
                              1e-4 if clipped else 1e-5)
        self.assertLess(errors.max(), 2e-5 if clipped else 1e-6, errors)

    @parameterized.named_parameters(*_CHAINED_CASES)
    def test_first_order_is_exact_when_only_heads_move(
            self, overrides, momentum, clipped):
        """first_order = the exact gradient of the objective in which only
        the heads move: the unrolled trunks do not depend on B or a, and
        the trunk gradients' share of each clip norm is a constant."""
        train, meta = _batches()
        got = _chained_model("first_order", overrides, momentum,
                             clipped).hypergradients(train, meta)[-1]
        reference = _chained_model("exact", overrides, momentum, clipped)
        reference._unrolled_step = functools.partial(_heads_only_step,
                                                     reference)
        expected = reference.hypergradients(train, meta)[-1]
        for g, e in zip(got, expected):
            self.assertAllClose(g, e, rtol=1e-8, atol=1e-14)
        self.assertGreater(float(tf.reduce_max(tf.abs(got[0]))), 0.0)

    @parameterized.named_parameters(
        ("finite_difference_clip", "finite_difference", {}, "_through_clip"),
        ("first_order_clip", "first_order", {}, "_through_clip"),
        ("finite_difference_start", "finite_difference",
         {"encoder": "shared"}, "_hessian_product"),
        ("first_order_start", "first_order", {"single_network": True},
         "_hessian_product"),
    )
    def test_each_jacobian_is_needed(self, mode, overrides, removed):
        """Without the clip's Jacobian (or W2's start Hessian) B's gradient
        is far from its reference, the exact one (checked against central
        differences above) or first_order's heads-only one: the tests above
        would catch the removal."""
        train, meta = _batches()
        model = _chained_model(mode, overrides, True, True, fd_epsilon=1e-5)
        if removed == "_through_clip":
            model._through_clip = lambda learner, sgd, step, v, head: v
        else:
            model._hessian_product = (
                lambda start, step, batch, a, u, head: [
                    tf.zeros_like(x) for x in u])
        got = model.hypergradients(train, meta)[-1][0]
        reference = _chained_model("exact", overrides, True, True)
        if mode == "first_order":
            reference._unrolled_step = functools.partial(_heads_only_step,
                                                         reference)
        expected = reference.hypergradients(train, meta)[-1][0]
        error = np.abs(got - expected).max() / np.abs(expected).max()
        self.assertGreater(error, 1e-2)


class LfmObjectiveTest(tf.test.TestCase):
    """Each `--lfm_objective` computes its documented equation."""

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    def test_shared_weights_w2_by_normalised_b_times_a(self):
        model = _build(lfm_objective="shared")
        train, meta = _batches()
        a = model.weigh_mistakes(train, meta, model.learn(train).params)
        b = model.example_weight_table.values.numpy()[train["index"]]
        expected = b * a.numpy() / np.mean(b * a.numpy())
        self.assertAllClose(model.relearn_weights(train, a), expected)

    def test_class_weights_are_b_of_the_observed_label(self):
        """Per-class B: one entry per class, b_i = B[y_i] in both steps,
        its hypergradient the sum of the per-example model's over each
        class's examples, and by position it expands by the labels."""
        train, meta = _batches()
        per_class = _build(lfm_objective="shared",
                           example_weight_granularity="class")
        self.assertEqual(per_class.example_weight_table.size, CLASSES)
        values = per_class.example_weight_table.values.numpy()
        a = per_class.weigh_mistakes(train, meta,
                                     per_class.learn(train).params)
        b = values[train["label"].numpy()]
        self.assertAllClose(per_class.relearn_weights(train, a),
                            b * a.numpy() / np.mean(b * a.numpy()))
        # The per-example model with B_i = B[y_i] takes the same steps.
        per_example = _build(lfm_objective="shared")
        labels = np.zeros(NUM_TRAIN, np.int64)
        labels[train["index"].numpy()] = train["label"].numpy()
        per_example.example_weight_table.values.assign(values[labels])
        # _build's random r depends on B's length: take the same r.
        per_example.weighting_table.values.assign(
            per_class.weighting_table.values)
        self.assertAllClose(per_example.example_weights_by_position(labels),
                            per_class.example_weights_by_position(labels))
        grads_class = per_class.hypergradients(train, meta)[-1][0].numpy()
        grads_example = per_example.hypergradients(train, meta)[-1][0]
        per_example_rows = tf.gather(grads_example, train["index"]).numpy()
        expected = np.bincount(train["label"].numpy(),
                               weights=per_example_rows, minlength=CLASSES)
        self.assertAllClose(grads_class, expected)
        self.assertGreater(np.abs(grads_class).min(), 0.0)

    def test_normalised_b_ranks_without_scaling_the_step(self):
        train, meta = _batches()
        for mode, scale_matters in (("none", True), ("batch_mean", False)):
            model = _build(lfm_objective="shared",
                           example_weight_normalization=mode)
            before = model.run_stages(train, meta)[-1].numpy()
            table = model.example_weight_table.values
            table.assign(3.0 * table)
            after = model.run_stages(train, meta)[-1].numpy()
            self.assertEqual(abs(after - before) > 1e-6, scale_matters, mode)
        self.assertAllClose(tf.reduce_mean(model.learn_weights(train)), 1.0)

    def test_both_adds_w1_validation_loss(self):
        train, meta = _batches()
        paper = _build().run_stages(train, meta)[-1]
        model = _build(lfm_objective="both")
        w1_params = model.learn(train).params
        u, _ = model.w1.losses(w1_params, meta["image"], meta["label"])
        self.assertAllClose(model.run_stages(train, meta)[-1],
                            paper + tf.reduce_mean(u))

    def test_no_mistake_weighting_is_a_equals_one(self):
        model = _build(mistake_weighting="none", lfm_objective="shared")
        train, meta = _batches()
        a = model.run_stages(train, meta)[1]
        self.assertAllEqual(a, np.ones(BATCH))

    def test_chained_modes_refuse_both(self):
        for mode in ("first_order", "finite_difference"):
            with self.assertRaisesRegex(
                    ValueError, "lfm_objective='both' with hypergradient="
                    "'%s'.*--hypergradient=exact" % mode):
                _build(lfm_objective="both", hypergradient=mode)

    def test_ensemble_is_the_mean_of_both_learners_logits(self):
        model = _build(evaluate_learner="ensemble")
        images = _batches()[1]["image"]
        w1 = model.classifier(images)
        w2 = model.w2_head(model.w2_trunk(images))
        self.assertAllClose(model(images), (w1 + w2) / 2)
        # What train_lib exports: one model with the same logits.
        config = config_lib.ExperimentConfig(
            model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        ).replace(evaluate_learner="ensemble").validate()
        facts = factory.DataFacts(
            num_classes=CLASSES, input_shape=(SIDE, SIDE, 3),
            num_train=NUM_TRAIN, num_meta=NUM_META)
        exported = train_lib.evaluated_classifier(model, config, facts)
        self.assertAllClose(exported(images), (w1 + w2) / 2)


class LfmDiagnosticsTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    @parameterized.named_parameters(
        ("no_clip", {}),
        # The chain rule of `w1_validation_gradient` passes the clip's
        # Jacobian; a larger step keeps the difference above round-off.
        ("clip_binds", {"grad_clip_norm": 0.05}, 1e-4),
        # Both gradients pass back through stage 1's normalisation.
        ("normalised_b", {"example_weight_normalization": "batch_mean"}),
    )
    def test_alignment_is_the_cosine_with_w1_validation_gradient(
            self, overrides, h=1e-5):
        model = _build(diagnostics_every=2, **overrides)
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        b_grad = model.hypergradients(train, meta)[-1][0].numpy()

        def w1_validation_loss():
            params = model.learn(train).params
            losses, _ = model.w1.losses(params, meta["image"], meta["label"])
            return tf.reduce_mean(losses)

        # grad_B L_val(W1') by central differences; zero off the batch.
        direct = np.zeros(NUM_TRAIN)
        for k in train["index"].numpy():
            direct[k] = testing.central_difference(
                w1_validation_loss, model.example_weight_table.values, k, h)
        expected = b_grad @ direct / (
            np.linalg.norm(b_grad) * np.linalg.norm(direct))
        logs = model.train_step({"train": train, "meta": meta})
        self.assertAllClose(logs["b_alignment"], expected, atol=1e-6)
        self.assertAllClose(logs["b_grad_norm"], np.linalg.norm(b_grad),
                            rtol=1e-5)
        # Step 1 is not due (every 2): the last alignment is held.
        logs = model.train_step({"train": train, "meta": meta})
        self.assertAllClose(logs["b_alignment"], expected, atol=1e-6)

    def test_head_and_tail_weights_follow_the_class_counts(self):
        # Class 2 has fewer training examples than the median: tail.
        keras.utils.set_random_seed(0)
        config = config_lib.ExperimentConfig(
            model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        ).replace(grad_clip_norm=None).validate()
        model = factory.build_method(config, factory.DataFacts(
            num_classes=CLASSES, input_shape=(SIDE, SIDE, 3),
            num_train=NUM_TRAIN, num_meta=NUM_META,
            class_counts=np.array([4, 5, 1])))
        model.example_weight_table.values.assign(np.arange(NUM_TRAIN) / 10)
        factory.compile_method(model, config)
        train, meta = _batches()
        logs = model.train_step({"train": train, "meta": meta})
        # Labels [0, 1, 2, 0, 1] at indices [3, 0, 7, 5, 9]; B is read
        # after its update, so compare with the table as it is now.
        b = model.example_weight_table.values.numpy()
        self.assertAllClose(logs["b_tail"], b[7], rtol=1e-5)
        self.assertAllClose(logs["b_head"], np.mean(b[[3, 0, 5, 9]]),
                            rtol=1e-5)


class LfmStageTest(tf.test.TestCase):

    def _snapshot(self, variables):
        return [v.numpy().copy() for v in variables]

    def test_stages_are_pure_and_each_update_touches_its_own_variables(self):
        model = _build()
        train, meta = _batches()
        groups = {
            "w1": model.w1.variables,
            "w2": model.w2.variables,
            "b": [model.example_weight_table.values],
            "r": [model.weighting_table.values],
            "v": model.encoder.trainable_variables,
        }
        before = {k: self._snapshot(v) for k, v in groups.items()}
        w1_step, a, w2_step, _, grads = model.hypergradients(train, meta)
        for name, variables in groups.items():
            for old, new in zip(before[name], variables):
                self.assertAllEqual(old, new.numpy())

        self.assertEqual(a.shape, (BATCH,))
        self.assertAllInRange(a, 0.0, 1.0)

        model.apply_hypergradients(grads)
        for name in ("w1", "w2"):
            for old, new in zip(before[name], groups[name]):
                self.assertAllEqual(old, new.numpy())
        for name in ("b", "r", "v"):
            changed = [
                not np.array_equal(o, n.numpy())
                for o, n in zip(before[name], groups[name])
            ]
            self.assertTrue(any(changed), name)
        b_changed = np.flatnonzero(
            before["b"][0] != model.example_weight_table.values.numpy())
        self.assertAllEqual(sorted(b_changed), sorted([3, 0, 7, 5, 9]))
        r_changed = np.flatnonzero(
            before["r"][0] != model.weighting_table.values.numpy())
        self.assertAllEqual(sorted(r_changed), sorted([2, 5, 0, 1]))
        self.assertEqual(model.weighting_table.size, NUM_META)

        model.commit(w1_step, w2_step)
        for variable, value in zip(model.w1.variables, w1_step.params):
            self.assertAllClose(variable, value)
        for variable, value in zip(model.w2.variables, w2_step.params):
            self.assertAllClose(variable, value)

    def test_positional_r_needs_matching_meta_batch(self):
        model = _build(weighting_mode="positional", meta_batch_size=7)
        train, meta = _batches()
        with self.assertRaisesRegex(ValueError, "meta_batch_size=7"):
            model.hypergradients(train, meta)

    def test_train_step_reports_metrics(self):
        model = _build()
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        logs = model.train_step({"train": train, "meta": meta})
        for key in ("w1_loss", "w2_loss", "val_loss", "a_mean", "b_mean",
                    "a_corrupted", "b_clean", "accuracy", "b_grad_norm",
                    "b_alignment", "a_head", "a_tail", "b_head", "b_tail",
                    "w1_clip_fraction", "w2_clip_fraction"):
            self.assertIn(key, logs)
            self.assertTrue(np.isfinite(float(logs[key])), key)
        self.assertEqual(int(model.step_counter.numpy()), 1)
        # No clip here (_build): it never binds.
        self.assertEqual(float(logs["w1_clip_fraction"]), 0.0)

    def test_clip_fraction_counts_binding_steps(self):
        model = _build(grad_clip_norm=0.05)
        factory.compile_method(model, config_lib.ExperimentConfig())
        train, meta = _batches()
        logs = model.train_step({"train": train, "meta": meta})
        self.assertEqual(float(logs["w1_clip_fraction"]), 1.0)
        self.assertEqual(float(logs["w2_clip_fraction"]), 1.0)


if __name__ == "__main__":
    tf.test.main()
