"""The DARTS candidate operations: one table from name to Keras layer.

Search cells and derived cells build their edges from `OPS`, so an op means
the same layers in both (research/nas.md §1.2). Two details follow the
reference code and are easy to get wrong:

* `sep_conv_kxk` is two ReLU-depthwise-pointwise-BN blocks; `dil_conv_kxk` is
  one.
* Stride-2 edges pad explicitly and convolve 'valid' (pools: stride 1, then
  subsample). TF's 'same' padding with stride 2 pads bottom/right only and
  shifts every output pixel silently (nas.md §8).

Every BatchNorm is `lfm_tf.models.layers.BatchNorm` (exact second
derivatives, needed by the second-order architecture gradient), with
PyTorch's epsilon 1e-5 and momentum 0.1 (Keras momentum 0.9). `affine=False`
(the search network) drops gamma and beta.
"""

from typing import Callable, Dict

import keras
import tensorflow as tf
from keras import ops

from lfm_tf.models import layers as lfm_layers

# Column order of the architecture logits.
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


def batch_norm(affine, name=None):
    return lfm_layers.BatchNorm(
        momentum=0.9, epsilon=1e-5, center=affine, scale=affine, name=name
    )


def _with_channels(shape, channels):
    """`shape` with its last axis replaced (sublayers are built explicitly:
    Keras would otherwise trace every unbuilt composite symbolically, once
    per nesting level, which took minutes for a small supernet)."""
    return tuple(shape[:-1]) + (int(channels),)


def _conv(filters, kernel, strides=1, name=None):
    return keras.layers.Conv2D(
        filters, kernel, strides=strides, padding="valid", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )


@keras.saving.register_keras_serializable(package="lfm_tf")
class Zero(keras.layers.Layer):
    """The `none` op: zeros at the output resolution."""

    def __init__(self, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)

    def call(self, inputs):
        return inputs[:, ::self.stride, ::self.stride, :] * 0.0

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


@keras.saving.register_keras_serializable(package="lfm_tf")
class Identity(keras.layers.Layer):
    """`skip_connect` at stride 1."""

    def call(self, inputs):
        return inputs


