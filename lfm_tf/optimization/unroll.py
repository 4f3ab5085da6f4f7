"""Functional SGD: one formula for the real learner step and its unroll.

The hypergradient is taken through W' = step(W, g). If the real update used a
different rule (Keras' SGD, another clipping order), the hypergradient would
be the gradient of a step that is never taken. So both the unroll and the
applied update go through `sgd_step` below, and the unrolled tensors are
assigned as the real update instead of computing the step twice.

The rule (PyTorch's SGD, as in the LFM and DARTS reference code):

    d  = clip(g) + weight_decay * W
    m' = momentum * m + d
    W' = W - lr * m'                      (nesterov: W - lr * (d + momentum*m'))

Its Jacobians, which the chained hypergradients contract with (m is the
previous step's buffer, a constant of this step):

    dW'/dg = -s * J_clip(g),   dW'/dW (g held) = (1 - s * weight_decay) I,
    s = lr (nesterov: lr * (1 + momentum))   (`FunctionalSGD.step_scale`).

J_clip is the identity while |g| <= clip_norm, else the symmetric
(c/|g|)(I - g_hat g_hat^T) over all variables together
(`clip_jacobian_vector_product`).
"""

import math
from typing import List, Optional, Sequence, Tuple

import keras
import tensorflow as tf


def sgd_step(
    params: Sequence[tf.Tensor],
    grads: Sequence[tf.Tensor],
    momenta: Sequence[tf.Tensor],
    learning_rate,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    clip_norm: Optional[float] = None,
) -> Tuple[List[tf.Tensor], List[tf.Tensor]]:
    """One SGD step as a differentiable function of its inputs.

    Args:
      params: the weights W, tensors of any shapes.
      grads: dL/dW, same shapes (None is treated as zero).
      momenta: momentum buffers m, same shapes.
      learning_rate: scalar step size.
      momentum: momentum coefficient.
      weight_decay: L2 coefficient added to the gradient.
      nesterov: Nesterov momentum.
      clip_norm: clip `grads` to this global norm first (None: no clipping).

    Returns:
      (new_params, new_momenta), lists shaped like `params`.
    """
    grads = [
        tf.zeros_like(p) if g is None else tf.convert_to_tensor(g)
        for p, g in zip(params, grads)
    ]
    if clip_norm is not None:
        grads = clip_by_global_norm(grads, clip_norm)
    new_params, new_momenta = [], []
    for w, g, m in zip(params, grads, momenta):
        d = g + weight_decay * w if weight_decay else g
        m_new = momentum * m + d
        step = d + momentum * m_new if nesterov else m_new
        new_params.append(w - learning_rate * step)
        new_momenta.append(m_new)
    return new_params, new_momenta


def clip_by_global_norm(grads: Sequence[tf.Tensor], clip_norm: float):
    """g * c / max(|g|, c) over all tensors together, finite in value and
    derivative at g = 0.

    The value is `tf.clip_by_global_norm`'s. That op forms 1/|g|, infinite
    when every gradient is exactly zero (a batch fitted to float precision,
    as under LDAM's scale s = 30), and while its value stays finite there, a
    derivative taken through it is inf * 0 = NaN: the exact hypergradient
    differentiates this step, so one such batch made B, and then every
    weight, NaN.

    Args:
      grads: g, tensors of any shapes.
      clip_norm: c > 0.

    Returns:
      list shaped like `grads`.
    """
    squared = tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
    positive = squared > 0
    # The inner where keeps sqrt's infinite derivative at 0 out of the
    # graph; the outer one gives the norm 0 its value.
    norm = tf.where(
        positive, tf.sqrt(tf.where(positive, squared, tf.ones_like(squared))),
        tf.zeros_like(squared))
    clip = tf.constant(clip_norm, norm.dtype)
    scale = clip / tf.maximum(norm, clip)
    return [g * scale for g in grads]


