"""The penalty method (Mehra & Hamm, ACML 2021) for data reweighting.

Bilevel problem: min_u f(u, v*) s.t. v* = argmin_v g(u, v). The lower problem
is replaced by its stationarity condition, penalised in an augmented
Lagrangian (research/seed_systems.md §3.1):

    h_upper(u, v) = f + <nu, grad_v g> + rho/2 |grad_v g|^2     (u descends)
    h_lower(u, v) = h_upper + lambda * g                       (v descends)

No Hessian inverse and no unroll: grad_v h_lower and grad_u h_upper contain
one Hessian-vector product of g each, taken by nesting `tf.GradientTape`s.
At a v-stationary point (lambda = 0), nu + rho grad_v g = -H^-1 grad_v f, so
grad_u h_upper tends to the implicit-function hypergradient as rho grows.

Data-reweighting instance (§3.3): u is one logit per training example,
importance a_i = (tanh(u_i) + 1) / 2; v is the classifier;
g = sum_i a_i l_i / sum_i a_i (+ weight decay, below) on the training batch;
f = mean CE on the clean meta batch (so grad_u f = 0).

Per step (§3.2): T Adam steps on v, one Adam step on u, then the gradient-norm
test |grad_u h_upper|^4 + |grad_v h_lower|^4 < eps^2 (fourth powers, as the
authors' code); when it passes rho *= 1.1, lambda *= 0.9, eps *= 0.9,
nu += rho grad_v g and both learning rates *= 0.9.

Choices where the paper/code is silent or that we changed (README "penalty"):
* Adam moments of u are kept per *example* (rows of [N] tables updated only
  where the batch touches them); the authors' moments are per batch slot.
* g includes the engine's `--weight_decay` as (wd/2)|v|^2, the same L2 the
  other methods' SGD applies; the authors' g has none.
* No validation-set pretraining and no agreement initialisation of a (their
  scripts' 100-200 epochs on the meta set, then a = 0.8/0.2): u starts at 0
  (a = 0.5), the mean the per-epoch renormalisation keeps.
* The penalty state (rho, lambda, eps, nu, learning rates) lives in model
  variables, so checkpoints hold all of it.
* v is stepped by Adam (`--penalty_learner_learning_rate`), as in the
  authors' code; the engine's functional SGD and `--w1_learning_rate` are
  not used by this method.

Under tf.distribute N replicas compute what one device computes on the
global batch (`lfm_tf/distribute.py`). Each replica computes its *share* of
g and f (the shares add up over replicas: g's ratio has the global sum of a
in its denominator, f's mean the global meta count), and grad_v g is the
all-reduced sum of the shares' gradients, taken inside the outer tape. So
h_upper and h_lower are the one-device objectives, the same on every
replica; their gradients come back through the all-reduces N times each
replica's share, hence grad_v h_lower is averaged over replicas and each
replica's rows of grad_u h_upper are divided by N. The u table and its
moments are updated on every replica from the gathered rows and gradients
of the global batch, the gradient-norm test uses global norms, so every
replica holds the same u, v, nu and schedule. All-reduces cannot sit in a
`tf.while_loop` body in a replica context, so with more than one replica
the T inner steps are unrolled in Python (T copies of the step to trace).

Under `mixed_float16` every gradient, first and second order, is
grad(S * .) / S with the dynamic loss scale S (`optimization/loss_scale.py`):
grad_v g is unscaled in float32 inside the outer tape, so the outer
gradients' Hessian-vector products flow through it unchanged. A step with any
non-finite value is undone whole: v, u, their Adam moments and counts, nu,
the schedule (so the gradient-norm test does not fire) and BatchNorm's
statistics keep their values, and S halves. The per-epoch renormalisation of
u follows the data position (as the step counter), so it runs on a skipped
step too.
"""

from typing import Callable, List, NamedTuple, Sequence

import keras
import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners
from lfm_tf.optimization import loss_scale as loss_scale_lib

# Keeps atanh finite after renormalisation (the authors' clip).
_CLIP = 1e-5


def squash(logits):
    """Importance a = (tanh(u) + 1) / 2 in (0, 1), any shape."""
    return 0.5 * (tf.tanh(logits) + 1.0)


