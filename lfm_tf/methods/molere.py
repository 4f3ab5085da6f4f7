"""MOLERE (Jain, Suggala & Shenoy, CVPR 2024): a learned, hard validation set.

Three levels (research/seed_systems.md §2.1, §2.3-2.4):

* splitter Theta(x, y) -> P(z | x, y), a soft train/validation assignment of
  every training example; it *maximises* the validation loss (the outer
  level: make the validation set hard), regularised by Learning-to-Split's
  losses so that it keeps the delta budget and the label distribution;
* meta-net phi(x) -> weight in (0, 1) (the middle level), descending the
  validation loss of a one-step lookahead (as Meta-Weight-Net);
* classifier theta (the inner level) on sum_j phi(x_j) l_j over the
  training part.

Per step: one classifier step; every K = `molere_meta_every` steps first a
meta-net step and a splitter step. The splitter's loss is

    (w_gap L_gap + w_ratio L_ratio + w_balance L_balance) / (w_gap + w_ratio
    + w_balance) - w_adv * sum_i s_i l_i / sum_i s_i

with L_gap the CE of the splitter predicting "train" exactly where the
classifier is right (on validation-part items), L_ratio = KL([1-delta,
delta] || [mean P(train), 1 - mean P(train)]), L_balance = KL(p(y) ||
p(y|train)) + KL(p(y) || p(y|val)), and s_i = P(val | x_i, y_i).

Choices where the paper is silent (README "MOLERE"):
* The -l_val term is made differentiable in Theta by the soft assignment
  s_i with l_i detached (the spec's recommendation); first order in Theta.
* phi and Theta are MLPs on the classifier's stop-gradient trunk features
  (Theta also sees the one-hot label); hidden widths `meta_net_hidden` and
  `molere_splitter_hidden`.
* The split is a per-example table z (1 = validation), a random delta
  fraction at the start. After `molere_warmup_epochs`, each example's z is
  re-drawn from the splitter when the example is next visited: the stream
  visits each example once per epoch, so this is the once-per-epoch
  re-split of Learning-to-Split, without a separate pass. The draw keeps
  the paper's budget |validation| = delta |S| exactly: round(delta * B) items
  of each batch are sampled without replacement in proportion to P(val)
  (Gumbel top-k). Independent Bernoulli(P(val)) draws, as in LS, let the
  validation part grow to 30-50% on 40%-noisy digits (measured): the gap
  loss sends every item the classifier gets wrong to validation and L_ratio
  does not hold it back.
* Train and validation items come from the same training batch, separated
  by z (fixed shapes; about delta * batch validation items per step). The
  engine's clean meta set is only the model-selection set, as for LRW.
* Classifier weights are not normalised (MW-Net parity): the loss is
  sum_j (1 - z_j) phi_j l_j / sum_j (1 - z_j).

Under tf.distribute N replicas compute what one device computes on the
global batch (`lfm_tf/distribute.py`):
* the classifier's and the lookahead's losses are this replica's share (its
  numerator over the global count of training-part items), their gradients
  summed over replicas (inside the meta tape for the lookahead), so phi's
  gradient is this replica's share of the one-device one and Keras' sum over
  replicas completes it;
* the splitter's objective is a function of the whole batch (mean
  P(train), label histograms, ratios of sums): the replicas gather the
  splitter's logits (differentiably), the labels, `correct`, z and the
  losses, every replica evaluates the one-device objective, and Theta's
  gradient is divided by N before Keras' sum;
* the re-split gathers P(val) and the indices: one Gumbel top-k over the
  global batch with the one-device noise (a stateless draw of shape [B]
  seeded by (seed, step)), written into every replica's copy of z;
* a cross-replica sum (all-reduces, Keras' optimizer apply) cannot sit in a
  `tf.cond` branch in a replica context, so with more than one replica the
  meta-net and splitter update is computed at every step and undone (phi,
  Theta and their optimizers' variables restored) on the steps that are
  not meta steps: the same result, at the cost of a meta step per step.

Under `mixed_float16` the classifier computes in float16 and phi and Theta
in float32 (their inputs are the float32 trunk features; the splitter's KL
terms need float32's range). The classifier's gradients and the lookahead's
inner and outer gradients are grad(S * .) / S with the dynamic loss scale S
(`optimization/loss_scale.py`); Theta's objective never crosses a float16
layer, so its gradient needs no scale. A step with any non-finite value is
undone whole: theta and its momenta, BatchNorm's statistics, phi, Theta,
their optimizers' slots and counts and the z table keep their values, and S
halves. Off the K-step grid the meta update cannot make a step non-finite
(it is not taken, or undone under several replicas).
"""

