"""Per-example training losses (the `--loss` axis) and class weights."""

import numpy as np
import tensorflow as tf

from lfm_tf import config as config_lib
from lfm_tf.reweighting import mistake_weighting


def focal_loss(labels, logits, gamma):
    """Focal loss (Lin et al. 2017): (1 - p_y)^gamma * CE, per example.

    Args:
      labels: int [B].
      logits: float [B, C].
      gamma: focusing parameter; 0 gives plain CE.

    Returns:
      float [B].
    """
    ce = mistake_weighting.per_example_cross_entropy(labels, logits)
    p_true = tf.exp(-ce)
    return tf.pow(1.0 - p_true, gamma) * ce


def class_balanced_weights(class_counts, beta):
    """Cui et al. 2019: w_c = (1 - beta) / (1 - beta^n_c), summing to C.

    Args:
      class_counts: int [C], training examples per class (observed labels).
      beta: in (0, 1); the effective number is (1 - beta^n) / (1 - beta).

    Returns:
      float32 numpy [C].

    Raises:
      ValueError: a class has no examples.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if np.any(counts <= 0):
        empty = np.flatnonzero(counts <= 0).tolist()
        raise ValueError(
            f"Received class counts with empty classes {empty}; the "
            "class-balanced loss needs at least one example per class. Lower "
            "--imbalance_factor or use another method."
        )
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    weights = 1.0 / effective
    return (weights * len(counts) / weights.sum()).astype(np.float32)


def _checked_counts(class_counts, what):
    """class_counts as float64 numpy [C], refusing empty classes."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or np.any(counts <= 0):
        empty = np.flatnonzero(counts <= 0).tolist()
        raise ValueError(
            f"Received class counts {counts.tolist()} (empty classes "
            f"{empty}); {what} needs at least one training example per class. "
            "Lower --imbalance_factor or use --loss=ce."
        )
    return counts


def logit_adjusted_loss(labels, logits, class_counts, tau):
    """Logit-adjusted CE (Menon et al. 2021): CE(z + tau log pi).

    pi is the training label prior; adding tau log pi_c to class c's logit
    during training only makes the learner's own logits z estimate the
    balanced posterior, so inference uses z unchanged.

    Args:
      labels: int [B].
      logits: float [B, C].
      class_counts: [C] training examples per class (observed labels).
      tau: temperature >= 0; 0 gives plain CE.

    Returns:
      float [B].
    """
    counts = _checked_counts(class_counts, "the logit-adjusted loss")
    log_prior = tf.constant(np.log(counts / counts.sum()), logits.dtype)
    return mistake_weighting.per_example_cross_entropy(
        labels, logits + tf.cast(tau, logits.dtype) * log_prior)


def balanced_softmax_loss(labels, logits, class_counts):
    """Balanced softmax (Ren et al. 2020): CE(z + log n_c).

    Equal to the logit-adjusted loss at tau = 1 (the shift log n_c and
    log pi_c differ by a constant, which the softmax ignores); a separate
    name because both papers are baselines users pick.

    Args:
      labels: int [B].
      logits: float [B, C].
      class_counts: [C] training examples per class.

    Returns:
      float [B].
    """
    counts = _checked_counts(class_counts, "balanced softmax")
    log_counts = tf.constant(np.log(counts), logits.dtype)
    return mistake_weighting.per_example_cross_entropy(
        labels, logits + log_counts)


def ldam_margins(class_counts, max_margin):
    """LDAM's class margins (Cao et al. 2019): Delta_c = K / n_c^(1/4).

    K is chosen so that the rarest class gets `max_margin` (the paper's
    code tunes the largest margin, 0.5).

    Args:
      class_counts: [C] training examples per class.
      max_margin: the largest margin, > 0.

    Returns:
      float64 numpy [C], decreasing in n_c.
    """
    counts = _checked_counts(class_counts, "LDAM")
    inverse_root = counts ** -0.25
    return max_margin * inverse_root / inverse_root.max()


