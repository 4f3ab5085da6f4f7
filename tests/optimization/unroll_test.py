"""The functional SGD step: PyTorch's formula, and unroll == real step."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf.optimization import unroll


class SgdStepTest(tf.test.TestCase):

    def test_matches_hand_computed_momentum_and_decay(self):
        w, g, m = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array(
            [0.1, 0.0])
        new_w, new_m = unroll.sgd_step(
            [tf.constant(w)], [tf.constant(g)], [tf.constant(m)],
            learning_rate=0.1, momentum=0.9, weight_decay=0.01,
        )
        d = g + 0.01 * w
        expected_m = 0.9 * m + d
        self.assertAllClose(new_m[0], expected_m)
        self.assertAllClose(new_w[0], w - 0.1 * expected_m)

    def test_nesterov(self):
        w, g, m = np.array([1.0]), np.array([2.0]), np.array([1.0])
        new_w, _ = unroll.sgd_step(
            [tf.constant(w)], [tf.constant(g)], [tf.constant(m)], 0.5,
            momentum=0.5, nesterov=True,
        )
        m_new = 0.5 * 1.0 + 2.0
        self.assertAllClose(new_w[0], [1.0 - 0.5 * (2.0 + 0.5 * m_new)])

    def test_clipping_uses_global_norm(self):
        g = [tf.constant([3.0]), tf.constant([4.0])]
        new_w, _ = unroll.sgd_step(
            [tf.zeros([1]), tf.zeros([1])], g, [tf.zeros([1])] * 2, 1.0,
            momentum=0.0, clip_norm=1.0,
        )
        self.assertAllClose([new_w[0][0], new_w[1][0]], [-0.6, -0.8])

    def test_clip_matches_tensorflow_and_has_a_finite_derivative_at_zero(
            self):
        grads = [tf.constant([3.0, -4.0]), tf.constant([[12.0]])]
        for clip in (5.0, 13.0, 100.0):  # Binding, at the norm, not binding.
            expected, _ = tf.clip_by_global_norm(grads, clip)
            for got, want in zip(unroll.clip_by_global_norm(grads, clip),
                                 expected):
                self.assertAllClose(got, want)
        # An all-zero gradient (a batch fitted to float precision): the
        # clip does not bind, so d W'/d g is -lr I, finite. Through
        # tf.clip_by_global_norm it is NaN.
        zeros = [tf.zeros([2]), tf.zeros([1, 1])]
        with tf.GradientTape() as tape:
            tape.watch(zeros)
            new, _ = unroll.sgd_step(
                [tf.ones([2]), tf.ones([1, 1])], zeros,
                [tf.zeros([2]), tf.zeros([1, 1])], learning_rate=0.1,
                momentum=0.0, clip_norm=5.0)
            total = tf.add_n([tf.reduce_sum(w) for w in new])
        for d in tape.gradient(total, zeros):
            self.assertAllClose(d, -0.1 * tf.ones_like(d))

    def test_none_gradient_is_zero(self):
        new_w, _ = unroll.sgd_step(
            [tf.constant([1.0])], [None], [tf.constant([0.0])], 0.1,
            momentum=0.0,
        )
        self.assertAllClose(new_w[0], [1.0])


class FunctionalSgdTest(tf.test.TestCase):

    def test_assigning_the_unroll_is_the_step(self):
        variable = tf.Variable([1.0, 2.0])
        sgd = unroll.FunctionalSGD(0.1, momentum=0.9, weight_decay=0.1)
        sgd.build_slots([variable])
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(variable))
            grads = tape.gradient(loss, [variable])
            new_params, new_momenta = sgd.unroll([variable], grads, 0)
            sgd.assign([variable], new_params, new_momenta)
        # Same three steps by hand.
        w, m = np.array([1.0, 2.0]), np.zeros(2)
        for _ in range(3):
            d = 2 * w + 0.1 * w
            m = 0.9 * m + d
            w = w - 0.1 * m
        self.assertAllClose(variable, w)
        self.assertAllClose(sgd.momenta[0], m)

    def test_cosine_schedule(self):
        sgd = unroll.FunctionalSGD(1.0, schedule="cosine", total_steps=10)
        self.assertAllClose(sgd.learning_rate(0), 1.0)
        self.assertAllClose(sgd.learning_rate(5), 0.5)
        self.assertAllClose(sgd.learning_rate(10), 0.0, atol=1e-7)

    def test_warmup(self):
        lr = unroll.cosine_learning_rate(1.0, 0, 10, warmup_steps=4)
        self.assertAllClose(lr, 0.25)


class StepJacobianTest(tf.test.TestCase, parameterized.TestCase):
    """The Jacobians the chained hypergradients use, against autodiff of
    `sgd_step` itself (float64)."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.grads = [tf.constant(rng.normal(size=3)),
                      tf.constant(rng.normal(size=(2, 2)))]
        self.vectors = [tf.constant(rng.normal(size=3)),
                        tf.constant(rng.normal(size=(2, 2)))]

    @parameterized.named_parameters(("binding", 0.05), ("not_binding", 50.0),
                                    ("off", None))
    def test_clip_jacobian_matches_autodiff(self, clip_norm):
        with tf.autodiff.ForwardAccumulator(self.grads, self.vectors) as acc:
            clipped = (self.grads if clip_norm is None else
                       tf.clip_by_global_norm(self.grads, clip_norm)[0])
            clipped = [tf.identity(c) for c in clipped]
        expected = acc.jvp(clipped)
        got = unroll.clip_jacobian_vector_product(self.grads, self.vectors,
                                                  clip_norm)
        for g, e in zip(got, expected):
            self.assertAllClose(g, e, rtol=1e-12, atol=1e-14)
        self.assertEqual(bool(unroll.clip_binds(self.grads, clip_norm)),
                         clip_norm == 0.05)

    @parameterized.named_parameters(("plain", 0.0, False, 0.0),
                                    ("momentum_decay", 0.9, False, 0.05),
                                    ("nesterov_decay", 0.9, True, 0.05))
    def test_step_jacobians_match_autodiff(self, momentum, nesterov, decay):
        """dW'/dg = -s J_clip and (dW'/dW)^T v = v - s (wd v + H J_clip v),
        for W' = step(W, grad f(W)) with f(W) = sum(W^4) / 4 (H diagonal)."""
        sgd = unroll.FunctionalSGD(0.3, momentum=momentum,
                                   weight_decay=decay, nesterov=nesterov,
                                   clip_norm=0.5)
        params = self.grads
        momenta = [0.1 * v for v in self.vectors]
        with tf.GradientTape() as outer:
            outer.watch(params)
            with tf.GradientTape() as inner:
                inner.watch(params)
                loss = tf.add_n([tf.reduce_sum(p ** 4) for p in params]) / 4
            grads = inner.gradient(loss, params)
            new_params, _ = sgd.unroll(params, grads, 0, momenta)
            pulled = tf.add_n([tf.reduce_sum(w * v) for w, v in
                               zip(new_params, self.vectors)])
        expected = outer.gradient(pulled, params)
        self.assertTrue(bool(sgd.clip_binds(grads)))
        clipped = sgd.clip_jvp(grads, self.vectors)
        hessian = [3 * p ** 2 * u for p, u in zip(params, clipped)]
        got = sgd.start_vjp(self.vectors, hessian, 0, tf.float64)
        for g, e in zip(got, expected):
            self.assertAllClose(g, e, rtol=1e-12, atol=1e-14)

    def test_float64_learning_rate_is_not_rounded_to_float32(self):
        sgd = unroll.FunctionalSGD(0.1, schedule="cosine", total_steps=10)
        self.assertEqual(float(sgd.learning_rate(0, tf.float64)), 0.1)
        self.assertEqual(sgd.step_scale(0, tf.float64).dtype, tf.float64)


if __name__ == "__main__":
    tf.test.main()