def renormalize_logits(logits, target_mean=0.5):
    """u such that a = squash(u) is rescaled to mean `target_mean`.

    a <- target_mean * a / mean(a), clipped to [1e-5, 1 - 1e-5], then
    u = atanh(2a - 1) (the authors' per-epoch renormalisation).

    Args:
      logits: float [N], u.

    Returns:
      float [N].
    """
    weights = squash(logits)
    weights = target_mean * weights / tf.reduce_mean(weights)
    weights = tf.clip_by_value(weights, _CLIP, 1.0 - _CLIP)
    return tf.atanh(2.0 * weights - 1.0)


def penalty_objectives(upper_loss, lower_loss, lower_grads, multipliers,
                       rho, lam):
    """(h_upper, h_lower) from f, g, grad_v g and nu.

    Args:
      upper_loss: scalar f(u, v).
      lower_loss: scalar g(u, v).
      lower_grads: list of tensors grad_v g, shaped like v.
      multipliers: list of tensors nu, shaped like v.
      rho: penalty coefficient.
      lam: coefficient of the lower level's lambda * g term.

    Returns:
      (h_upper, h_lower) scalars.
    """
    inner = tf.add_n([tf.reduce_sum(n * d)
                      for n, d in zip(multipliers, lower_grads)])
    squared = tf.add_n([tf.reduce_sum(tf.square(d)) for d in lower_grads])
    h_upper = upper_loss + inner + 0.5 * rho * squared
    return h_upper, h_upper + lam * lower_loss


class PenaltyGradients(NamedTuple):
    """Everything one evaluation of the penalty objectives gives.

    Attributes:
      h_upper, h_lower: scalars.
      upper_loss, lower_loss: f and g.
      grad_u: d h_upper / d u, shaped like u.
      grad_v: d h_lower / d v, list shaped like v.
      lower_grads: grad_v g, list shaped like v (nu's update direction).
      aux: whatever `lower_fn` returned second.
    """

    h_upper: tf.Tensor
    h_lower: tf.Tensor
    upper_loss: tf.Tensor
    lower_loss: tf.Tensor
    grad_u: tf.Tensor
    grad_v: List[tf.Tensor]
    lower_grads: List[tf.Tensor]
    aux: object


def penalty_gradients(upper_fn: Callable, lower_fn: Callable, u,
                      v: Sequence[tf.Tensor], multipliers, rho, lam,
                      scale=None):
    """Both descent directions of the penalty method, by nested tapes.

    The inner tape gives grad_v g; the outer tape differentiates the
    objectives built from it, which is where the Hessian-vector products
    H_vv (nu + rho grad_v g) and H_uv (nu + rho grad_v g) come from.

    Under tf.distribute `upper_fn` and `lower_fn` return this replica's
    share of f and g (the shares of all replicas add up to the one-device
    value); the shares and grad_v g are summed over replicas inside the
    outer tape, so every replica differentiates the one-device objectives
    (module docstring). With one replica the shares are f and g.

    Args:
      upper_fn: (u, v) -> scalar f (this replica's share).
      lower_fn: (u, v) -> (scalar g (this replica's share), aux).
      u: tensor, the upper variable (this replica's rows of it).
      v: list of tensors, the lower variable.
      multipliers: nu, list shaped like v.
      rho, lam: scalars.
      scale: float32 scalar loss scale S, or None (no scaling). Given,
        every gradient is taken as grad(S * .) / S; the inner one is
        unscaled inside the outer tape, so the second-order terms carry S
        once, from the outer seed, and the results are unchanged.

    Returns:
      `PenaltyGradients`: f, g, h, grad_v g and grad_v h_lower the
      one-device values on every replica; grad_u the one-device gradient of
      this replica's rows of u.
    """
    v = list(v)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(u)
        outer.watch(v)
        with tf.GradientTape() as inner:
            inner.watch(v)
            lower_share, aux = lower_fn(u, v)
        # Not stopped: the outer tape must see grad_v g as a function of u, v.
        # Summed inside the outer tape, so the Hessian-vector products reach
        # every replica's examples.
        lower_grads = distribute.replica_sum(
            _gradients(inner, lower_share, v, scale))
        upper_loss, lower_loss = distribute.replica_sum(
            [upper_fn(u, v), lower_share])
        h_upper, h_lower = penalty_objectives(
            upper_loss, lower_loss, lower_grads, multipliers, rho, lam)
    # Every replica differentiates the same h, so the gradients through the
    # all-reduces are N times this replica's share of the one-device ones.
    grad_v = distribute.replica_mean(_gradients(outer, h_lower, v, scale))
    grad_u, = distribute.scale_gradients(
        _gradients(outer, h_upper, [u], scale))
    del outer
    return PenaltyGradients(h_upper, h_lower, upper_loss, lower_loss, grad_u,
                            grad_v, lower_grads, aux)


