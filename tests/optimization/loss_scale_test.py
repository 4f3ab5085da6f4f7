"""The dynamic loss scale's pure functions and its disabled identity."""

import numpy as np
import tensorflow as tf

from lfm_tf.optimization import hypergradients
from lfm_tf.optimization import loss_scale


def _next(scale, good_steps, finite, **kwargs):
    new_scale, new_good = loss_scale.next_scale(
        tf.constant(scale, tf.float32), tf.constant(good_steps, tf.int64),
        tf.constant(finite), **kwargs)
    return float(new_scale), int(new_good)


class NextScaleTest(tf.test.TestCase):

    def test_finite_step_counts(self):
        self.assertEqual(_next(8.0, 3, True, growth_steps=10), (8.0, 4))

    def test_grows_after_growth_steps_finite_steps(self):
        self.assertEqual(_next(8.0, 9, True, growth_steps=10), (16.0, 0))

    def test_non_finite_halves_and_resets(self):
        self.assertEqual(_next(8.0, 9, False, growth_steps=10), (4.0, 0))

    def test_bounds(self):
        self.assertEqual(_next(1.0, 0, False), (loss_scale.MIN_SCALE, 0))
        self.assertEqual(
            _next(loss_scale.MAX_SCALE, 0, True, growth_steps=1),
            (loss_scale.MAX_SCALE, 0))

    def test_a_run_of_steps(self):
        scale, good = 4.0, 0
        for finite in (True, True, False, True, True, True):
            scale, good = _next(scale, good, finite, growth_steps=2)
        # 4 -> (1) -> 8 -> 4 -> (1) -> 8 -> (1)
        self.assertEqual((scale, good), (8.0, 1))


class HelpersTest(tf.test.TestCase):

    def test_all_finite(self):
        self.assertTrue(bool(loss_scale.all_finite(
            [tf.ones([2]), None, tf.zeros([3, 1])])))
        self.assertTrue(bool(loss_scale.all_finite([])))
        for bad in (np.inf, -np.inf, np.nan):
            self.assertFalse(bool(loss_scale.all_finite(
                [tf.ones([2]), tf.constant([1.0, bad])])))

    def test_unscale_and_select(self):
        grads = loss_scale.unscale([tf.constant([4.0, 8.0]), None], 4.0)
        self.assertAllEqual(grads[0], [1.0, 2.0])
        self.assertIsNone(grads[1])
        new, old = [tf.constant([1.0])], [tf.constant([2.0])]
        self.assertAllEqual(loss_scale.select(True, new, old)[0], [1.0])
        self.assertAllEqual(loss_scale.select(False, new, old)[0], [2.0])

    def test_scaled_gradient_is_the_gradient(self):
        x = tf.constant([1.0, -2.0])
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = tf.reduce_sum(x ** 3)
            vector = x ** 2
        self.assertAllClose(
            loss_scale.scaled_gradient(tape, y, [x], 1024.0)[0], 3 * x ** 2)
        self.assertAllClose(
            loss_scale.scaled_gradient(tape, vector, [x], 1024.0,
                                       output_gradients=[0.5, 1.0])[0],
            [1.0, -4.0])

    def test_scaled_gradient_survives_float16_underflow(self):
        # d/dx of 1e-8 * sum(tanh(x)) crosses a float16 op: 1e-8 is below
        # float16's smallest subnormal (6e-8), 1e-8 * 2^15 is not.
        x = tf.constant([0.1, 0.5, 1.0])

        def loss():
            return 1e-8 * tf.reduce_sum(tf.cast(
                tf.tanh(tf.cast(x, tf.float16)), tf.float32))

        expected = 1e-8 * (1.0 - np.tanh(x.numpy()) ** 2)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            value = loss()
        self.assertAllEqual(tape.gradient(value, x), [0.0, 0.0, 0.0])
        self.assertAllClose(
            loss_scale.scaled_gradient(tape, value, [x], 2.0**15)[0],
            expected, rtol=2e-3)

    def test_gradient_through_an_unrolled_step_is_unchanged(self):
        # W' = W - lr * grad(S * L)/S inside an outer tape: the outer
        # gradient (second order included) is the unscaled one.
        w = tf.Variable([0.5, -1.5])

        def outer(scale):
            with tf.GradientTape() as outer_tape:
                with tf.GradientTape() as inner:
                    inner_loss = tf.reduce_sum(w ** 3)
                grad, = loss_scale.scaled_gradient(inner, inner_loss, [w],
                                                   scale)
                stepped = w - 0.1 * grad
                value = tf.reduce_sum(stepped ** 2)
            return loss_scale.scaled_gradient(outer_tape, value, [w],
                                              scale)[0]

        self.assertAllClose(outer(1024.0), outer(1.0))
        # d/dw (w - 0.3 w^2)^2 = 2 (w - 0.3 w^2)(1 - 0.6 w)
        w0 = w.numpy()
        self.assertAllClose(outer(1024.0),
                            2 * (w0 - 0.3 * w0 ** 2) * (1 - 0.6 * w0))


class DynamicLossScaleTest(tf.test.TestCase):

    def test_disabled_is_the_identity_without_state(self):
        scale = loss_scale.DynamicLossScale(False)
        self.assertEmpty(scale.variables)
        self.assertEqual(float(scale.scale), 1.0)
        self.assertEqual(scale.logs(), {})
        self.assertIsNone(scale.snapshot([tf.Variable(1.0)]))
        new = [tf.constant(1.0)]
        self.assertIs(scale.select(False, new, [tf.constant(2.0)])[0],
                      new[0])
        scale.update(tf.constant(False))

    def test_enabled_updates_and_restores(self):
        scale = loss_scale.DynamicLossScale(True, initial_scale=8.0,
                                            growth_steps=2)
        self.assertEqual(float(scale.scale), 8.0)
        scale.update(tf.constant(True))
        scale.update(tf.constant(True))
        self.assertEqual(float(scale.scale), 16.0)
        scale.update(scale.finite([tf.constant([np.nan])]))
        self.assertEqual(float(scale.scale), 8.0)
        variable = tf.Variable([1.0, 2.0])
        before = scale.snapshot([variable])
        variable.assign([5.0, 6.0])
        scale.restore_unless(tf.constant(False), [variable], before)
        self.assertAllEqual(variable, [1.0, 2.0])
        variable.assign([5.0, 6.0])
        scale.restore_unless(tf.constant(True), [variable], before)
        self.assertAllEqual(variable, [5.0, 6.0])


class UnitDirectionTest(tf.test.TestCase):

    def test_unit_direction_gives_the_same_term(self):
        params = [tf.constant([[0.3, -0.2], [0.1, 0.4]])]
        images = tf.constant([[1.0, 2.0], [-1.0, 0.5], [0.2, 0.2]])

        def losses(p):
            return tf.reduce_sum(tf.tanh(images @ p[0]) ** 2, axis=1)

        direction = [tf.constant([[1e-3, 2e-3], [-1e-3, 5e-4]])]
        for method in ("exact", "forward", "finite_difference"):
            self.assertAllClose(
                hypergradients.directional_derivative(
                    losses, params, direction, method, unit_direction=True),
                hypergradients.directional_derivative(
                    losses, params, direction, method), rtol=1e-4,
                msg=method)
        zero = [tf.zeros([2, 2])]
        self.assertAllEqual(hypergradients.directional_derivative(
            losses, params, zero, "forward", unit_direction=True),
            [0.0, 0.0, 0.0])


if __name__ == "__main__":
    tf.test.main()