def ldam_loss(labels, logits, margins, scale, cosine_scale=None):
    """LDAM loss (Cao et al. 2019): CE(s * (cos - Delta_y e_y)).

    The true class's cosine is lowered by its class margin before the
    softmax; s = 30 restores a usable logit range. The paper's cosines
    come from a normalised head (`--head=cosine`, whose logits are
    s_h * cos): pass its s_h as `cosine_scale` and the margin applies to
    logits / s_h, the cosine, as in the paper. With a dense head
    (`cosine_scale` None) s multiplies unnormalised logits, a sharper
    softmax and an s-times larger head gradient: that did far better than
    s = 1 on the digits long tail (README, "The loss axis"), but on the
    CIFAR ResNet-8 its training loss started above 30 and under 40 % label
    noise it ended 8-17 points below ERM (seed 0, README "CIFAR-10
    protocol").

    Args:
      labels: int [B].
      logits: float [B, C].
      margins: [C] per-class margins Delta (`ldam_margins`).
      scale: s > 0, multiplies the margin-adjusted cosines (or logits).
      cosine_scale: s_h > 0 of a cosine head, whose logits are s_h * cos;
        None for a dense head.

    Returns:
      float [B].
    """
    labels = tf.cast(labels, tf.int32)
    if cosine_scale is not None:
        logits = logits / tf.cast(cosine_scale, logits.dtype)
    margin = tf.gather(tf.constant(margins, logits.dtype), labels)
    shifted = logits - margin[:, None] * tf.one_hot(
        labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return mistake_weighting.per_example_cross_entropy(
        labels, tf.cast(scale, logits.dtype) * shifted)


def generalized_cross_entropy(labels, logits, q):
    """GCE (Zhang & Sabuncu 2018): (1 - p_y^q) / q.

    q -> 0 gives CE, q = 1 the (noise-robust) MAE up to a factor. Computed
    as -expm1(-q CE) / q, since p_y^q = exp(-q CE): no p_y underflow.

    Args:
      labels: int [B].
      logits: float [B, C].
      q: in (0, 1].

    Returns:
      float [B].
    """
    ce = mistake_weighting.per_example_cross_entropy(labels, logits)
    q = tf.cast(q, ce.dtype)
    return -tf.math.expm1(-q * ce) / q


class TrainingLoss:
    """The per-example training loss l_i every learner step uses.

    One object per run: `--loss` with its parameters and LDAM's deferred
    re-weighting (DRW). Meta and validation losses are never this loss: they
    stay plain CE on the clean, balanced meta set.

    Args:
      loss: one of `config.LOSSES`.
      class_counts: [C] training examples per observed class; needed by
        every loss but `ce`, `focal`, `gce` and by DRW.
      focal_gamma: gamma of `focal`.
      logit_adjust_tau: tau of `logit_adjusted`.
      ldam_max_margin: the largest LDAM margin.
      ldam_scale: LDAM's s.
      ldam_cosine_scale: s_h of a cosine head (`ldam_loss`); None for a
        dense head.
      gce_q: q of `gce`.
      drw_start_step: the optimizer step from which every loss is
        multiplied by its class's class-balanced weight; None: never.
      drw_beta: beta of DRW's effective number.
    """

    def __init__(self, loss="ce", class_counts=None, *, focal_gamma=2.0,
                 logit_adjust_tau=1.0, ldam_max_margin=0.5, ldam_scale=30.0,
                 ldam_cosine_scale=None, gce_q=0.7, drw_start_step=None,
                 drw_beta=0.9999):
        if loss not in config_lib.LOSSES:
            raise ValueError(
                f"Received loss={loss!r}; expected one of "
                f"{list(config_lib.LOSSES)}. Set --loss to one of these.")
        self.loss = loss
        self.class_counts = class_counts
        self.focal_gamma = float(focal_gamma)
        self.logit_adjust_tau = float(logit_adjust_tau)
        self.ldam_scale = float(ldam_scale)
        self.ldam_cosine_scale = ldam_cosine_scale
        self.gce_q = float(gce_q)
        needs_counts = loss in ("logit_adjusted", "balanced_softmax", "ldam")
        if (needs_counts or drw_start_step is not None) and (
                class_counts is None):
            raise ValueError(
                f"Received loss={loss!r} with drw_start_step="
                f"{drw_start_step!r} but no class counts; expected the "
                "training set's class counts (DataFacts.class_counts).")
        self.margins = (ldam_margins(class_counts, ldam_max_margin)
                        if loss == "ldam" else None)
        self.drw_start_step = drw_start_step
        self.drw_weights = (
            None if drw_start_step is None
            else class_balanced_weights(class_counts, drw_beta))

    def base_loss(self, labels, logits):
        """l_i without DRW, float [B]."""
        if self.loss == "ce":
            return mistake_weighting.per_example_cross_entropy(labels, logits)
        if self.loss == "focal":
            return focal_loss(labels, logits, self.focal_gamma)
        if self.loss == "logit_adjusted":
            return logit_adjusted_loss(labels, logits, self.class_counts,
                                       self.logit_adjust_tau)
        if self.loss == "balanced_softmax":
            return balanced_softmax_loss(labels, logits, self.class_counts)
        if self.loss == "ldam":
            return ldam_loss(labels, logits, self.margins, self.ldam_scale,
                             self.ldam_cosine_scale)
        return generalized_cross_entropy(labels, logits, self.gce_q)

    def __call__(self, labels, logits, step=None):
        """l_i at optimizer step `step` (int scalar; DRW reads it).

        Args:
          labels: int [B].
          logits: float [B, C].
          step: the current optimizer step (0-based); None counts as 0.

        Returns:
          float [B].
        """
        losses = self.base_loss(labels, logits)
        if self.drw_weights is None:
            return losses
        weights = tf.gather(tf.constant(self.drw_weights, losses.dtype),
                            tf.cast(labels, tf.int32))
        on = tf.cast(step if step is not None else 0, tf.int64) >= (
            self.drw_start_step)
        return tf.where(on, weights * losses, losses)
