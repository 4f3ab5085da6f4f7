"""Deep Bilevel Learning (Jenni & Favaro 2018): mini-batch learning rates.

The training batch is cut into S mini-batches ("splits"). Each split i gets a
weight from how well its gradient agrees with a validation gradient,

    omega_i = <g_val, g_i> / (|g_i|^2 + mu),   omega~ = omega / sum_k |omega_k|

and the step follows sum_i omega~_i g_i. Negative weights are kept (that
split's gradient is ascended). As in the authors' code, the validation
gradient is split 0 of the (noisy) training batch itself, so no clean data
is needed; `dbl_validation=meta` uses the clean meta batch instead and trains
on all S splits. BatchNorm statistics are per split, as in the reference
(research/seed_systems.md §4.2).

Under tf.distribute the N replicas cut the global batch into the same S
splits as one device: S must be a multiple of N, and each replica's slice
holds S / N whole splits (the global batch is sliced in order). Each replica
computes its splits' gradients; split 0's gradient (replica 0's first) is
broadcast as g_val, or the meta slices' gradients are averaged; every
replica gathers each split's <g_val, g_i>, |g_i|^2 and loss, so omega is the
one-device omega, and the step is the all-reduced sum of the replicas'
omega-weighted gradients. BatchNorm statistics are per split on both, and
the moving statistics come from the global batch's last split, so with
`train_split` N replicas take the one-device step even with BatchNorm
(rounding aside); with `meta` each replica normalises its own meta slice.

Under `mixed_float16` every split's gradient is taken with the loss scale
as its seed and unscaled in float32 (optimization/loss_scale.py), so omega
sees the true gradients; a step with any non-finite value keeps W and the
momenta, and the scale halves.
"""

import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners


def dbl_weights(validation_grad, split_grads, mu):
    """omega~_i for flattened gradients.

    Args:
      validation_grad: float [P], g_val.
      split_grads: float [S, P], one gradient per training split.
      mu: the denominator's offset.

    Returns:
      float [S]; sum of absolute values 1 (all zero if every omega is 0).
    """
    return _normalized_omega(
        tf.linalg.matvec(split_grads, validation_grad),
        tf.reduce_sum(tf.square(split_grads), axis=1), mu)


def _normalized_omega(agreement, squared_norms, mu):
    """omega~ from <g_val, g_i> and |g_i|^2 (float [S] each)."""
    omega = agreement / (squared_norms + mu)
    total = tf.reduce_sum(tf.abs(omega))
    return omega / tf.where(total > 0, total, tf.ones_like(total))


def _flatten(grads):
    return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)


class DeepBilevel(base.MethodModel):
    """Deep Bilevel Learning as a Keras model.

    Args:
      splits: S, mini-batches per training batch.
      mu: omega's denominator offset.
      validation: `train_split` or `meta`.
      **kwargs: `MethodModel` arguments.
    """

    METRIC_NAMES = ("loss", "val_loss", "omega_min", "omega_max",
                    "negative_fraction")

    def __init__(self, *args, splits=4, mu=0.01, validation="train_split",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.splits = int(splits)
        self.mu = float(mu)
        self.validation = validation
        self.learner = learners.Learner(self.classifier.trunk,
                                        self.classifier.head)

    def split_gradient(self, params, images, labels):
        """(mean CE of the split, its gradient list, BN states)."""
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = self.learner.losses(params, images, labels)
            loss = tf.reduce_mean(losses)
        return loss, self.loss_scale.gradient(tape, loss, params), out

    def train_step(self, data):
        train, meta = data["train"], data["meta"]
        replicas = distribute.num_replicas()
        if self.splits % replicas:
            raise ValueError(
                f"Received dbl_splits={self.splits} with {replicas} "
                "replicas; expected a multiple of the replicas (each replica "
                "holds whole splits of the global batch). Set --dbl_splits "
                f"to a multiple of {replicas}."
            )
        local_splits = self.splits // replicas
        params = self.learner.current()
        images = tf.split(train["image"], local_splits)
        labels = tf.split(train["label"], local_splits)
        results = [self.split_gradient(params, x, y)
                   for x, y in zip(images, labels)]
        split_grads = [_dense(params, r[1]) for r in results]
        flat = tf.stack([_flatten(g) for g in split_grads])
        if self.validation == "meta":
            val_loss, val_grads, _ = self.split_gradient(
                params, meta["image"], meta["label"])
            # Equal meta slices: the mean of their gradients (and losses) is
            # the whole meta batch's.
            val_loss, validation = distribute.replica_mean(
                [val_loss, _flatten(_dense(params, val_grads))])
            first_trained = 0
        else:
            # Global split 0 is replica 0's first.
            val_loss, validation = distribute.broadcast(
                [results[0][0], flat[0]])
            first_trained = 1
        # Per split, in the global batch's order: <g_val, g_i>, |g_i|^2 and
        # the loss; a few scalars per split, so every replica gets all.
        stats = distribute.gather_batch(tf.stack([
            tf.linalg.matvec(flat, validation),
            tf.reduce_sum(tf.square(flat), axis=1),
            tf.stack([r[0] for r in results]),
        ], axis=1))
        omega = _normalized_omega(stats[first_trained:, 0],
                                  stats[first_trained:, 1], self.mu)
        # This replica's coefficients; the validation split's is 0.
        local_omega = tf.gather(tf.reshape(tf.concat(
            [tf.zeros([first_trained], omega.dtype), omega], axis=0),
            [replicas, local_splits]), distribute.replica_id())
        direction = distribute.replica_sum([
            tf.add_n([local_omega[j] * g[i]
                      for j, g in enumerate(split_grads)])
            for i in range(len(params))
        ])
        new_params, new_momenta = self.sgd.unroll(
            params, direction, self.step_counter)
        # The direction is all-reduced, so every replica agrees on `finite`
        # (omega of a non-finite gradient is NaN, which reaches W' too).
        finite = self.loss_scale.finite(new_params + new_momenta)
        self.sgd.assign(
            self.learner.variables,
            self.loss_scale.select(finite, new_params, params),
            self.loss_scale.select(finite, new_momenta, self.sgd.momenta))
        # One moving-average update per step, from the global batch's last
        # split (the last replica's last).
        self.learner.assign_states(distribute.broadcast(
            list(results[-1][2].states), source=replicas - 1))
        # Accuracy over every split's forward pass (the validation split's
        # too): each replica reports its own slice whole.
        return self.finish_step(
            train["label"], tf.concat([r[2].logits for r in results], 0),
            finite=finite, loss=tf.reduce_mean(stats[first_trained:, 2]), val_loss=val_loss,
            omega_min=tf.reduce_min(omega), omega_max=tf.reduce_max(omega),
            negative_fraction=tf.reduce_mean(
                tf.cast(omega < 0, omega.dtype)),
        )


def _dense(params, grads):
    """`grads` with None (no path) as zeros shaped like `params`."""
    return [tf.zeros_like(p) if g is None else g
            for p, g in zip(params, grads)]
