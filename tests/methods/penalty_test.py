"""The penalty method: its objectives, its gradients and its limit in rho."""

import keras
import numpy as np
import tensorflow as tf
from scipy import optimize

from lfm_tf import config as config_lib
from lfm_tf import testing
from lfm_tf.methods import factory
from lfm_tf.methods import penalty

SIDE, CLASSES = 6, 3


def _logistic_problem():
    """A 3-feature, 2-class logistic regression with per-example weights.

    g(u, w) = sum_i a_i l_i(w) / sum_i a_i + c/2 |w|^2 on 6 training points
    (strictly convex in w), f(w) = mean CE on 4 validation points.
    """
    rng = np.random.default_rng(3)
    x_train = tf.constant(rng.normal(size=(6, 3)))
    y_train = tf.constant([0, 1, 1, 0, 1, 0])
    x_val = tf.constant(rng.normal(size=(4, 3)))
    y_val = tf.constant([0, 1, 0, 1])
    decay = 0.1

    def ce(w, x, y):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, tf.matmul(x, tf.reshape(w, [3, 2])))

    def lower(u, v):
        a = penalty.squash(u)
        loss = tf.reduce_sum(a * ce(v[0], x_train, y_train)) / tf.reduce_sum(a)
        return loss + 0.5 * decay * tf.reduce_sum(tf.square(v[0])), None

    def upper(u, v):
        del u
        return tf.reduce_mean(ce(v[0], x_val, y_val))

    u = tf.constant(rng.normal(size=6))
    return upper, lower, u


def _newton(gradient_fn, w, iterations=30):
    """Minimises by Newton's method; gradient_fn(w) -> gradient [P]."""
    for _ in range(iterations):
        with tf.GradientTape() as tape:
            tape.watch(w)
            grad = gradient_fn(w)
        hessian = tape.jacobian(grad, w)
        w = w - tf.linalg.solve(hessian, grad[:, None])[:, 0]
    return w, gradient_fn(w)


def _minimise(value_and_gradient, w):
    """Trust-region Newton (exact Hessian) on a possibly non-convex h."""

    def fun(flat):
        value, grad = value_and_gradient(tf.constant(flat))
        return float(value), grad.numpy()

    def hess(flat):
        w = tf.constant(flat)
        with tf.GradientTape() as tape:
            tape.watch(w)
            grad = value_and_gradient(w)[1]
        return tape.jacobian(grad, w).numpy()

    result = optimize.minimize(fun, w.numpy(), jac=True, hess=hess,
                               method="trust-exact",
                               options={"gtol": 1e-11})
    return tf.constant(result.x), tf.constant(fun(result.x)[1])


class PureFunctionTest(tf.test.TestCase):

    def test_objectives_by_hand(self):
        h_upper, h_lower = penalty.penalty_objectives(
            tf.constant(2.0), tf.constant(3.0),
            [tf.constant([1.0, -2.0]), tf.constant([[0.5]])],
            [tf.constant([0.1, 0.2]), tf.constant([[1.0]])], rho=4.0, lam=0.5)
        # f + <nu, d> + rho/2 |d|^2 = 2 + (0.1 - 0.4 + 0.5) + 2 * 5.25.
        self.assertAllClose(h_upper, 2.0 + 0.2 + 10.5)
        self.assertAllClose(h_lower, 12.7 + 1.5)

    def test_schedule_moves_only_when_the_test_passes(self):
        schedule = penalty.Schedule(*[tf.constant(v) for v in
                                      (1.0, 0.5, 0.1, 3.0, 1e-4)])
        # G_u = 0.2, G_v = 0.2: 0.04 + 0.04 = 0.08 < 0.1^2? No (0.01).
        self.assertFalse(penalty.converged(0.2, 0.2, 0.1))
        self.assertTrue(penalty.converged(0.05, 0.05, 0.1))  # 0.005 < 0.01
        kept = penalty.schedule_update(schedule, tf.constant(False),
                                       1.1, 0.9, 0.8, 0.5)
        self.assertAllClose(list(kept), list(schedule))
        moved = penalty.schedule_update(schedule, tf.constant(True),
                                        1.1, 0.9, 0.8, 0.5)
        self.assertAllClose(list(moved), [1.1, 0.45, 0.08, 1.5, 5e-5])

    def test_adam_step_matches_keras_adam_without_epsilon(self):
        variable = keras.Variable(np.array([1.0, -2.0, 0.5], np.float32))
        optimizer = keras.optimizers.Adam(0.1, epsilon=0.0)
        param = tf.constant([1.0, -2.0, 0.5])
        first = second = tf.zeros(3)
        count = tf.zeros(3)
        for grad in ([0.3, -1.0, 2.0], [0.1, 0.4, -0.2], [1.0, 1.0, 1.0]):
            optimizer.apply([tf.constant(grad)], [variable])
            param, first, second, count = penalty.adam_step(
                param, tf.constant(grad), first, second, count, 0.1,
                epsilon=0.0)
        self.assertAllClose(param, variable, rtol=1e-6)
        self.assertAllClose(count, [3.0, 3.0, 3.0])

    def test_renormalised_weights_have_mean_one_half(self):
        logits = tf.constant([2.0, 0.3, -1.0, 0.0])
        renormed = penalty.renormalize_logits(logits)
        weights = penalty.squash(logits).numpy()
        self.assertAllClose(penalty.squash(renormed),
                            0.5 * weights / weights.mean(), rtol=1e-5)


