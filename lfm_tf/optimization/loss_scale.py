"""Dynamic loss scaling for float16 compute through unrolled steps.

Under `mixed_float16` the layers compute in float16 (variables, the last
trunk layers, the heads and every loss stay float32). Small gradients flowing
back through float16 activations underflow to zero. Keras'
`LossScaleOptimizer` scales only a plain `apply`; the multilevel methods take
inner SGD steps inside outer tapes, so the scaling is done where every
gradient is taken:

    g = grad(S * L) / S

with the scale S as the backward seed (`tape.gradient(..., output_gradients=
S)`) and the division in float32. The unrolled step W' = W - eta * g is then
mathematically unchanged, and an outer tape still differentiates through it
(the seed and the division are constants to the outer tape). Forward-mode
directional terms scale their tangent the same way; finite-difference
perturbations are scale-free (eps = fd_epsilon / |v|) and stay float32.

S is dynamic (as Keras' `LossScaleOptimizer`): after `growth_steps`
consecutive steps whose every update is finite it doubles; on a step with
any non-finite value it halves (not below `min_scale`) and that step's
updates are skipped: weights, momenta and optimizer slots (iteration counts
included) keep their values. The maths is in pure functions
(`next_scale`, `all_finite`, `unscale`, `select`), which
`DynamicLossScale` wraps with its two variables so that checkpoints carry
the scale and resume is exact.
"""

from typing import List, Optional, Sequence

import keras
import tensorflow as tf

# Keras' LossScaleOptimizer defaults.
INITIAL_SCALE = 2.0**15
GROWTH_STEPS = 2000
# A float16 gradient scaled past 2^24 overflows at |g| > 0.004 already;
# the cap also keeps S * S (exact directional terms) finite in float32.
MAX_SCALE = 2.0**24
MIN_SCALE = 1.0


def next_scale(scale, good_steps, finite, growth_steps=GROWTH_STEPS,
               factor=2.0, min_scale=MIN_SCALE, max_scale=MAX_SCALE):
    """The loss scale and finite-step counter after one step.

    Args:
      scale: float32 scalar, S before the step.
      good_steps: int64 scalar, consecutive finite steps before this one
        since S last changed.
      finite: bool scalar, whether every update of the step was finite.
      growth_steps: S grows after this many consecutive finite steps.
      factor: growth and back-off factor.
      min_scale: S never falls below this.
      max_scale: S never grows above this.

    Returns:
      (S' float32 scalar, good_steps' int64 scalar): finite and the counter
      reaching `growth_steps`: (min(S * factor, max_scale), 0); finite
      otherwise: (S, good_steps + 1); not finite: (max(S / factor,
      min_scale), 0).
    """
    scale = tf.convert_to_tensor(scale, tf.float32)
    good_steps = tf.convert_to_tensor(good_steps, tf.int64)
    counted = good_steps + 1
    grow = tf.logical_and(finite, counted >= growth_steps)
    new_scale = tf.where(
        finite,
        tf.where(grow, tf.minimum(scale * factor, max_scale), scale),
        tf.maximum(scale / factor, min_scale),
    )
    new_good_steps = tf.where(
        tf.logical_and(finite, tf.logical_not(grow)), counted,
        tf.zeros_like(counted))
    return new_scale, new_good_steps


def all_finite(tensors: Sequence[Optional[tf.Tensor]]) -> tf.Tensor:
    """True iff every entry of every tensor (None skipped) is finite.

    Args:
      tensors: float tensors of any shapes, or None.

    Returns:
      bool scalar.
    """
    checks = [tf.reduce_all(tf.math.is_finite(t)) for t in tensors
              if t is not None]
    if not checks:
        return tf.constant(True)
    return tf.reduce_all(tf.stack(checks))


def unscale(grads: Sequence[Optional[tf.Tensor]],
            scale) -> List[Optional[tf.Tensor]]:
    """grads / S, each in its own (float32) dtype; None stays None."""
    return [None if g is None else tf.convert_to_tensor(g) / tf.cast(
        scale, g.dtype) for g in grads]


