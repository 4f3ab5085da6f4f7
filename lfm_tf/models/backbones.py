"""Classifier backbones for the learners W1 and W2.

Every backbone is a `Classifier`: a trunk (images -> features) followed by a
head (features -> logits: one Dense layer, or the cosine head of `heads.py`).
Keeping the two apart lets two learners share a trunk and keep separate
heads (PS), and lets the engine evaluate trunk and head at unrolled weights
with `stateless_call`.

The trunks, chosen by `ModelConfig.backbone`:

* `small_cnn`: three Conv-BN-ReLU layers (the last two strided) and global
  average pooling; for tests, CPU runs and the 8x8 digits.
* `resnet32`: the CIFAR ResNet-32 of He et al. 2016 (sec. 4.2): 3 stages of
  5 basic blocks with 16/32/64 channels and parameter-free option-A
  shortcuts, 0.4644M parameters with a 10-way head (the paper's 0.46M).
* `resnet8`, `resnet20`: the same family at n = 1 and n = 3 blocks per
  stage (depth 6n + 2); 75,290 and 269,722 parameters with a 10-way head
  (He et al.'s ResNet-20: 0.27M). ResNet-8 is the size a 2-core CPU trains
  for ~30 epochs of CIFAR-10 at 32x32 in a session.
* `wrn28_10`: the pre-activation Wide ResNet of Zagoruyko & Komodakis 2016,
  depth `ModelConfig.depth`, 36.48M parameters for WRN-28-10 (10 classes).

Rules that hold for all of them:

* Normalisation is `layers.BatchNorm`, whose training-mode second
  derivatives are exact (Keras' `BatchNormalization` drops a term).
* Nothing in them lacks a second derivative (no max-pooling); they run under
  nested `tf.GradientTape`s through `stateless_call`.
* Convolution and head kernels use Kaiming-normal initialisation (He et al.
  2015: untruncated normal, std sqrt(2 / fan_in)); a fresh initializer per
  layer draws its seed from Keras' global seed, so a build after
  `keras.utils.set_random_seed(s)` is reproducible.
* Variables take the global dtype policy (float64 after
  `keras.config.set_dtype_policy("float64")` and
  `keras.config.set_floatx("float64")`, set before building).
* No kernel regularizers: weight decay is the optimizer's.
"""

from typing import List, Optional, Sequence, Tuple

import keras
from keras import ops

from lfm_tf.models import heads
from lfm_tf.models import layers

# `ModelConfig.width` is the small CNN's base width (default 16) and WRN's
# widen factor; the default 16 means the paper's WRN-28-10.
_DEFAULT_WIDTH = 16
_DEFAULT_WIDEN_FACTOR = 10


def kaiming_normal():
    """A fresh Kaiming-normal (fan-in) initializer."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal"
    )


def conv(filters, kernel_size=3, strides=1, name=None):
    """Bias-free `same`-padded convolution with Kaiming-normal kernels."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=kaiming_normal(),
        name=name,
    )