@keras.saving.register_keras_serializable(package="lfm_tf")
class FactorizedReduce(keras.layers.Layer):
    """Halves the resolution: ReLU, two 1x1 stride-2 convs (the second on the
    input shifted by one pixel) concatenated, BN.

    Args:
      filters: output channels (even).
      affine: BN with gamma and beta.
    """

    def __init__(self, filters, affine=True, **kwargs):
        super().__init__(**kwargs)
        if filters % 2:
            raise ValueError(
                f"Received filters={filters} for FactorizedReduce; expected "
                "an even number (two halves are concatenated)."
            )
        self.filters = int(filters)
        self.affine = bool(affine)
        self.conv_a = _conv(filters // 2, 1, 2, name="conv_a")
        self.conv_b = _conv(filters // 2, 1, 2, name="conv_b")
        self.norm = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.conv_a.build(input_shape)
        self.conv_b.build(input_shape)
        self.norm.build(_with_channels(input_shape, self.filters))

    def call(self, inputs, training=False):
        x = ops.relu(inputs)
        x = ops.concatenate(
            [self.conv_a(x), self.conv_b(x[:, 1:, 1:, :])], axis=-1
        )
        return self.norm(x, training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "affine": self.affine}


@keras.saving.register_keras_serializable(package="lfm_tf")
class ReLUConvBN(keras.layers.Layer):
    """ReLU, 1x1 conv, BN: the cell's input preprocessing."""

    def __init__(self, filters, affine=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.affine = bool(affine)
        self.conv = _conv(filters, 1, name="conv")
        self.norm = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.norm.build(_with_channels(input_shape, self.filters))

    def call(self, inputs, training=False):
        return self.norm(self.conv(ops.relu(inputs)), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "affine": self.affine}


@keras.saving.register_keras_serializable(package="lfm_tf")
class DepthwiseSeparable(keras.layers.Layer):
    """ReLU, depthwise conv (symmetric zero padding), 1x1 conv, BN.

    Args:
      filters: channels in and out.
      kernel: depthwise kernel size (odd).
      stride: depthwise stride.
      dilation: depthwise dilation.
      affine: BN with gamma and beta.
    """

    def __init__(self, filters, kernel, stride=1, dilation=1, affine=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel = int(filters), int(kernel)
        self.stride, self.dilation = int(stride), int(dilation)
        self.affine = bool(affine)
        pad = dilation * (kernel - 1) // 2
        self.pad = keras.layers.ZeroPadding2D(pad, name="pad")
        self.depthwise = keras.layers.DepthwiseConv2D(
            kernel, strides=1, padding="valid", dilation_rate=dilation,
            use_bias=False, depthwise_initializer="he_normal",
            name="depthwise",
        )
        self.pointwise = _conv(filters, 1, name="pointwise")
        self.norm = batch_norm(affine, name="bn")

    def build(self, input_shape):
        self.depthwise.build(input_shape)
        self.pointwise.build(input_shape)
        self.norm.build(_with_channels(input_shape, self.filters))

    def call(self, inputs, training=False):
        x = self.depthwise(self.pad(ops.relu(inputs)))
        # Stride 1 then subsample equals the symmetric-padded stride-2 conv,
        # and Keras rejects strides > 1 with dilation > 1 on some backends.
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        return self.norm(self.pointwise(x), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel": self.kernel, "stride": self.stride,
                "dilation": self.dilation, "affine": self.affine}


@keras.saving.register_keras_serializable(package="lfm_tf")
class SepConv(keras.layers.Layer):
    """`sep_conv_kxk`: two separable blocks, the stride on the first."""

    def __init__(self, filters, kernel, stride=1, affine=True, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.kernel, self.stride = filters, kernel, stride
        self.affine = affine
        self.block_a = DepthwiseSeparable(filters, kernel, stride, 1, affine,
                                          name="block_a")
        self.block_b = DepthwiseSeparable(filters, kernel, 1, 1, affine,
                                          name="block_b")

    def build(self, input_shape):
        self.block_a.build(input_shape)
        self.block_b.build(_with_channels(input_shape, self.filters))

    def call(self, inputs, training=False):
        return self.block_b(self.block_a(inputs, training=training),
                            training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel": self.kernel, "stride": self.stride,
                "affine": self.affine}


@keras.saving.register_keras_serializable(package="lfm_tf")
def max_pool_3x3(inputs):
    """3x3 max pool, stride 1, 'same' size, by explicit padding.

    Not `MaxPooling2D(padding="same")`: with equal input and output shapes,
    TF 2.21's CPU MaxPoolGradGrad (the second derivative that LFM-DARTS'
    exact hypergradient takes through W1' and W2') may forward its `grad`
    input's buffer to its output and overwrite values it still reads; the
    result is wrong by O(1) whenever graph scheduling lets it reuse the
    buffer (one device and two replicas disagreed by 0.5 on α,
    tests/nas/operations_test.py). Padding makes the input larger than the
    output, so the buffer cannot be reused; the values are those of 'same'
    padding.

    Args:
      inputs: float [B, H, W, C].

    Returns:
      float [B, H, W, C].
    """
    lowest = tf.as_dtype(inputs.dtype).min
    padded = ops.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]],
                     constant_values=lowest)
    return ops.max_pool(padded, 3, strides=1, padding="valid")


class Pool(keras.layers.Layer):
    """3x3 max or average pool (padding excluded from the average), with a
    trailing BN in the search network only (`norm=True`)."""

    def __init__(self, kind, stride=1, norm=False, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.stride, self.use_norm = kind, int(stride), bool(norm)
        self.pool = (
            None if kind == "max" else
            keras.layers.AveragePooling2D(3, strides=1, padding="same",
                                          name="pool"))
        self.norm = batch_norm(False, name="bn") if norm else None

    def build(self, input_shape):
        if self.norm is not None:
            self.norm.build(input_shape)

    def call(self, inputs, training=False):
        x = self.pool(inputs) if self.pool else max_pool_3x3(inputs)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        return self.norm(x, training=training) if self.norm else x

    def get_config(self):
        return {**super().get_config(), "kind": self.kind,
                "stride": self.stride, "norm": self.use_norm}


def _skip(filters, stride, affine, name):
    if stride == 1:
        return Identity(name=name)
    return FactorizedReduce(filters, affine, name=name)


# name -> builder(filters, stride, affine, search, name) -> layer. `search`
# adds the BN after pools that only the search network has.
OPS: Dict[str, Callable[..., keras.layers.Layer]] = {
    "none": lambda c, s, affine, search, name: Zero(s, name=name),
    "max_pool_3x3": lambda c, s, affine, search, name: Pool(
        "max", s, search, name=name),
    "avg_pool_3x3": lambda c, s, affine, search, name: Pool(
        "avg", s, search, name=name),
    "skip_connect": lambda c, s, affine, search, name: _skip(
        c, s, affine, name),
    "sep_conv_3x3": lambda c, s, affine, search, name: SepConv(
        c, 3, s, affine, name=name),
    "sep_conv_5x5": lambda c, s, affine, search, name: SepConv(
        c, 5, s, affine, name=name),
    "dil_conv_3x3": lambda c, s, affine, search, name: DepthwiseSeparable(
        c, 3, s, 2, affine, name=name),
    "dil_conv_5x5": lambda c, s, affine, search, name: DepthwiseSeparable(
        c, 5, s, 2, affine, name=name),
}


def build_op(name, filters, stride, affine, search=False, layer_name=None):
    """The layer of op `name`.

    Args:
      name: one of `PRIMITIVES`.
      filters: channels in and out.
      stride: 1, or 2 on reduction-cell edges from the cell inputs.
      affine: BN with gamma and beta (False in the search network).
      search: build the search network's variant (BN after pools).
      layer_name: the Keras layer name.

    Raises:
      ValueError: an unknown op name.
    """
    if name not in OPS:
        raise ValueError(
            f"Received operation {name!r}; expected one of {list(OPS)}."
        )
    return OPS[name](int(filters), int(stride), bool(affine), bool(search),
                     layer_name or name)