import keras
import numpy as np
import tensorflow as tf

from lfm_tf import distribute
from lfm_tf.methods import base
from lfm_tf.methods import learners

_EPS = 1e-8


def _kl(p, q):
    """KL(p || q) over the last axis; terms with p = 0 contribute 0."""
    return tf.reduce_sum(
        tf.where(p > 0, p * (tf.math.log(p + _EPS) - tf.math.log(q + _EPS)),
                 tf.zeros_like(p)), axis=-1)


def ratio_loss(train_probabilities, validation_fraction):
    """KL([1-delta, delta] || [r, 1-r]), r = mean P(train).

    Args:
      train_probabilities: float [B], P(z = train | x_i, y_i).
      validation_fraction: delta.

    Returns:
      scalar.
    """
    mean = tf.reduce_mean(train_probabilities)
    target = tf.cast([1.0 - validation_fraction, validation_fraction],
                     mean.dtype)
    return _kl(target, tf.stack([mean, 1.0 - mean]))


def label_balance_loss(train_probabilities, labels, num_classes):
    """KL(p(y) || p(y | train)) + KL(p(y) || p(y | val)), soft histograms.

    Args:
      train_probabilities: float [B], P(z = train).
      labels: int [B].
      num_classes: C.

    Returns:
      scalar.
    """
    one_hot = tf.one_hot(labels, num_classes, dtype=train_probabilities.dtype)
    prior = tf.reduce_mean(one_hot, axis=0)

    def conditional(weights):
        counts = tf.linalg.matvec(one_hot, weights, transpose_a=True)
        return counts / (tf.reduce_sum(counts) + _EPS)

    return (_kl(prior, conditional(train_probabilities))
            + _kl(prior, conditional(1.0 - train_probabilities)))


def gap_loss(splitter_logits, correct, validation_mask):
    """CE of the splitter predicting "train" (class 1) iff correct.

    Args:
      splitter_logits: float [B, 2]; column 1 is "train".
      correct: bool [B], the classifier's prediction equals the label.
      validation_mask: float [B], 1 on validation-part items.

    Returns:
      scalar, the mean over validation-part items (0 if there are none).
    """
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.cast(correct, tf.int32), splitter_logits)
    mask = tf.cast(validation_mask, ce.dtype)
    return tf.reduce_sum(mask * ce) / tf.maximum(tf.reduce_sum(mask), 1.0)


def soft_validation_loss(validation_probabilities, losses):
    """sum_i s_i l_i / sum_i s_i with the losses detached (s: P(val))."""
    losses = tf.stop_gradient(tf.cast(losses, validation_probabilities.dtype))
    return tf.reduce_sum(validation_probabilities * losses) / (
        tf.reduce_sum(validation_probabilities) + _EPS)


