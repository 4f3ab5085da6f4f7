"""Bilevel reweighting baselines: L2RW (Ren 2018) and Meta-Weight-Net.

Both look one SGD step ahead and ask how the clean meta loss changes with
each example's weight. That change is the mixed term
-eta/n <grad l_i(W), v> with v = grad L_val(W'), computed by
`hypergradients.directional_derivative` (exact, finite-difference or
forward-mode), so neither needs a double backward pass.
"""

import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners
from lfm_tf.optimization import hypergradients
from lfm_tf.reweighting import mistake_weighting

_DIRECTIONAL = {
    "exact": "exact",
    "finite_difference": "finite_difference",
    "first_order": "forward",
}


def l2rw_weights(meta_gradient):
    """L2RW's normalisation: w = max(-dL/de, 0) / sum, sum := 1 when 0.

    Under tf.distribute the sum runs over the global batch (all replicas'
    slices), so each replica's weights are its share of the one-device ones.

    Args:
      meta_gradient: float [B], dL_val/d(epsilon_i) at epsilon = 0; this
        replica's slice under a strategy (any common positive scale of the
        replicas' slices cancels).

    Returns:
      float [B], non-negative, summing to 1 over the global batch (or all
      zero).
    """
    clipped = tf.maximum(-meta_gradient, 0.0)
    total, = distribute.replica_sum([tf.reduce_sum(clipped)])
    return clipped / tf.where(total > 0, total, tf.ones_like(total))


class _LookaheadModel(base.MethodModel):
    """Shared pieces: W1 as a functional learner and the meta direction."""

    def __init__(self, classifier, sgd, num_classes, *, method_config,
                 **kwargs):
        super().__init__(classifier, sgd, num_classes, **kwargs)
        self.method_config = method_config
        self.w1 = learners.Learner(classifier.trunk, classifier.head,
                                   training_loss=self.train_loss)

    def meta_direction(self, params, meta):
        """v = grad_W L_val(W) at `params` (list of tensors)."""
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, _ = self.w1.losses(params, meta["image"], meta["label"])
            val_loss = tf.reduce_mean(losses)
        return (
            distribute.scale_gradients(
                self.loss_scale.gradient(tape, val_loss, params)),
            val_loss,
        )

    def mixed_term(self, train, params, direction):
        """<grad l_i(W), v> for the training batch, float [B]."""
        return hypergradients.directional_derivative(
            self.w1.loss_vector_fn(train["image"], train["label"]),
            params, direction,
            _DIRECTIONAL[self.method_config.hypergradient],
            self.method_config.fd_epsilon,
            unit_direction=self.loss_scale.enabled,
        )

    def weighted_step(self, train, weights, finite=True):
        """The real W1 step on mean(weights * l).

        Args:
          train: the training batch.
          weights: float [B], held fixed.
          finite: bool scalar, whether the step's earlier updates were
            finite; under loss scaling W1 is only stepped if they and this
            step's values are.

        Returns:
          (loss, logits float [B, C], whether the whole step is finite).
        """
        params = self.w1.current()
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = self.w1.train_losses(
                params, train["image"], train["label"]
            )
            loss = tf.reduce_mean(tf.stop_gradient(weights) * losses)
        grads = distribute.replica_mean(
            self.loss_scale.gradient(tape, loss, params))
        new_params, new_momenta = self.sgd.unroll(
            params, grads, self.step_counter
        )
        finite = tf.logical_and(
            finite, self.loss_scale.finite(new_params + new_momenta))
        self.sgd.assign(
            self.w1.variables,
            self.loss_scale.select(finite, new_params, params),
            self.loss_scale.select(finite, new_momenta, self.sgd.momenta),
        )
        self.w1.assign_states(out.states)
        return loss, out.logits, finite