def clip_binds(grads: Sequence[tf.Tensor], clip_norm: Optional[float]):
    """Whether `sgd_step` rescales `grads` (global norm > clip_norm).

    Args:
      grads: the unclipped gradients g (None entries are zero).
      clip_norm: the clip, or None for no clipping.

    Returns:
      bool scalar tensor (False without clipping).
    """
    if clip_norm is None:
        return tf.constant(False)
    present = [g for g in grads if g is not None]
    norm = tf.linalg.global_norm(present)
    # tf.constant, not tf.cast: a python float would go through float32.
    return norm > tf.constant(clip_norm, norm.dtype)


def clip_jacobian_vector_product(
    grads: Sequence[tf.Tensor],
    vectors: Sequence[tf.Tensor],
    clip_norm: Optional[float],
) -> List[tf.Tensor]:
    """J_clip(g) v for `tf.clip_by_global_norm`, over all tensors together.

    clip(g) = g * c / max(n, c), n = |g|. Where the clip binds (n > c),
    J v = (c/n) (v - g_hat <g_hat, v>), g_hat = g / n; else J v = v. J is
    symmetric, so this is also the transposed product the hypergradients
    need (v = dL/dW' contracted with dW'/dg).

    Args:
      grads: g, the unclipped gradients, tensors of any shapes (None: zero).
      vectors: v, shaped like `grads` (None: zero, returned as None).
      clip_norm: c, or None (then `vectors` is returned unchanged).

    Returns:
      list shaped like `vectors`.
    """
    if clip_norm is None:
        return list(vectors)
    pairs = [(g, v) for g, v in zip(grads, vectors)
             if g is not None and v is not None]
    if not pairs:
        return list(vectors)
    norm = tf.linalg.global_norm([g for g, _ in pairs])
    clip = tf.constant(clip_norm, norm.dtype)
    binds = norm > clip
    safe_norm = tf.where(binds, norm, tf.ones_like(norm))
    along = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype))
                      for g, v in pairs]) / safe_norm
    # Identity where the clip does not bind: the factors are then (1, 0).
    scale = tf.where(binds, clip / safe_norm, tf.ones_like(norm))
    remove = tf.where(binds, along / safe_norm, tf.zeros_like(norm))
    out = []
    for g, v in zip(grads, vectors):
        if v is None:
            out.append(None)
        elif g is None:
            out.append(tf.cast(scale, v.dtype) * v)
        else:
            out.append(tf.cast(scale, v.dtype) * (
                v - tf.cast(remove * g, v.dtype)))
    return out


def cosine_learning_rate(base, step, total_steps, warmup_steps=0,
                         dtype=tf.float32):
    """Cosine decay to 0 over `total_steps`, after a linear warm-up.

    Args:
      base: peak learning rate (python float).
      step: current step, scalar tensor.
      total_steps: length of the schedule (python int, > 0).
      warmup_steps: linear warm-up length (python int).
      dtype: the float type to compute in (float64 in float64 tests, so
        that a learning rate such as 0.1 is not rounded to float32).

    Returns:
      scalar tensor of `dtype`.
    """
    step = tf.cast(step, dtype)
    total = float(max(total_steps, 1))
    progress = tf.clip_by_value(
        (step - warmup_steps) / max(total - warmup_steps, 1.0), 0.0, 1.0
    )
    lr = 0.5 * base * (1.0 + tf.cos(math.pi * progress))
    if warmup_steps:
        lr = tf.where(step < warmup_steps, base * (step + 1) / warmup_steps, lr)
    return lr