def splitter_objective(splitter_logits, labels, correct, validation_mask,
                       losses, validation_fraction, num_classes,
                       w_gap=1.0, w_ratio=1.0, w_balance=1.0,
                       w_adversarial=1.0):
    """The splitter's loss (module docstring) and its parts.

    Args:
      splitter_logits: float [B, 2] (column 1: "train").
      labels: int [B].
      correct: bool [B].
      validation_mask: float [B], the current split (1 = validation).
      losses: float [B], the classifier's per-example CE.
      validation_fraction: delta.
      num_classes: C.
      w_gap, w_ratio, w_balance, w_adversarial: the weights.

    Returns:
      (scalar loss, dict of the four parts).
    """
    probabilities = tf.nn.softmax(splitter_logits)
    train_probabilities = probabilities[:, 1]
    parts = {
        "gap_loss": gap_loss(splitter_logits, correct, validation_mask),
        "ratio_loss": ratio_loss(train_probabilities, validation_fraction),
        "balance_loss": label_balance_loss(train_probabilities, labels,
                                           num_classes),
        "soft_val_loss": soft_validation_loss(probabilities[:, 0], losses),
    }
    regulariser = (w_gap * parts["gap_loss"] + w_ratio * parts["ratio_loss"]
                   + w_balance * parts["balance_loss"]) / (
                       w_gap + w_ratio + w_balance)
    return regulariser - w_adversarial * parts["soft_val_loss"], parts


def _variable_dtype_under_mixed_precision():
    """The policy's variable dtype (float32) under a mixed policy, else None
    (follow the policy, e.g. float64 in tests); as MW-Net's meta-net."""
    policy = keras.config.dtype_policy()
    return (policy.variable_dtype
            if policy.compute_dtype != policy.variable_dtype else None)


def build_splitter(feature_dim, num_classes, hidden, name="splitter"):
    """MLP [features, one-hot label] -> 2 logits (column 1: "train").

    Under a mixed-precision policy it computes in float32: its input is the
    float32 trunk output, and the KL terms' log(q + 1e-8) would meet
    log(0) in float16.
    """
    dtype = _variable_dtype_under_mixed_precision()
    return keras.Sequential([
        keras.Input((feature_dim + num_classes,)),
        keras.layers.Dense(hidden, activation="relu", dtype=dtype),
        keras.layers.Dense(2, dtype=dtype),
    ], name=name)


def build_feature_meta_net(feature_dim, hidden, name="meta_net"):
    """phi: MLP features -> weight in (0, 1); float32 under a mixed-precision
    policy (its weights multiply float32 losses)."""
    dtype = _variable_dtype_under_mixed_precision()
    return keras.Sequential([
        keras.Input((feature_dim,)),
        keras.layers.Dense(hidden, activation="relu", dtype=dtype),
        keras.layers.Dense(1, activation="sigmoid", dtype=dtype),
    ], name=name)


def budget_split(validation_probabilities, validation_fraction, seed,
                 dtype=tf.float32):
    """round(delta * B) ones drawn without replacement, in proportion to
    P(val) (Gumbel top-k: top-k of log p + Gumbel noise).

    Args:
      validation_probabilities: float [B], P(z = val).
      validation_fraction: delta.
      seed: int [2], the stateless seed.
      dtype: of the result.

    Returns:
      [B] of 0/1 with exactly max(round(delta * B), 1) ones.
    """
    size = tf.shape(validation_probabilities)[0]
    count = tf.maximum(tf.cast(tf.round(
        validation_fraction * tf.cast(size, tf.float32)), tf.int32), 1)
    uniform = tf.random.stateless_uniform(
        [size], seed, minval=1e-12, maxval=1.0, dtype=tf.float32)
    keys = tf.math.log(tf.cast(validation_probabilities, tf.float32)
                       + 1e-12) - tf.math.log(-tf.math.log(uniform))
    chosen = tf.math.top_k(keys, count).indices
    return tf.scatter_nd(chosen[:, None], tf.ones([count], dtype), [size])


def initial_split(num_examples, validation_fraction, seed):
    """float [N]: exactly round(delta * N) ones (validation), seeded."""
    count = int(min(max(round(validation_fraction * num_examples), 1),
                    num_examples - 1))
    split = np.zeros(num_examples, np.float32)
    split[np.random.default_rng(seed).permutation(num_examples)[:count]] = 1
    return split