def select(finite, new: Sequence[tf.Tensor],
           old: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """`new` where the step is finite, else `old` (element-wise lists)."""
    return [tf.where(finite, tf.convert_to_tensor(n), tf.convert_to_tensor(o))
            for n, o in zip(new, old)]


def scaled_gradient(tape, target, sources, scale, output_gradients=None):
    """grad(S * target) / S: `tape.gradient` with the scale as its seed.

    Args:
      tape: a `tf.GradientTape` that recorded `target`.
      target: float32 tensor (a scalar loss, or any shape with
        `output_gradients`).
      sources: list of tensors or variables.
      scale: float32 scalar S.
      output_gradients: upstream gradient shaped like `target` (None: ones).

    Returns:
      List aligned with `sources` (None where unconnected).
    """
    seed = tf.cast(scale, target.dtype)
    if output_gradients is not None:
        seed = tf.convert_to_tensor(output_gradients) * seed
    else:
        seed = tf.broadcast_to(seed, tf.shape(target))
    return unscale(tape.gradient(target, sources, output_gradients=seed),
                   scale)


class DynamicLossScale(keras.layers.Layer):
    """The loss scale S of one method model, with its checkpointed state.

    Disabled (every policy but `mixed_float16`), it creates no variables and
    every method is the identity or a constant, so float32 and bfloat16 runs
    execute exactly the ops they did without it.

    Args:
      enabled: scale (True) or pass through (False).
      initial_scale: S at the start.
      growth_steps: consecutive finite steps before S doubles.
    """

    def __init__(self, enabled, initial_scale=INITIAL_SCALE,
                 growth_steps=GROWTH_STEPS, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.enabled = bool(enabled)
        self.growth_steps = int(growth_steps)
        if self.enabled:
            self.loss_scale = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(
                    float(initial_scale)), trainable=False, dtype="float32",
                name="loss_scale")
            self.good_steps = self.add_weight(
                shape=(), initializer="zeros", trainable=False,
                dtype="int64", name="good_steps")
        self.built = True

    @property
    def scale(self) -> tf.Tensor:
        """S, float32 scalar (1 when disabled)."""
        if not self.enabled:
            return tf.constant(1.0)
        return tf.convert_to_tensor(self.loss_scale)

    def gradient(self, tape, target, sources, output_gradients=None):
        """Unscaled gradients of `target`, taken with S as the seed."""
        if not self.enabled:
            return tape.gradient(target, sources,
                                 output_gradients=output_gradients)
        return scaled_gradient(tape, target, sources, self.scale,
                               output_gradients)

    def finite(self, tensors) -> tf.Tensor:
        """Whether every value a step would write is finite (True when
        disabled, without checking)."""
        if not self.enabled:
            return tf.constant(True)
        return all_finite(tensors)

    def select(self, finite, new, old):
        """`new` if `finite` else `old`; `new` itself when disabled."""
        if not self.enabled:
            return list(new)
        return select(finite, new, old)

    def snapshot(self, variables) -> Optional[List[tf.Tensor]]:
        """The values of `variables` before an update that may be undone.

        Keras optimizers are undone rather than skipped: `apply` inside a
        `tf.cond` would put a cross-replica `merge_call` under control flow
        in a replica context, which tf.distribute refuses.
        """
        if not self.enabled:
            return None
        return [tf.identity(v) for v in variables]

    def restore_unless(self, finite, variables, snapshot):
        """Writes `snapshot` back into `variables` unless `finite`."""
        if snapshot is None:
            return
        for variable, old in zip(variables, snapshot):
            variable.assign(tf.where(finite, tf.convert_to_tensor(variable),
                                     old))

    def update(self, finite):
        """Advances S and the counter after a step; no-op when disabled."""
        if not self.enabled:
            return
        scale, good_steps = next_scale(self.loss_scale, self.good_steps,
                                       finite, self.growth_steps)
        self.loss_scale.assign(scale)
        self.good_steps.assign(good_steps)

    def logs(self) -> dict:
        """{"loss_scale": S} for the step logs when enabled, else {}."""
        return {"loss_scale": self.scale} if self.enabled else {}


def float16_policy(policy) -> bool:
    """Whether a Keras dtype policy (or its name) computes in float16."""
    name = policy if isinstance(policy, str) else policy.name
    return name == "mixed_float16"
