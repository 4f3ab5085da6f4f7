"""Directional derivatives <grad l_i(W), v> by all three methods."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf.optimization import hypergradients


def _losses(params, x, y):
    """Per-example squared error of a tanh-linear model, float64 [n]."""
    w, b = params
    return tf.square(tf.tanh(tf.linalg.matvec(x, w) + b) - y)


class DirectionalDerivativeTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.x = tf.constant(rng.normal(size=(6, 4)))
        self.y = tf.constant(rng.normal(size=6))
        self.params = [tf.constant(rng.normal(size=4)), tf.constant(0.3,
                                                                     tf.float64)]
        self.direction = [tf.constant(rng.normal(size=4)),
                          tf.constant(-0.7, tf.float64)]

    def _reference(self):
        """Per-example gradients by explicit Jacobian, dotted with v."""
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(self.params)
            losses = _losses(self.params, self.x, self.y)
        jac_w = tape.jacobian(losses, self.params[0])
        jac_b = tape.jacobian(losses, self.params[1])
        return (tf.linalg.matvec(jac_w, self.direction[0])
                + jac_b * self.direction[1])

    @parameterized.parameters("exact", "forward")
    def test_exact_methods(self, method):
        got = hypergradients.directional_derivative(
            lambda p: _losses(p, self.x, self.y), self.params,
            self.direction, method)
        self.assertAllClose(got, self._reference(), rtol=1e-10, atol=1e-12)

    def test_finite_difference_is_second_order_accurate(self):
        reference = self._reference()
        errors = []
        for scale in (1e-1, 1e-2):
            got = hypergradients.directional_derivative(
                lambda p: _losses(p, self.x, self.y), self.params,
                self.direction, "finite_difference", fd_epsilon=scale)
            errors.append(float(tf.reduce_max(tf.abs(got - reference))))
        # Central differences: 10x smaller step -> ~100x smaller error.
        self.assertLess(errors[1], errors[0] / 50)
        self.assertLess(errors[1], 1e-4)

    def test_dense_head_closed_form(self):
        rng = np.random.default_rng(1)
        features = tf.constant(rng.normal(size=(5, 4)))
        labels = tf.constant([0, 2, 1, 1, 0])
        params = [tf.constant(rng.normal(size=(4, 3))),
                  tf.constant(rng.normal(size=3))]
        direction = [tf.constant(rng.normal(size=(4, 3))),
                     tf.constant(rng.normal(size=3))]

        def losses(p):
            logits = tf.matmul(features, p[0]) + p[1]
            return tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, logits)

        expected = hypergradients.directional_derivative(
            losses, params, direction, "exact")
        logits = tf.matmul(features, params[0]) + params[1]
        got = hypergradients.dense_head_directional_derivative(
            features, logits, labels, direction)
        self.assertAllClose(got, expected, rtol=1e-10)

    def test_hessian_vector_products(self):
        """Forward-over-backward and the dense head's closed form both equal
        H u from the explicit Hessian."""
        rng = np.random.default_rng(2)
        features = tf.constant(rng.normal(size=(5, 4)))
        labels = tf.constant([0, 2, 1, 1, 0])
        weights = tf.constant(rng.uniform(0.5, 1.5, 5))
        params = [tf.constant(rng.normal(size=(4, 3))),
                  tf.constant(rng.normal(size=3))]
        direction = [tf.constant(rng.normal(size=(4, 3))),
                     tf.constant(rng.normal(size=3))]

        def gradient(p):
            with tf.GradientTape() as tape:
                tape.watch(p)
                logits = tf.matmul(features, p[0]) + p[1]
                loss = tf.reduce_mean(
                    weights * tf.nn.sparse_softmax_cross_entropy_with_logits(
                        labels, logits))
            return tape.gradient(loss, p)

        with tf.GradientTape(persistent=True) as tape:
            tape.watch(params)
            grads = gradient(params)
        # Rows of the explicit Hessian, contracted with u.
        expected = []
        for g in grads:
            blocks = [tape.jacobian(g, p) for p in params]
            expected.append(tf.add_n([
                tf.tensordot(block, u, axes=len(u.shape))
                for block, u in zip(blocks, direction)]))
        del tape
        logits = tf.matmul(features, params[0]) + params[1]
        closed = hypergradients.dense_head_hessian_vector_product(
            features, logits, weights, direction)
        for g, e in zip(closed, expected):
            self.assertAllClose(g, e, rtol=1e-10, atol=1e-14)
        got = hypergradients.hessian_vector_product(gradient, params,
                                                    direction)
        for g, e in zip(got, expected):
            self.assertAllClose(g, e, rtol=1e-10, atol=1e-14)

    def test_unknown_method(self):
        with self.assertRaisesRegex(ValueError, "directional derivative"):
            hypergradients.directional_derivative(
                lambda p: _losses(p, self.x, self.y), self.params,
                self.direction, "magic")

    def test_weight_hypergradient_is_chain_rule(self):
        # L(W') with W' = W - eta * mean(c * l(W))'; dL/dc by autodiff.
        eta = 0.3
        c = tf.ones(6, tf.float64)
        with tf.GradientTape() as outer:
            outer.watch(c)
            with tf.GradientTape() as inner:
                inner.watch(self.params)
                loss = tf.reduce_mean(c * _losses(self.params, self.x, self.y))
            grads = inner.gradient(loss, self.params)
            stepped = [p - eta * g for p, g in zip(self.params, grads)]
            val = tf.reduce_sum(_losses(stepped, self.x[:3], -self.y[:3]))
        expected = outer.gradient(val, c)
        with tf.GradientTape() as tape:
            tape.watch(stepped)
            val = tf.reduce_sum(_losses(stepped, self.x[:3], -self.y[:3]))
        v = tape.gradient(val, stepped)
        got = hypergradients.weight_hypergradient(
            hypergradients.directional_derivative(
                lambda p: _losses(p, self.x, self.y), self.params, v),
            eta, 6)
        self.assertAllClose(got, expected, rtol=1e-10)


if __name__ == "__main__":
    tf.test.main()