class Molere(base.MethodModel):
    """MOLERE as a Keras model; `call` is the classifier theta.

    Args:
      meta_net: phi, features float [B, D] -> [B, 1].
      splitter: Theta, [B, D + C] -> [B, 2].
      meta_optimizer, splitter_optimizer: their optimizers.
      num_train: N, the length of the split table.
      config: `MethodConfig` (`lrw_delta`, `molere_*`).
      steps_per_epoch: for the warm-up length.
      seed: seed of the initial split and of the re-split draws.
      **kwargs: `MethodModel` arguments.
    """

    METRIC_NAMES = ("loss", "val_loss", "weight_mean", "validation_fraction",
                    "validation_corrupted", "splitter_loss", "gap_loss",
                    "ratio_loss", "balance_loss", "soft_val_loss")

    def __init__(self, *args, meta_net, splitter, meta_optimizer,
                 splitter_optimizer, num_train, config, steps_per_epoch=1,
                 seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.meta_net = meta_net
        self.splitter = splitter
        self.meta_optimizer = meta_optimizer
        self.splitter_optimizer = splitter_optimizer
        self.meta_optimizer.build(meta_net.trainable_variables)
        self.splitter_optimizer.build(splitter.trainable_variables)
        self.config = config
        self.seed = int(seed)
        self.warmup_steps = int(config.molere_warmup_epochs) * int(
            steps_per_epoch)
        self.learner = learners.Learner(self.classifier.trunk,
                                        self.classifier.head)
        # z: 1 = validation; a model variable, so checkpoints keep the split.
        self.validation_assignment = self.add_weight(
            shape=(int(num_train),), initializer="zeros", trainable=False,
            name="validation_assignment")
        self.validation_assignment.assign(
            initial_split(int(num_train), config.lrw_delta, seed))

    def example_weights(self, features):
        """phi(x) float [B] from trunk features float [B, D] (detached)."""
        return tf.squeeze(self.meta_net(tf.stop_gradient(features)), axis=1)

    def splitter_logits(self, features, labels):
        """Theta's logits float [B, 2] (column 1: "train")."""
        inputs = tf.concat([
            tf.stop_gradient(features),
            tf.one_hot(labels, self.num_classes, dtype=features.dtype)], 1)
        return self.splitter(inputs)

    def meta_gradient(self, train, validation_mask):
        """dL_val(theta'(phi))/dphi through one lookahead step.

        theta' = theta - lr * grad sum_j (1-z_j) phi_j l_j / sum_j (1-z_j);
        L_val = sum_i z_i l_i(theta') / sum_i z_i, on the same batch.

        Under tf.distribute the sums run over the global batch: the
        lookahead gradient is all-reduced inside the outer tape and the
        gradients returned are this replica's share (they add up over
        replicas to the one-device gradient, as Keras' optimizers sum them).

        Args:
          train: the training batch (this replica's slice).
          validation_mask: float [b], z of the slice (1 = validation).

        Returns:
          (gradients aligned with `meta_net.trainable_variables`, L_val of
          the global batch).
        """
        params = self.learner.current()
        train_mask = 1.0 - validation_mask
        phi = self.meta_net.trainable_variables
        train_count, validation_count = distribute.replica_sum([
            tf.reduce_sum(train_mask), tf.reduce_sum(validation_mask)])
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(params)
                losses, out = self.learner.losses(
                    params, train["image"], train["label"])
                weights = self.example_weights(out.features)
                lookahead_share = tf.reduce_sum(
                    train_mask * weights * losses) / tf.maximum(
                        train_count, 1.0)
            # Summed inside the outer tape: phi's gradient reaches every
            # replica's training part through the one-device lookahead.
            # Unscaled inside the outer tape (loss_scale.py): theta' is
            # unchanged and its second-order path to phi flows.
            grads = distribute.replica_sum(
                self.loss_scale.gradient(inner, lookahead_share, params))
            ahead, _ = self.sgd.unroll(params, grads, self.step_counter)
            val_losses, _ = self.learner.losses(
                ahead, train["image"], train["label"])
            val_share = tf.reduce_sum(validation_mask * val_losses) / (
                tf.maximum(validation_count, 1.0))
        val_loss, = distribute.replica_sum([val_share])
        return self.loss_scale.gradient(outer, val_share, phi), val_loss

    def meta_and_splitter_update(self, train, validation_mask, out, losses):
        """One phi step and one Theta step.

        Returns:
          (dict of their metrics, bool scalar: whether both steps'
          gradients were finite; True without loss scaling).
        """
        phi_grads, val_loss = self.meta_gradient(train, validation_mask)
        self.meta_optimizer.apply(phi_grads,
                                  self.meta_net.trainable_variables)
        correct = tf.equal(tf.argmax(out.logits, axis=1, output_type=tf.int32),
                           tf.cast(train["label"], tf.int32))
        config = self.config
        theta = self.splitter.trainable_variables
        # The objective's means and ratios run over the global batch.
        labels, correct, validation_mask, losses = distribute.gather_batch((
            train["label"], tf.cast(correct, tf.int32), validation_mask,
            tf.stop_gradient(losses)))
        with tf.GradientTape() as tape:
            logits, = distribute.gather_batch(
                (self.splitter_logits(out.features, train["label"]),))
            loss, parts = splitter_objective(
                logits, labels, tf.cast(correct, tf.bool), validation_mask,
                losses, config.lrw_delta, self.num_classes,
                config.molere_w_gap, config.molere_w_ratio,
                config.molere_w_balance, config.molere_w_adversarial)
        # Every replica evaluates the whole objective: the gradient through
        # the gather is N times this replica's share. Float32 throughout
        # (features, Theta, the objective), so it needs no loss scale.
        theta_grads = distribute.scale_gradients(tape.gradient(loss, theta))
        self.splitter_optimizer.apply(theta_grads, theta)
        finite = self.loss_scale.finite(list(phi_grads) + list(theta_grads))
        return dict(val_loss=val_loss, splitter_loss=loss, **parts), finite

    def resplit(self, index, features, labels):
        """New z for the batch after warm-up: round(delta * B) validation
        items drawn without replacement in proportion to P(val | x, y).

        Under tf.distribute the draw is over the global batch of B (P(val)
        and the indices gathered, the one-device noise), and every replica
        writes all B rows, so the copies of z stay equal.

        Args:
          index: int [b], this replica's rows of z.
          features: float [b, D].
          labels: int [b].
        """
        probabilities = tf.nn.softmax(self.splitter_logits(features, labels))
        validation_probabilities, index = distribute.gather_batch(
            (probabilities[:, 0], index))
        seed = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(self.step_counter, tf.int64)])
        sampled = budget_split(validation_probabilities,
                               self.config.lrw_delta, seed,
                               self.validation_assignment.dtype)
        current = tf.gather(self.validation_assignment, index)
        new = tf.where(self.step_counter >= self.warmup_steps, sampled,
                       current)
        self.validation_assignment.assign(tf.tensor_scatter_nd_update(
            self.validation_assignment, index[:, None], new))

    def train_step(self, data):
        train = data["train"]
        index = tf.cast(train["index"], tf.int32)
        # Under loss scaling a non-finite step is undone whole (module
        # docstring); phi, Theta and z are written before it shows.
        state = self.meta_state_variables() + [self.validation_assignment]
        before = self.loss_scale.snapshot(state)
        params = self.learner.current()
        with tf.GradientTape() as tape:
            tape.watch(params)
            losses, out = self.learner.losses(params, train["image"],
                                              train["label"])
        validation_mask = tf.cast(
            tf.gather(self.validation_assignment, index), losses.dtype)
        is_meta_step = tf.equal(
            self.step_counter % self.config.molere_meta_every, 0)
        names = ("val_loss", "splitter_loss", "gap_loss", "ratio_loss",
                 "balance_loss", "soft_val_loss")

        def update():
            values, finite = self.meta_and_splitter_update(
                train, validation_mask, out, losses)
            return [tf.cast(values[n], losses.dtype) for n in names], finite

        def skipped():
            return [tf.zeros((), losses.dtype)] * len(names), tf.constant(True)

        if distribute.num_replicas() > 1:
            meta_values, finite = self._update_unless_skipped(
                is_meta_step, update, skipped)
        else:
            meta_values, finite = tf.cond(is_meta_step, update, skipped)
        # The classifier step on the training part, phi after its update.
        train_mask = 1.0 - validation_mask
        train_count, = distribute.replica_sum([tf.reduce_sum(train_mask)])
        with tape:
            weights = tf.stop_gradient(self.example_weights(out.features))
            share = tf.reduce_sum(train_mask * weights * losses) / (
                tf.maximum(train_count, 1.0))
        grads = distribute.replica_sum(
            self.loss_scale.gradient(tape, share, params))
        loss, = distribute.replica_sum([share])
        new_params, new_momenta = self.sgd.unroll(params, grads,
                                                  self.step_counter)
        if self.loss_scale.enabled:
            finite = _on_every_replica(tf.logical_and(
                finite, self.loss_scale.finite(
                    new_params + new_momenta + out.states)))
        self.sgd.assign(
            self.learner.variables,
            self.loss_scale.select(finite, new_params, params),
            self.loss_scale.select(finite, new_momenta, self.sgd.momenta))
        self.learner.assign_states(self.loss_scale.select(
            finite, out.states, self.learner.state_variables))
        self.resplit(index, out.features, train["label"])
        self.loss_scale.restore_unless(finite, state, before)
        meta_weight = tf.cast(is_meta_step, losses.dtype)
        for name, value in zip(names, meta_values):
            self._trackers[name].update_state(value, sample_weight=meta_weight)
        corrupted = tf.cast(
            tf.not_equal(train["label"], train["clean_label"]), losses.dtype)
        self._trackers["validation_corrupted"].update_state(
            corrupted, sample_weight=validation_mask)
        return self.finish_step(
            train["label"], out.logits,
            finite=finite if self.loss_scale.enabled else None, loss=loss,
            weight_mean=tf.reduce_mean(weights),
            validation_fraction=tf.reduce_mean(self.validation_assignment))

    def meta_state_variables(self):
        """phi, Theta and their optimizers' variables (Adam moments,
        iteration counts): what a meta update writes."""
        return (list(self.meta_net.trainable_variables)
                + list(self.meta_optimizer.variables)
                + list(self.splitter.trainable_variables)
                + list(self.splitter_optimizer.variables))

    def _update_unless_skipped(self, is_meta_step, update, skipped):
        """`update()` kept only where `is_meta_step` (several replicas).

        The update's all-reduces and Keras' cross-replica optimizer sums
        cannot run inside a `tf.cond` branch in a replica context, so it runs
        at every step and phi, Theta and their optimizers' variables (Adam
        moments, iteration counts) are restored on the other steps.

        Returns:
          `update()`'s (values, finite) on meta steps, `skipped()`'s
          elsewhere: an undone update cannot make the step non-finite.
        """
        state = self.meta_state_variables()
        before = [tf.identity(v) for v in state]
        values, finite = update()
        for variable, old in zip(state, before):
            variable.assign(tf.where(is_meta_step,
                                     tf.convert_to_tensor(variable), old))
        zeros, skipped_finite = skipped()
        return ([tf.where(is_meta_step, new, zero)
                 for new, zero in zip(values, zeros)],
                tf.where(is_meta_step, finite, skipped_finite))


def _on_every_replica(finite):
    """True iff `finite` (bool scalar) holds on every replica, so that all
    replicas skip or keep a step together (itself with one replica)."""
    failures, = distribute.replica_sum(
        [tf.cast(tf.logical_not(finite), tf.float32)])
    return tf.equal(failures, 0.0)