def _gradients(tape, target, sources, scale):
    """d target / d sources, zeros where unconnected.

    Args:
      tape: the `tf.GradientTape` that recorded `target`.
      target: float scalar.
      sources: list of tensors.
      scale: float32 scalar S, taken as grad(S * target) / S, or None.

    Returns:
      List of tensors shaped like `sources`.
    """
    if scale is None:
        zero = tf.UnconnectedGradients.ZERO
        return tape.gradient(target, sources, unconnected_gradients=zero)
    grads = loss_scale_lib.scaled_gradient(tape, target, sources, scale)
    return [tf.zeros_like(s) if g is None else g
            for s, g in zip(sources, grads)]


def adam_step(param, grad, first, second, count, learning_rate,
              beta_1=0.9, beta_2=0.999, epsilon=1e-8):
    """One bias-corrected Adam step; elementwise, so it also serves rows.

    Args:
      param, grad, first, second: tensors of one shape (the moments m, s).
      count: the number of steps already taken, broadcastable to `param`
        (per row for the example-weight table).
      learning_rate: scalar.

    Returns:
      (new_param, new_first, new_second, new_count).
    """
    count = count + 1
    first = beta_1 * first + (1.0 - beta_1) * grad
    second = beta_2 * second + (1.0 - beta_2) * tf.square(grad)
    corrected_first = first / (1.0 - tf.pow(beta_1, count))
    corrected_second = second / (1.0 - tf.pow(beta_2, count))
    step = learning_rate * corrected_first / (
        tf.sqrt(corrected_second) + epsilon)
    return param - step, first, second, count


class Schedule(NamedTuple):
    """The penalty state that the gradient-norm test changes (scalars)."""

    rho: tf.Tensor
    lam: tf.Tensor
    epsilon: tf.Tensor
    weight_learning_rate: tf.Tensor
    learner_learning_rate: tf.Tensor


def converged(upper_grad_norm_sq, lower_grad_norm_sq, epsilon):
    """The authors' test: G_u^2 + G_v^2 < eps^2 with G already squared."""
    return tf.square(upper_grad_norm_sq) + tf.square(lower_grad_norm_sq) < (
        tf.square(epsilon))


def schedule_update(schedule: Schedule, passed, rho_growth, lambda_decay,
                    epsilon_decay, lr_decay) -> Schedule:
    """rho, lambda, eps and both learning rates after one test.

    Args:
      schedule: the current `Schedule`.
      passed: bool scalar, `converged(...)`.
      rho_growth, lambda_decay, epsilon_decay, lr_decay: factors.

    Returns:
      The new `Schedule` (unchanged where the test failed).
    """
    factors = Schedule(rho_growth, lambda_decay, epsilon_decay, lr_decay,
                       lr_decay)
    return Schedule(*[
        tf.where(passed, value * factor, value)
        for value, factor in zip(schedule, factors)
    ])


