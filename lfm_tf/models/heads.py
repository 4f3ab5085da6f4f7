"""Classifier heads: features [B, D] -> logits [B, C].

`ModelConfig.head` picks one of `config.HEADS`:

* `dense`: z = h W + b, Kaiming-normal W (every backbone's default).
* `cosine`: z = s * (h / |h|)^T (W_c / |W_c|), the normalised linear layer
  LDAM (Cao et al. 2019, sec. 3.1 and its code's `NormedLinear`) is
  defined on: the logits are cosines times a fixed scale s
  (`ModelConfig.head_scale`, LDAM's and CosFace's 30), so the margins of
  `losses.ldam_loss` are in the units of a cosine whatever the feature
  norm, and the served softmax is the one the training loss saw.

Both are plain Keras layers, so the engine evaluates them at unrolled
weights with `stateless_call` and differentiates them twice.
"""

import keras
from keras import ops

from lfm_tf import config as config_lib

# Added under the square root of a squared norm: a zero feature vector
# (a dead ReLU trunk) gives zero logits, not NaN, and the second derivative
# stays finite.
_NORM_EPSILON = 1e-12


def _unit(x, axis):
    """x / |x| along `axis` (smoothed at 0)."""
    return x * ops.rsqrt(
        ops.sum(ops.square(x), axis=axis, keepdims=True) + _NORM_EPSILON)


@keras.saving.register_keras_serializable(package="lfm_tf")
class CosineHead(keras.layers.Layer):
    """Logits z = scale * cos(h, W_c), float [B, C] for features [B, D].

    Args:
      units: C, the number of classes.
      scale: s > 0, the fixed logit scale (not learned).
      kernel_initializer: initializer of W [D, C]; only its direction
        matters.
    """

    def __init__(self, units, scale=30.0, kernel_initializer="glorot_uniform",
                 **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1 or float(scale) <= 0:
            raise ValueError(
                f"Received units={units!r}, scale={scale!r}; expected "
                "units >= 1 and scale > 0. Set --head_scale > 0.")
        self.units = int(units)
        self.scale = float(scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(int(input_shape[-1]), self.units),
            initializer=self.kernel_initializer, name="kernel")

    def call(self, inputs, training=None):
        del training  # The same in training and inference.
        cosines = ops.matmul(_unit(inputs, -1), _unit(self.kernel, 0))
        return self.scale * cosines

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(
            units=self.units, scale=self.scale,
            kernel_initializer=keras.initializers.serialize(
                self.kernel_initializer))
        return config


def build_head(kind: str, num_classes: int, scale: float,
               kernel_initializer) -> keras.layers.Layer:
    """The head `kind` (one of `config.HEADS`) of `num_classes` outputs, named
    `head`.

    Args:
      kind: `dense` or `cosine`.
      num_classes: C.
      scale: the cosine head's s (unused by `dense`).
      kernel_initializer: a fresh initializer for the kernel.

    Raises:
      ValueError: an unknown kind.
    """
    if kind == "dense":
        return keras.layers.Dense(int(num_classes),
                                  kernel_initializer=kernel_initializer,
                                  name="head")
    if kind == "cosine":
        return CosineHead(int(num_classes), scale,
                          kernel_initializer=kernel_initializer, name="head")
    raise ValueError(
        f"Received head={kind!r}; expected one of "
        f"{list(config_lib.HEADS)}. Set --head accordingly.")