@keras.saving.register_keras_serializable(package="lfm_tf")
class Classifier(keras.Model):
    """A trunk followed by a linear head; built on construction.

    `trainable_variables` (and so the order `stateless_call` expects) are the
    trunk's followed by the head's, as `trunk_and_head_variables` returns them.

    Args:
      trunk: layer or model mapping images float [B, H, W, 3] to features
        float [B, D].
      head: layer mapping features float [B, D] to logits float [B, C]
        (a `keras.layers.Dense(C)`).
      input_shape: (H, W, 3) to build for; default: the trunk's own input
        shape when it is a functional model.
      **kwargs: `keras.Model` arguments (name, dtype).
    """

    def __init__(self, trunk, head, input_shape=None, **kwargs):
        super().__init__(**kwargs)
        self.trunk = trunk
        self.head = head
        if input_shape is None and getattr(trunk, "inputs", None):
            input_shape = tuple(trunk.input_shape[1:])
        self._image_shape = (
            None if input_shape is None else tuple(int(d) for d in input_shape)
        )
        self._feature_dim = None
        if self._image_shape is not None:
            self.build((None,) + self._image_shape)

    def build(self, input_shape):
        """Builds trunk and head for images [B, H, W, 3] of `input_shape`."""
        input_shape = tuple(input_shape)
        if not self.trunk.built:
            self.trunk.build(input_shape)
        feature_shape = self.trunk.compute_output_shape(input_shape)
        if not self.head.built:
            self.head.build(feature_shape)
        self._feature_dim = int(feature_shape[-1])
        if self._image_shape is None:
            self._image_shape = tuple(input_shape[1:])

    def call(self, images, training=None):
        """Logits.

        Args:
          images: float [B, H, W, 3].
          training: BatchNorm batch statistics (and dropout) when True.

        Returns:
          float [B, num_classes].
        """
        return self.head(self.trunk(images, training=training))

    def features(self, images, training=None):
        """The trunk's output, float [B, feature_dim], for images [B,H,W,3]."""
        return self.trunk(images, training=training)

    @property
    def feature_dim(self) -> int:
        """D, the width of the trunk's output."""
        return self._feature_dim

    @property
    def num_classes(self) -> int:
        return int(self.head.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            trunk=keras.saving.serialize_keras_object(self.trunk),
            head=keras.saving.serialize_keras_object(self.head),
            input_shape=self._image_shape,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        trunk = keras.saving.deserialize_keras_object(config.pop("trunk"))
        head = keras.saving.deserialize_keras_object(config.pop("head"))
        return cls(trunk, head, **config)


def trunk_and_head_variables(
    classifier: Classifier,
) -> Tuple[List[keras.Variable], List[keras.Variable]]:
    """(trunk trainable variables, head trainable variables), in call order.

    Their concatenation is `classifier.trainable_variables`; under PS the
    trunk list is shared by W1 and W2 and the head lists are separate.
    """
    return (
        list(classifier.trunk.trainable_variables),
        list(classifier.head.trainable_variables),
    )


@keras.saving.register_keras_serializable(package="lfm_tf")
class SubsampleZeroPad(keras.layers.Layer):
    """Option-A shortcut: spatial subsampling, then zero channels (no weights).

    Keeps every `strides`-th row and column (the positions a `same`-padded
    strided 3x3 convolution centres on) and pads the channel axis with zeros
    on both sides up to `filters`, as the CIFAR ResNets of He et al. do.

    Args:
      filters: output channels, >= the input's.
      strides: spatial subsampling step.
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)

    def call(self, inputs):
        """[B, H, W, C] -> [B, ceil(H/s), ceil(W/s), filters]."""
        step = self.strides
        outputs = inputs[:, ::step, ::step, :]
        extra = self.filters - int(inputs.shape[-1])
        if extra < 0:
            raise ValueError(
                f"SubsampleZeroPad received {inputs.shape[-1]} channels; "
                f"expected at most filters={self.filters}."
            )
        before = extra // 2
        return ops.pad(
            outputs, [[0, 0], [0, 0], [0, 0], [before, extra - before]]
        )

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def _sub(size):
            return None if size is None else -(-size // self.strides)

        return (batch, _sub(height), _sub(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides)
        return config


def basic_block(x, filters, strides, shortcut, prefix):
    """He et al. 2016 basic block (post-activation), functional API.

    conv3x3(strides)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. The
    shortcut is the identity when shapes agree; otherwise option `A`
    (`SubsampleZeroPad`, no weights) or `B` (1x1 strided conv + BN).

    Args:
      x: KerasTensor [B, H, W, C_in].
      filters: C_out.
      strides: 1, or 2 for the first block of a down-sampling stage.
      shortcut: `A` or `B`, used only when the shapes change.
      prefix: layer-name prefix.

    Returns:
      KerasTensor [B, H/strides, W/strides, C_out].
    """
    y = conv(filters, 3, strides, name=f"{prefix}_conv1")(x)
    y = layers.BatchNorm(name=f"{prefix}_bn1")(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
    y = conv(filters, 3, 1, name=f"{prefix}_conv2")(y)
    y = layers.BatchNorm(name=f"{prefix}_bn2")(y)
    if strides == 1 and int(x.shape[-1]) == filters:
        skip = x
    elif shortcut == "A":
        skip = SubsampleZeroPad(filters, strides, name=f"{prefix}_skip")(x)
    elif shortcut == "B":
        skip = conv(filters, 1, strides, name=f"{prefix}_skip_conv")(x)
        skip = layers.BatchNorm(name=f"{prefix}_skip_bn")(skip)
    else:
        raise ValueError(
            f"Received shortcut={shortcut!r}; expected 'A' (zero padding) or "
            "'B' (1x1 projection)."
        )
    y = keras.layers.Add(name=f"{prefix}_add")([y, skip])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def small_cnn_trunk(width, input_shape, name="trunk"):
    """Conv-BN-ReLU with width, 2*width (stride 2), 4*width (stride 2), GAP.

    Args:
      width: base channel count.
      input_shape: (H, W, C); any H, W >= 1 (8x8 digits included).
      name: model name.

    Returns:
      functional model, images float [B, H, W, C] -> float [B, 4 * width].
    """
    images = keras.Input(tuple(input_shape), name="images")
    x = images
    for i, (filters, strides) in enumerate(
        ((width, 1), (2 * width, 2), (4 * width, 2))
    ):
        x = conv(filters, 3, strides, name=f"conv{i}")(x)
        x = layers.BatchNorm(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(images, x, name=name)


def cifar_resnet_trunk(depth, input_shape, width=16, shortcut="A",
                       name="trunk"):
    """CIFAR ResNet-(6n+2) (He et al. 2016, sec. 4.2).

    3x3 conv stem (width)-BN-ReLU, then 3 stages of n basic blocks with
    width, 2*width, 4*width channels (the last two start with stride 2),
    then global average pooling. ResNet-32 is n = 5.

    Args:
      depth: 6n + 2 (8, 20, 32, 44, 56, 110).
      input_shape: (H, W, C).
      width: channels of the first stage (16 in the paper).
      shortcut: `A` (zero-padding identity, the paper's CIFAR choice) or `B`
        (1x1 projections; +6.6k parameters for ResNet-32).
      name: model name.

    Returns:
      functional model, images float [B, H, W, C] -> float [B, 4 * width].

    Raises:
      ValueError: depth is not 6n + 2.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"Received ResNet depth={depth}; expected 6n+2 with n >= 1 "
            "(20, 32, 44, 56, 110)."
        )
    blocks = (depth - 2) // 6
    images = keras.Input(tuple(input_shape), name="images")
    x = conv(width, 3, 1, name="stem_conv")(images)
    x = layers.BatchNorm(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = basic_block(x, filters, strides, shortcut,
                            f"stage{stage}_block{block}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(images, x, name=name)


def _wide_block(x, filters, strides, dropout, prefix):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016).

    BN-ReLU-conv3x3(strides)-BN-ReLU-dropout-conv3x3, plus the shortcut: the
    input itself when shapes agree, else a 1x1 strided conv of the
    pre-activated input (as in the authors' code).
    """
    activated = layers.BatchNorm(name=f"{prefix}_bn1")(x)
    activated = keras.layers.ReLU(name=f"{prefix}_relu1")(activated)
    y = conv(filters, 3, strides, name=f"{prefix}_conv1")(activated)
    y = layers.BatchNorm(name=f"{prefix}_bn2")(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu2")(y)
    if dropout:
        y = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(y)
    y = conv(filters, 3, 1, name=f"{prefix}_conv2")(y)
    if strides == 1 and int(x.shape[-1]) == filters:
        skip = x
    else:
        skip = conv(filters, 1, strides, name=f"{prefix}_skip_conv")(activated)
    return keras.layers.Add(name=f"{prefix}_add")([y, skip])


def wide_resnet_trunk(depth, widen_factor, input_shape, dropout=0.0,
                      name="trunk"):
    """WRN-depth-k: conv stem (16), 3 stages of (depth-4)/6 wide blocks.

    Stages have 16k, 32k, 64k channels (the last two start with stride 2),
    then BN-ReLU and global average pooling.

    Args:
      depth: 6n + 4 (16, 22, 28, 40).
      widen_factor: k.
      input_shape: (H, W, C).
      dropout: rate between the two convolutions of each block (0: none).
      name: model name.

    Returns:
      functional model, images float [B, H, W, C] -> float [B, 64 * k].

    Raises:
      ValueError: depth is not 6n + 4, or widen_factor < 1.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"Received WRN depth={depth}; expected 6n+4 with n >= 1 "
            "(16, 22, 28, 40). Set --depth=28."
        )
    if widen_factor < 1:
        raise ValueError(
            f"Received WRN widen factor {widen_factor}; expected >= 1."
        )
    blocks = (depth - 4) // 6
    images = keras.Input(tuple(input_shape), name="images")
    x = conv(16, 3, 1, name="stem_conv")(images)
    for stage, filters in enumerate(
        (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    ):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _wide_block(x, filters, strides, dropout,
                            f"stage{stage}_block{block}")
    x = layers.BatchNorm(name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(images, x, name=name)


def wrn_widen_factor(config) -> int:
    """WRN's widen factor from `ModelConfig.width`.

    `width` is the widen factor, except that its default (16, the small CNN's
    base width) means 10, the paper's WRN-28-10. A widen factor of 16 cannot
    be asked for through the config (pass `widen_factor=16` to
    `build_backbone`).
    """
    return _DEFAULT_WIDEN_FACTOR if config.width == _DEFAULT_WIDTH else int(
        config.width
    )


# The CIFAR ResNet choices of `ModelConfig.backbone` and their depths 6n + 2.
_CIFAR_RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32}


def build_trunk(config, input_shape, widen_factor: Optional[int] = None):
    """The trunk named by `config.backbone`.

    Args:
      config: `ModelConfig`.
      input_shape: (H, W, C).
      widen_factor: WRN only; overrides `wrn_widen_factor(config)`.

    Returns:
      functional model, images float [B, H, W, C] -> features float [B, D].

    Raises:
      ValueError: an unknown backbone or a bad depth.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if config.backbone == "small_cnn":
        return small_cnn_trunk(config.width, input_shape)
    if config.backbone in _CIFAR_RESNET_DEPTHS:
        return cifar_resnet_trunk(_CIFAR_RESNET_DEPTHS[config.backbone],
                                  input_shape, shortcut="A")
    if config.backbone == "wrn28_10":
        factor = widen_factor or wrn_widen_factor(config)
        return wide_resnet_trunk(config.depth, factor, input_shape,
                                 config.dropout)
    raise ValueError(
        f"Received backbone={config.backbone!r}; expected one of "
        "['small_cnn', 'resnet8', 'resnet20', 'resnet32', 'wrn28_10']. "
        "Set --backbone accordingly."
    )


def build_backbone(config, num_classes: int, input_shape: Sequence[int],
                   name: str = "classifier", *,
                   widen_factor: Optional[int] = None) -> Classifier:
    """A `Classifier` whose variables exist on return.

    Args:
      config: `ModelConfig` (backbone, width, depth, dropout, head); with
        `genotype` set, the network of that searched cell instead (`width`
        initial channels, `cells` cells, the auxiliary head).
      num_classes: C, the head's width.
      input_shape: (H, W, 3) of the images it will see.
      name: model name.
      widen_factor: WRN only; overrides `wrn_widen_factor(config)`.

    Returns:
      `Classifier`, images float [B, H, W, 3] -> logits float [B, C].

    Raises:
      ValueError: an unknown backbone, a bad depth or num_classes < 1.
    """
    if int(num_classes) < 1:
        raise ValueError(
            f"Received num_classes={num_classes}; expected >= 1."
        )
    input_shape = tuple(int(d) for d in input_shape)
    if getattr(config, "genotype", None):
        # Imported here: the NAS package builds on this module.
        from lfm_tf.nas import derived_network  # pylint: disable=g-import-not-at-top

        return derived_network.build_derived_classifier(
            config.genotype, num_classes, input_shape, channels=config.width,
            layers=config.cells, auxiliary_weight=config.auxiliary_weight,
            name=name)
    trunk = build_trunk(config, input_shape, widen_factor)
    head = heads.build_head(config.head, num_classes, config.head_scale,
                            kaiming_normal())
    return Classifier(trunk, head, input_shape=input_shape, name=name)