class Float64Test(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        self.enterContext(testing.float64())

    def test_gradients_match_finite_differences(self):
        upper, lower, u0 = _logistic_problem()
        u = tf.Variable(u0)
        v = tf.Variable(np.linspace(-0.5, 0.7, 6))
        nu = [tf.constant(np.linspace(0.1, -0.2, 6))]

        def result():
            return penalty.penalty_gradients(
                upper, lower, tf.convert_to_tensor(u),
                [tf.convert_to_tensor(v)], nu, rho=3.0, lam=0.2)

        got = result()
        for position in range(6):
            self.assertAllClose(
                got.grad_u[position],
                testing.central_difference(lambda: result().h_upper, u,
                                           position), rtol=1e-6)
            self.assertAllClose(
                got.grad_v[0][position],
                testing.central_difference(lambda: result().h_lower, v,
                                           position), rtol=1e-6)
            self.assertAllClose(
                got.lower_grads[0][position],
                testing.central_difference(lambda: lower(u, [v])[0], v,
                                           position), rtol=1e-6)

    def test_hypergradient_approaches_the_implicit_one_as_rho_grows(self):
        upper, lower, u = _logistic_problem()

        def lower_gradient(w):
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = lower(u, [w])[0]
            return tape.gradient(loss, w)

        v_star, residual = _newton(lower_gradient, tf.zeros(6, tf.float64))
        self.assertLess(float(tf.norm(residual)), 1e-12)
        # Implicit function theorem: dF/du = -(d2g/dw du)^T H^-1 grad_w f.
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([u, v_star])
            with tf.GradientTape() as inner:
                inner.watch(v_star)
                g = lower(u, [v_star])[0]
            grad_g = inner.gradient(g, v_star)
            f = upper(u, [v_star])
        hessian = tape.jacobian(grad_g, v_star)
        mixed = tape.jacobian(grad_g, u)  # [P, N]
        grad_f = tape.gradient(f, v_star)
        exact = -tf.linalg.matvec(
            mixed, tf.linalg.solve(hessian, grad_f[:, None])[:, 0],
            transpose_a=True)

        errors = []
        start = v_star
        # Continuation from large rho (v_rho near v*) down to small rho.
        for rho in (1e5, 1e4, 1e3, 1e2):
            def h_value_and_gradient(w, rho=rho):
                result = penalty.penalty_gradients(
                    upper, lower, u, [w], [tf.zeros(6, tf.float64)], rho,
                    0.0)
                return result.h_lower, result.grad_v[0]

            v_rho, residual = _minimise(h_value_and_gradient, start)
            self.assertLess(float(tf.norm(residual)), 1e-9 * rho)
            start = v_rho
            got = penalty.penalty_gradients(
                upper, lower, u, [v_rho], [tf.zeros(6, tf.float64)], rho,
                0.0).grad_u
            errors.append(float(tf.norm(got - exact) / tf.norm(exact)))
        errors.reverse()  # rho = 1e2, 1e3, 1e4, 1e5.
        # Monotone, and O(1/rho) once rho dominates: 10x rho, ~10x less.
        for coarse, fine in zip(errors, errors[1:]):
            self.assertLess(fine, coarse)
        for coarse, fine in zip(errors[1:], errors[2:]):
            self.assertLess(fine, 0.2 * coarse)
        self.assertLess(errors[-1], 1e-3)
        self.assertGreater(errors[0], 1e-2)  # The limit is not trivial.


class TrainStepTest(tf.test.TestCase):

    def test_one_step_moves_classifier_weights_and_schedule_state(self):
        config = config_lib.ExperimentConfig(
            model=config_lib.ModelConfig(backbone="small_cnn", width=4),
        ).replace(method="penalty", penalty_inner_steps=3,
                  penalty_epsilon=1e6, penalty_learner_learning_rate=1e-2)
        facts = factory.DataFacts(
            num_classes=CLASSES, input_shape=(SIDE, SIDE, 3), num_train=10,
            num_meta=6, steps_per_epoch=100)
        keras.utils.set_random_seed(0)
        model = factory.compile_method(
            factory.build_method(config.validate(), facts), config)
        rng = np.random.default_rng(0)
        train = {
            "image": tf.constant(rng.normal(size=(5, SIDE, SIDE, 3)),
                                 tf.float32),
            "label": tf.constant([0, 1, 2, 0, 1]),
            "clean_label": tf.constant([0, 1, 2, 2, 1]),
            "index": tf.constant([3, 0, 7, 5, 9]),
        }
        meta = {"image": tf.constant(rng.normal(size=(4, SIDE, SIDE, 3)),
                                     tf.float32),
                "label": tf.constant([0, 1, 2, 0]),
                "index": tf.constant([0, 1, 2, 3])}
        before = [v.numpy().copy() for v in model.learner.variables]
        logs = model.train_step({"train": train, "meta": meta})
        self.assertTrue(np.isfinite(float(logs["loss"])))
        self.assertAllEqual(model.learner_count, 3.0)
        self.assertTrue(any(not np.allclose(b, a.numpy()) for b, a in
                            zip(before, model.learner.variables)))
        logits = model.example_weight_logits.numpy()
        touched = np.zeros(10, bool)
        touched[[3, 0, 7, 5, 9]] = True
        self.assertTrue(np.all(logits[touched] != 0))
        self.assertAllEqual(logits[~touched], np.zeros(5))
        # epsilon = 1e6: the test passes, so rho grew and lambda shrank.
        self.assertAllClose(model.schedule_variables.rho, 1e-2 * 1.1)
        self.assertAllClose(model.schedule_variables.lam, 1e-2 * 0.9)
        self.assertFalse(np.allclose(model.multipliers[0].numpy(), 1e-4))


if __name__ == "__main__":
    tf.test.main()