class FunctionalSGD(keras.layers.Layer):
    """SGD whose step is `sgd_step`, with momentum slots as variables.

    Owns one momentum buffer per learner weight, so the whole optimizer state
    is checkpointed with the model. `unroll` returns the step as tensors (to
    differentiate through it); `assign` makes a computed step real.

    Args:
      learning_rate: base learning rate.
      momentum: momentum coefficient.
      weight_decay: L2 coefficient.
      nesterov: Nesterov momentum.
      clip_norm: global-norm gradient clipping (None: off).
      schedule: `constant` or `cosine` (over `total_steps`).
      total_steps: schedule length in steps.
      warmup_steps: linear warm-up steps.
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        weight_decay=0.0,
        nesterov=False,
        clip_norm=None,
        schedule="constant",
        total_steps=1,
        warmup_steps=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.base_learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.clip_norm = clip_norm
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.momenta = []

    def build_slots(self, variables):
        """Creates one zero momentum buffer per variable in `variables`."""
        self.momenta = [
            self.add_weight(
                shape=v.shape,
                initializer="zeros",
                trainable=False,
                dtype=v.dtype,
                name=f"momentum_{i}",
            )
            for i, v in enumerate(variables)
        ]
        self.built = True

    def learning_rate(self, step, dtype=tf.float32):
        """The scheduled step size at `step` (scalar tensor of `dtype`)."""
        if self.schedule == "cosine":
            return cosine_learning_rate(
                self.base_learning_rate, step, self.total_steps,
                self.warmup_steps, dtype,
            )
        return tf.constant(self.base_learning_rate, dtype)

    def unroll(self, params, grads, step, momenta=None):
        """W' and m' as tensors; differentiable w.r.t. params and grads.

        Args:
          params: current weights (variables or tensors).
          grads: gradients, same structure.
          step: scalar step counter for the schedule.
          momenta: buffers to use instead of the owned slots.

        Returns:
          (new_params, new_momenta) lists of tensors.
        """
        momenta = self.momenta if momenta is None else momenta
        dtype = tf.as_dtype(params[0].dtype)
        lr = tf.cast(self.learning_rate(step, schedule_dtype(dtype)), dtype)
        return sgd_step(
            params, grads, [tf.convert_to_tensor(m) for m in momenta], lr,
            self.momentum, self.weight_decay, self.nesterov, self.clip_norm,
        )

    def assign(self, variables, new_params, new_momenta):
        """Makes a step real: writes W' into `variables` and m' into slots."""
        for v, value in zip(variables, new_params):
            v.assign(value)
        for m, value in zip(self.momenta, new_momenta):
            m.assign(value)

    def step_scale(self, step, dtype=tf.float32):
        """s of dW'/dg = -s * J_clip(g): lr, times (1 + mu) if Nesterov."""
        lr = self.learning_rate(step, dtype)
        return lr * (1.0 + self.momentum) if self.nesterov else lr

    def clip_binds(self, grads):
        """Whether this optimizer's clip rescales `grads` (bool scalar)."""
        return clip_binds(grads, self.clip_norm)

    def clip_jvp(self, grads, vectors):
        """J_clip(grads) `vectors` for this optimizer's clip (see
        `clip_jacobian_vector_product`)."""
        return clip_jacobian_vector_product(grads, vectors, self.clip_norm)

    def start_vjp(self, vectors, hessian_clip_vectors, step,
                  dtype=tf.float32):
        """(dW'/dW)^T v = v - s (wd v + H J_clip v), the pull-back through
        the step's start, given H J_clip v (H: Hessian of the loss whose
        gradient g the step takes). The momentum buffer is a constant of
        the step, so it adds nothing.

        Args:
          vectors: v = dL/dW', tensors.
          hessian_clip_vectors: H J_clip(g) v, shaped alike.
          step: step counter for the schedule.
          dtype: float type of the step size.

        Returns:
          dL/dW through this step, list shaped like `vectors`.
        """
        scale = self.step_scale(step, dtype)
        out = []
        for v, hv in zip(vectors, hessian_clip_vectors):
            if self.weight_decay:
                hv = hv + self.weight_decay * v
            out.append(v - tf.cast(scale, v.dtype) * hv)
        return out


def schedule_dtype(dtype):
    """float64 for float64 weights, else float32 (the schedule's type)."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32