class Penalty(base.MethodModel):
    """The penalty method as a Keras model; `call` is the classifier v.

    Args:
      num_train: N, the length of the weight-logit table u.
      config: `MethodConfig` (the `penalty_*` fields).
      weight_decay: the L2 coefficient inside g.
      steps_per_epoch: when to renormalise u (once per epoch).
      **kwargs: `MethodModel` arguments.
    """

    METRIC_NAMES = ("loss", "val_loss", "rho", "constraint_norm",
                    "weight_mean", "weight_clean", "weight_corrupted")

    def __init__(self, *args, num_train, config, weight_decay=0.0,
                 steps_per_epoch=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.config = config
        self.weight_decay = float(weight_decay)
        self.steps_per_epoch = int(steps_per_epoch)
        self.learner = learners.Learner(self.classifier.trunk,
                                        self.classifier.head)
        variables = self.learner.variables

        def table(name, value=0.0, dtype=None, shape=(int(num_train),)):
            return self.add_weight(
                shape=shape, initializer=keras.initializers.Constant(value),
                dtype=dtype, trainable=False, name=name)

        # u: one logit per training example (example_weight_ in DESIGN §4).
        self.example_weight_logits = table("example_weight_logits")
        self.weight_first = table("example_weight_adam_m")
        self.weight_second = table("example_weight_adam_v")
        self.weight_count = table("example_weight_adam_t")
        self.multipliers = [
            table(f"nu_{i}", config.penalty_nu, v.dtype, v.shape)
            for i, v in enumerate(variables)]
        self.learner_first = [table(f"adam_m_{i}", 0.0, v.dtype, v.shape)
                              for i, v in enumerate(variables)]
        self.learner_second = [table(f"adam_v_{i}", 0.0, v.dtype, v.shape)
                               for i, v in enumerate(variables)]
        self.learner_count = table("adam_t", shape=())
        self.schedule_variables = Schedule(
            table("rho", config.penalty_rho, shape=()),
            table("lambda", config.penalty_lambda, shape=()),
            table("epsilon", config.penalty_epsilon, shape=()),
            table("weight_learning_rate",
                  config.penalty_weight_learning_rate, shape=()),
            table("learner_learning_rate",
                  config.penalty_learner_learning_rate, shape=()),
        )

    def example_weights(self, index):
        """a_i of the examples `index` (int [B]) -> float [B]."""
        return squash(tf.gather(self.example_weight_logits, index))

    def objectives(self, train, meta):
        """(upper_fn, lower_fn) for one training and one meta batch.

        Under tf.distribute each returns this replica's share (module
        docstring): g's ratio divides by sum_i a_i over the global batch and
        its weight decay by N; f divides by the global meta count.
        """
        replicas = distribute.num_replicas()

        def lower(u, v):
            losses, out = self.learner.losses(v, train["image"],
                                              train["label"])
            a = squash(tf.cast(u, losses.dtype))
            # A ratio of sums over the global batch, not of per-replica
            # ratios; the all-reduce is differentiable in u.
            total, = distribute.replica_sum([tf.reduce_sum(a)])
            loss = tf.reduce_sum(a * losses) / total
            if self.weight_decay:
                loss += 0.5 * self.weight_decay / replicas * tf.add_n(
                    [tf.reduce_sum(tf.square(p)) for p in v])
            return loss, out

        def upper(u, v):
            del u  # grad_u f = 0: f is the meta loss of v alone.
            losses, _ = self.learner.losses(v, meta["image"], meta["label"])
            count, = distribute.replica_sum(
                [tf.cast(tf.shape(losses)[0], losses.dtype)])
            return tf.reduce_sum(losses) / count

        return upper, lower

    def penalty_terms(self, train, meta, u):
        """`penalty_gradients` at the current v and the rows `u` of u."""
        upper, lower = self.objectives(train, meta)
        schedule = self.schedule_variables
        return penalty_gradients(
            upper, lower, u, self.learner.current(),
            [tf.convert_to_tensor(n) for n in self.multipliers],
            tf.convert_to_tensor(schedule.rho),
            tf.convert_to_tensor(schedule.lam),
            scale=self.loss_scale.scale if self.loss_scale.enabled else None)

    def step_state_variables(self):
        """Every variable a step writes (what a skipped step restores): v,
        u, their Adam moments and counts, nu, the schedule and BatchNorm's
        statistics."""
        return (self.learner.variables + self.learner_first
                + self.learner_second + [self.learner_count]
                + [self.example_weight_logits, self.weight_first,
                   self.weight_second, self.weight_count]
                + self.multipliers + list(self.schedule_variables)
                + self.learner.state_variables)

    def learner_step(self, grads):
        """One Adam step on v from grad_v h_lower."""
        count = self.learner_count + 1.0
        lr = self.schedule_variables.learner_learning_rate
        for variable, grad, first, second in zip(
                self.learner.variables, grads, self.learner_first,
                self.learner_second):
            new, new_first, new_second, _ = adam_step(
                variable, grad, first, second, self.learner_count, lr)
            variable.assign(new)
            first.assign(new_first)
            second.assign(new_second)
        self.learner_count.assign(count)

    def weight_step(self, index, grad):
        """One Adam step on the rows `index` of u (per-example moments).

        Under tf.distribute every replica steps the rows of the global batch
        (gathered), so the replicas' copies of the tables stay equal.

        Args:
          index: int [b], this replica's rows.
          grad: float [b], their one-device gradients.
        """
        index, grad = distribute.gather_batch((index, grad))
        rows = index[:, None]
        new, first, second, count = adam_step(
            tf.gather(self.example_weight_logits, index), grad,
            tf.gather(self.weight_first, index),
            tf.gather(self.weight_second, index),
            tf.gather(self.weight_count, index),
            self.schedule_variables.weight_learning_rate)
        for table, value in ((self.example_weight_logits, new),
                             (self.weight_first, first),
                             (self.weight_second, second),
                             (self.weight_count, count)):
            table.assign(tf.tensor_scatter_nd_update(table, rows, value))

    def train_step(self, data):
        train, meta = data["train"], data["meta"]
        index = tf.cast(train["index"], tf.int32)
        # Under loss scaling a non-finite step is undone whole (module
        # docstring); the T inner steps already wrote v when it shows.
        state = (self.step_state_variables() if self.loss_scale.enabled
                 else [])
        before = self.loss_scale.snapshot(state)
        u = tf.gather(self.example_weight_logits, index)

        def inner_step(i, finite):
            grads = self.penalty_terms(train, meta, u).grad_v
            self.learner_step(grads)
            return i + 1, tf.logical_and(finite,
                                         self.loss_scale.finite(grads))

        finite = tf.constant(True)
        if distribute.num_replicas() > 1:
            # All-reduces cannot sit in a while_loop body in a replica
            # context: T copies of the step.
            for i in range(self.config.penalty_inner_steps):
                _, finite = inner_step(i, finite)
        else:
            # A graph loop: T copies of a double-backprop graph would make
            # tracing T times slower.
            _, finite = tf.while_loop(
                lambda i, _: i < self.config.penalty_inner_steps,
                inner_step, (tf.constant(0), finite))
        result = self.penalty_terms(train, meta, u)
        # BN statistics: one update per step, from the last lower forward.
        self.learner.assign_states(result.aux.states)
        self.weight_step(index, result.grad_u)
        u = tf.gather(self.example_weight_logits, index)
        first_grad_u = result.grad_u
        result = self.penalty_terms(train, meta, u)
        self.update_schedule(result)
        if self.loss_scale.enabled:
            # A non-finite gradient reaches the written values through Adam,
            # except where the test's NaN norm merely fails it; both checked.
            finite = _on_every_replica(tf.logical_and(
                finite, self.loss_scale.finite(
                    [first_grad_u, result.grad_u] + result.grad_v
                    + result.lower_grads + state)))
        self.loss_scale.restore_unless(finite, state, before)
        self._renormalize_at_epoch_end()
        weights = squash(u)
        corrupted = tf.cast(
            tf.not_equal(train["label"], train["clean_label"]), weights.dtype)
        self._trackers["weight_clean"].update_state(
            weights, sample_weight=1.0 - corrupted)
        self._trackers["weight_corrupted"].update_state(
            weights, sample_weight=corrupted)
        return self.finish_step(
            train["label"], result.aux.logits,
            finite=finite if self.loss_scale.enabled else None,
            loss=result.lower_loss,
            val_loss=result.upper_loss, rho=self.schedule_variables.rho,
            constraint_norm=tf.sqrt(_squared_norm(result.lower_grads)),
            weight_mean=tf.reduce_mean(weights))

    def update_schedule(self, result):
        """The gradient-norm test and, when it passes, nu's update."""
        schedule = Schedule(*[tf.convert_to_tensor(v)
                              for v in self.schedule_variables])
        # Global norms (grad_v is already the one-device gradient), so every
        # replica takes the same branch.
        upper_norm, = distribute.replica_sum([_squared_norm([result.grad_u])])
        passed = converged(upper_norm, _squared_norm(result.grad_v),
                           tf.cast(schedule.epsilon, result.grad_u.dtype))
        config = self.config
        new = schedule_update(
            schedule, passed, config.penalty_rho_growth,
            config.penalty_lambda_decay, config.penalty_epsilon_decay,
            config.penalty_lr_decay)
        for variable, value in zip(self.schedule_variables, new):
            variable.assign(value)
        # nu += rho_new grad_v g on the current batch (the authors' order).
        for nu, grad in zip(self.multipliers, result.lower_grads):
            nu.assign(tf.where(passed, nu + new.rho * grad, nu))

    def _renormalize_at_epoch_end(self):
        if not self.config.penalty_renormalize:
            return
        at_end = tf.equal((self.step_counter + 1) % self.steps_per_epoch, 0)
        logits = self.example_weight_logits
        logits.assign(tf.cond(at_end, lambda: renormalize_logits(logits),
                              lambda: tf.convert_to_tensor(logits)))


def _on_every_replica(finite):
    """True iff `finite` (bool scalar) holds on every replica, so that all
    replicas skip or keep a step together (itself with one replica)."""
    failures, = distribute.replica_sum(
        [tf.cast(tf.logical_not(finite), tf.float32)])
    return tf.equal(failures, 0.0)


def _squared_norm(tensors):
    return tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors])