class L2RW(_LookaheadModel):
    """Learning to Reweight (Ren et al. 2018).

    At epsilon = 0 the lookahead W' equals W, so dL_val/d(epsilon_i) is
    -<grad l_i(W), grad L_val(W)> up to the (cancelling) step size.
    """

    METRIC_NAMES = ("loss", "val_loss", "weight_mean", "weight_zero_fraction")

    def train_step(self, data):
        train, meta = data["train"], distribute.gather_batch(data["meta"])
        params = self.w1.current()
        direction, val_loss = self.meta_direction(params, meta)
        meta_gradient = -self.mixed_term(train, params, direction)
        weights = l2rw_weights(meta_gradient)
        # L2RW's weights sum to 1; scale by the global B so the mean loss is
        # comparable (and each replica's mean is its share of one device's).
        batch, = distribute.replica_sum(
            [tf.cast(tf.shape(weights)[0], weights.dtype)])
        loss, logits, finite = self.weighted_step(train, weights * batch)
        return self.finish_step(
            train["label"], logits, finite=finite, loss=loss,
            val_loss=val_loss,
            weight_mean=tf.reduce_mean(weights * batch),
            weight_zero_fraction=tf.reduce_mean(
                tf.cast(weights <= 0, weights.dtype)
            ),
        )


class MetaWeightNet(_LookaheadModel):
    """Meta-Weight-Net (Shu et al. 2019).

    1. lookahead W'(phi) = W - eta * grad mean(m(l; phi) * l);
    2. phi descends L_val(W'(phi)) (Adam);
    3. W descends mean(m(l; phi_new) * l) with the weights held fixed.

    Args:
      meta_net: loss -> weight network m(.; phi).
      meta_optimizer: optimizer of phi.
      **kwargs: `_LookaheadModel` arguments.
    """

    METRIC_NAMES = ("loss", "val_loss", "weight_mean", "weight_clean",
                    "weight_corrupted")

    def __init__(self, *args, meta_net, meta_optimizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.meta_net = meta_net
        self.meta_optimizer = meta_optimizer
        self.meta_optimizer.build(meta_net.trainable_variables)

    def example_weights(self, losses):
        """m(l; phi): float [B] weights from detached losses float [B]."""
        weights = tf.squeeze(
            self.meta_net(tf.stop_gradient(losses)[:, None]), axis=1
        )
        return mistake_weighting.normalize_weights(
            weights, self.method_config.weight_normalization
        )

    def meta_gradient(self, train, meta):
        """dL_val(W'(phi))/dphi through the lookahead; no side effects.

        Returns:
          (gradients aligned with `meta_net.trainable_variables`, L_val,
          the per-example training losses float [B]).
        """
        params = self.w1.current()
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(params)
            losses, _ = self.w1.train_losses(
                params, train["image"], train["label"])
            weights = self.example_weights(losses)
            lookahead_loss = tf.reduce_mean(tf.stop_gradient(weights) * losses)
        grads = distribute.replica_mean(
            self.loss_scale.gradient(tape, lookahead_loss, params))
        lookahead, _ = self.sgd.unroll(params, grads, self.step_counter)
        direction, val_loss = self.meta_direction(lookahead, meta)
        d_weights = hypergradients.weight_hypergradient(
            self.mixed_term(train, params, direction),
            self.sgd.step_scale(self.step_counter),
            tf.shape(weights)[0],
        )
        # m(.; phi) computes in float32 (reweighting/meta_net.py), so this
        # gradient needs no loss scale.
        phi_grads = tape.gradient(
            weights, self.meta_net.trainable_variables,
            output_gradients=d_weights,
        )
        del tape
        return phi_grads, val_loss, losses

    def train_step(self, data):
        train, meta = data["train"], distribute.gather_batch(data["meta"])
        phi_grads, val_loss, losses = self.meta_gradient(train, meta)
        # phi's update is undone if the W1 step that follows (from phi's new
        # weights) turns out non-finite: a skipped step changes nothing.
        phi_state = list(self.meta_net.trainable_variables) + list(
            self.meta_optimizer.variables)
        before = self.loss_scale.snapshot(phi_state)
        self.meta_optimizer.apply(phi_grads, self.meta_net.trainable_variables)
        new_weights = self.example_weights(losses)
        loss, logits, finite = self.weighted_step(
            train, new_weights, self.loss_scale.finite(phi_grads))
        self.loss_scale.restore_unless(finite, phi_state, before)
        corrupted = tf.cast(
            tf.not_equal(train["label"], train["clean_label"]),
            new_weights.dtype,
        )
        self._trackers["weight_clean"].update_state(
            new_weights, sample_weight=1.0 - corrupted
        )
        self._trackers["weight_corrupted"].update_state(
            new_weights, sample_weight=corrupted
        )
        return self.finish_step(
            train["label"], logits, finite=finite, loss=loss,
            val_loss=val_loss, weight_mean=tf.reduce_mean(new_weights),
        )
