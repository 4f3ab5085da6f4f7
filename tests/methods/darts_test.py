"""DARTS and LFM-DARTS: architecture gradients against finite differences.

Float64, on a tiny supernet (2 nodes, 4 candidate ops, 3 cells, 8x8 images)
built by the same factory the search pipeline uses. The objective whose
central differences are taken is the true unrolled one: the validation loss
after the virtual step(s), recomputed from scratch at α +- h.
"""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf.methods import factory
from lfm_tf.methods import search_factory

CLASSES, SIDE, BATCH = 3, 8, 4
PRIMITIVES = "none,max_pool_3x3,skip_connect,sep_conv_3x3"


def _config(method, **overrides):
    overrides.setdefault("grad_clip_norm", None)
    overrides.setdefault("encoder", "small_cnn")
    return config_lib.ExperimentConfig().replace(
        method=method, search_channels=4, search_cells=3, search_steps=2,
        search_primitives=PRIMITIVES, w1_learning_rate=0.5,
        w2_learning_rate=0.5, lr_schedule="constant", weight_decay=0.0,
        momentum=0.0, weighting_mode="positional", meta_batch_size=BATCH,
        **overrides).validate()


def _build(method, **overrides):
    facts = factory.DataFacts(num_classes=CLASSES,
                              input_shape=(SIDE, SIDE, 3), num_train=8,
                              num_meta=8, steps_per_epoch=1)
    keras.utils.set_random_seed(0)
    model = search_factory.build_search_method(_config(method, **overrides),
                                               facts)
    rng = np.random.default_rng(1)
    # Logits far from uniform, so every op's weight matters.
    for variable in model.arch_step.variables:
        variable.assign(rng.normal(scale=0.5, size=variable.shape))
    return model


def _batches():
    rng = np.random.default_rng(0)
    train = {"image": tf.constant(rng.normal(size=(BATCH, SIDE, SIDE, 3))),
             "label": tf.constant([0, 1, 2, 1]),
             "clean_label": tf.constant([0, 1, 2, 1]),
             "index": tf.constant([0, 1, 2, 3])}
    meta = {"image": tf.constant(rng.normal(size=(BATCH, SIDE, SIDE, 3))),
            "label": tf.constant([2, 0, 1, 0]),
            "index": tf.constant([0, 1, 2, 3])}
    return train, meta


# (α variable: 0 normal / 1 reduce, flat entry).
ENTRIES = [(0, 0), (0, 11), (1, 3), (1, 14)]


class DartsGradientTest(tf.test.TestCase, parameterized.TestCase):

    def test_second_order_gradient_matches_finite_differences(self):
        with testing.float64():
            model = _build("darts", arch_order="second")
            train, meta = _batches()
            _, grads = model.architecture_gradient(train, meta)

            def objective():
                return model.architecture_gradient(train, meta)[0]

            for which, position in ENTRIES:
                variable = model.arch_step.variables[which]
                expected = testing.central_difference(objective, variable,
                                                      position)
                got = grads[which].numpy().reshape(-1)[position]
                self.assertAllClose(got, expected, rtol=1e-5, atol=1e-9)

    def test_second_order_differs_from_first_order(self):
        # The unrolled term must matter, or the test above proves nothing.
        with testing.float64():
            model = _build("darts", arch_order="second")
            train, meta = _batches()
            second = model.architecture_gradient(train, meta)[1]
            model.second_order = False
            first = model.architecture_gradient(train, meta)[1]
            gap = np.abs(second[0].numpy() - first[0].numpy()).max()
            self.assertGreater(gap, 1e-3 * np.abs(first[0].numpy()).max())

    def test_rejects_finite_differences(self):
        with self.assertRaisesRegex(ValueError, "expected `exact`"):
            _build("darts", hypergradient="finite_difference")

    def test_first_order_is_the_direct_gradient(self):
        with testing.float64():
            model = _build("darts", arch_order="first")
            train, meta = _batches()
            _, grads = model.architecture_gradient(train, meta)
            variable = model.arch_step.variables[1]

            def objective():
                return model.architecture_gradient(train, meta)[0]

            expected = testing.central_difference(objective, variable, 5)
            self.assertAllClose(grads[1].numpy().reshape(-1)[5], expected,
                                rtol=1e-6)

    def test_train_step_updates_alpha_then_weights(self):
        model = _build("darts")
        train, meta = _batches()
        train = {k: tf.cast(v, tf.float32) if v.dtype == tf.float64 else v
                 for k, v in train.items()}
        meta = {k: tf.cast(v, tf.float32) if v.dtype == tf.float64 else v
                for k, v in meta.items()}
        alpha = model.architecture.arch_normal.numpy()
        weights = model.learner.variables[0].numpy()
        logs = model.train_step({"train": train, "meta": meta})
        self.assertNotAllClose(model.architecture.arch_normal.numpy(), alpha)
        self.assertNotAllClose(model.learner.variables[0].numpy(), weights)
        self.assertTrue(np.isfinite(float(logs["val_loss"])))
        # α is not among the weights the SGD steps (own optimizer, decay).
        ids = {id(v) for v in model.learner.variables}
        self.assertNotIn(id(model.architecture.arch_normal), ids)


class LfmDartsGradientTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(("small_cnn", "paper"), ("shared", "paper"),
                              ("small_cnn", "both"))
    def test_alpha_gradient_through_both_steps(self, encoder,
                                               lfm_objective):
        with testing.float64():
            model = _build("lfm_darts", encoder=encoder,
                           lfm_objective=lfm_objective)
            train, meta = _batches()
            grads = model.hypergradients(train, meta)[-1]

            def objective():
                return model.run_stages(train, meta)[-1]

            # The objective is strongly curved under PS; 2e-4 still fails
            # by orders of magnitude if any path to α were missing.
            for which, position in (ENTRIES[0], ENTRIES[3]):
                variable = model.arch_step.variables[which]
                expected = testing.central_difference(objective, variable,
                                                      position)
                got = grads[which].numpy().reshape(-1)[position]
                self.assertAllClose(got, expected, rtol=2e-4, atol=1e-9)
            # r as well: the weighting of mistakes is learned.
            r = model.weighting_table.values
            self.assertAllClose(
                grads[2].numpy()[1],
                testing.central_difference(objective, r, 1), rtol=2e-4,
                atol=1e-9)

    def test_rejects_inexact_hypergradients(self):
        with self.assertRaisesRegex(ValueError, "hypergradient=exact"):
            _build("lfm_darts", hypergradient="finite_difference")

    def test_rejects_what_a_search_cannot_mean(self):
        with self.assertRaisesRegex(ValueError, "lfm_objective=both"):
            _build("lfm_darts", lfm_objective="shared")
        with self.assertRaisesRegex(ValueError, "evaluate_learner=w1"):
            _build("lfm_darts", evaluate_learner="ensemble")


if __name__ == "__main__":
    tf.test.main()
