"""tf.data: hold decoded pixels, shuffle, augment, normalise, zip train+meta.

One training element carries both streams, so `train_step` never pulls a
second iterator (the reference code's `next(iter(loader))` per step):

    {"train": {"image": float32 [B, H, W, 3], "label": int32 [B],
               "clean_label": int32 [B], "index": int32 [B]},
     "meta":  {"image": float32 [M, H, W, 3], "label": int32 [M],
               "index": int32 [M]}}

`train.index` is the position in `splits.train_index` (the row of the
per-example weight B); `meta.index` the position in `splits.meta_index` (the
entry of r). Batches have fixed shapes (drop_remainder), which a positional r
and XLA rely on.

The streams shuffle *positions* and gather whole batches from the uint8
pixels held in memory, then augment the batch with vectorised stateless ops:
about three times the throughput of mapping over single images on a 2-core
CPU (`benchmarks/input_pipeline.py`), and every random choice comes from the
config's seed, so a fixed seed repeats the same batches (with TF op
determinism on).
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
# Images resized or summed at a time on the numpy side (bounds memory).
_CHUNK = 4096
# std floor in [0, 1] units: a constant channel must not divide by zero.
_MIN_STD = 1e-3


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """uint8 pixels -> float32 model input; also put in exported models.

    Attributes:
      image_size: side length images are resized to; None keeps their size.
      mean: 3 per-channel means of training pixels, in [0, 1] units.
      std: 3 per-channel standard deviations, in [0, 1] units, > 0.
    """

    image_size: Optional[int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(
                f"Received mean={self.mean} and std={self.std}; expected 3 "
                "values each (RGB). Use pipeline.normalization_stats."
            )
        if min(self.std) <= 0:
            raise ValueError(
                f"Received std={self.std}; expected positive values."
            )
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(
                f"Received image_size={self.image_size}; expected a positive "
                "side length or None."
            )

    def to_dict(self) -> dict:
        """JSON-ready: plain ints, floats and lists."""
        return {
            "image_size": (None if self.image_size is None
                           else int(self.image_size)),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
        }

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return cls(values.get("image_size"),
                   tuple(float(m) for m in values["mean"]),
                   tuple(float(s) for s in values["std"]))


def _check_images(images, what="images"):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"Received {what} of dtype {images.dtype} and shape "
            f"{images.shape}; expected uint8 [N, H, W, 3]. Load them with "
            "lfm_tf.data.sources."
        )
    return images


def normalization_stats(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of training pixels, in [0, 1] units.

    Sums run in float64 over chunks, so 50k CIFAR images need megabytes, not
    the gigabyte a float copy of all pixels would.

    Args:
      images: uint8 [N, H, W, 3], the training images.

    Returns:
      (mean, std), float32 [3] each; std is at least 1e-3.
    """
    images = _check_images(images)
    total = np.zeros(3)
    squares = np.zeros(3)
    for start in range(0, len(images), _CHUNK):
        block = images[start:start + _CHUNK].reshape(-1, 3).astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    count = images.size // 3
    mean = total / count
    variance = np.maximum(squares / count - np.square(mean), 0.0)
    std = np.maximum(np.sqrt(variance) / 255.0, _MIN_STD)
    return (mean / 255.0).astype(np.float32), std.astype(np.float32)


def resize(images: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """Resizes [..., H, W, 3] to `image_size` (bilinear) if it is set.

    uint8 in gives uint8 out (rounded), so resizing once before caching and
    resizing inside the exported model give the same pixels.
    """
    if preprocessing.image_size is None:
        return images
    size = (preprocessing.image_size, preprocessing.image_size)
    resized = tf.image.resize(images, size, method="bilinear")
    if images.dtype == tf.uint8:
        return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)
    return resized


def normalize(images: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """Pixels in [0, 255] (uint8 or float) -> float32 (x / 255 - mean) / std."""
    mean = np.asarray(preprocessing.mean, np.float64)
    std = np.asarray(preprocessing.std, np.float64)
    # One multiply-add instead of divide, subtract, divide: the same value
    # up to float32 rounding, in half the passes over the batch.
    scale = tf.constant(1.0 / (255.0 * std), tf.float32)
    offset = tf.constant(-mean / std, tf.float32)
    return tf.cast(images, tf.float32) * scale + offset


def preprocess(images: tf.Tensor, preprocessing: Preprocessing) -> tf.Tensor:
    """The inference preprocessing, uint8 [..., H, W, 3] -> float32.

    Resize (if `image_size`), then normalise. Graph-safe: exported models
    call it inside their serving function.
    """
    return normalize(resize(images, preprocessing), preprocessing)


def crop_and_flip(images: tf.Tensor, seed: tf.Tensor, padding: int,
                  flip: bool) -> tf.Tensor:
    """Random crop after zero padding, then random horizontal flip.

    Both become one gather: each output pixel's source position in the
    padded image is computed from the crop offset and the mirror bit, which
    on a small CPU is several times faster than cropping and flipping in
    separate passes.

    Args:
      images: uint8 [B, H, W, C] (static H, W and C).
      seed: int32/int64 [2], a stateless seed.
      padding: pixels of zero padding on each side; 0 skips the crop.
      flip: mirror each image with probability 1/2.

    Returns:
      uint8 [B, H, W, C].
    """
    if not padding and not flip:
        return images
    height, width, channels = images.shape[1:]
    batch = tf.shape(images)[0]
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(images, [[0, 0], [padding, padding],
                             [padding, padding], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [batch, 2], crop_seed, 0, 2 * padding + 1, tf.int32)
    cols = tf.range(width)[None, :]  # [1, W]
    if flip:
        mirror = tf.random.stateless_uniform([batch, 1], flip_seed) < 0.5
        cols = tf.where(mirror, width - 1 - cols, cols)  # [B, W]
    rows = offsets[:, :1] + tf.range(height)[None, :]  # [B, H]
    cols = offsets[:, 1:] + cols  # [B, W]
    padded_width = width + 2 * padding
    source = rows[:, :, None] * padded_width + cols[:, None, :]  # [B, H, W]
    flat = tf.reshape(padded, [batch, -1, channels])
    picked = tf.gather(flat, tf.reshape(source, [batch, -1]), batch_dims=1)
    return tf.reshape(picked, [batch, height, width, channels])


def cutout(images: tf.Tensor, seed: tf.Tensor, size: int) -> tf.Tensor:
    """Zeroes one size x size square per image (DeVries & Taylor, 2017).

    Applied to *normalised* images, as in the original, so the square is the
    mean colour. Its centre is uniform over the image and the square is
    clipped at the border.

    Args:
      images: float32 [B, H, W, C].
      seed: int32/int64 [2], a stateless seed.
      size: side of the square; 0 returns `images`.

    Returns:
      float32 [B, H, W, C].
    """
    if not size:
        return images
    height, width = images.shape[1], images.shape[2]
    batch = tf.shape(images)[0]
    unit = tf.random.stateless_uniform([batch, 2], seed)
    centres = tf.cast(unit * tf.constant([height, width], tf.float32),
                      tf.int32)
    top = centres[:, 0, None] - size // 2  # [B, 1]
    left = centres[:, 1, None] - size // 2
    rows = tf.range(height)[None, :]
    cols = tf.range(width)[None, :]
    outside_rows = (rows < top) | (rows >= top + size)  # [B, H]
    outside_cols = (cols < left) | (cols >= left + size)  # [B, W]
    keep = outside_rows[:, :, None] | outside_cols[:, None, :]
    # A multiply by a 0/1 mask: half the time of tf.where on a CPU.
    return images * tf.cast(keep, images.dtype)[..., None]


def _resized_pixels(images, preprocessing):
    """uint8 pixels at the model's size, resized once, in chunks."""
    if preprocessing.image_size is None:
        return images
    return np.concatenate([
        resize(tf.constant(images[start:start + _CHUNK]), preprocessing)
        .numpy() for start in range(0, len(images), _CHUNK)
    ])


def _stream_seeds(seed):
    """Four independent int seeds: train/meta x shuffle/augmentation."""
    state = np.random.SeedSequence(seed).generate_state(4, np.uint32)
    return [int(s) & 0x7FFFFFFF for s in state]


def _permutation(count, pass_seed, stream_seed):
    """A uniform permutation of range(count), int64 [count], stateless."""
    seed = tf.stack([tf.cast(pass_seed, tf.int64),
                     tf.constant(int(stream_seed), tf.int64)])
    keys = tf.random.stateless_uniform([count], seed=seed)
    return tf.cast(tf.argsort(keys), tf.int64)


def _stream(images, columns, batch_size, shuffle_seed, augment_seed,
            config, preprocessing, repeat):
    """Batches of gathered, augmented, normalised examples.

    Args:
      images: uint8 [n, H, W, 3], this stream's examples in position order.
      columns: name -> int [n] per-example values (labels).
      batch_size: examples per batch (the remainder is dropped).
      shuffle_seed: seed of the order (reshuffled every pass).
      augment_seed: seed of the augmentation (new draws every iteration).
      config: `DataConfig` (augment, crop_padding, flip, cutout).
      preprocessing: `Preprocessing`.
      repeat: repeat forever (meta) or one pass per iteration (train).

    Returns:
      tf.data.Dataset of dicts with "image", "index" and `columns`.
    """
    pixels = tf.constant(_resized_pixels(images, preprocessing))
    values = {name: tf.constant(np.asarray(column, np.int32))
              for name, column in columns.items()}
    count = len(images)
    # Shuffling int positions is cheap enough for a full-size buffer: a
    # true uniform permutation, unlike a 10k-image buffer.
    if repeat:
        # One seed per pass, drawn in order: `shuffle(...).repeat()` would
        # take each pass's seed from a generator that read-ahead (the zip
        # and prefetch) advances at racy times, so a resumed stream could
        # see other meta batches.
        pass_seeds = tf.data.Dataset.random(
            seed=shuffle_seed, rerandomize_each_iteration=True)
        order = pass_seeds.flat_map(
            lambda pass_seed: tf.data.Dataset.from_tensor_slices(
                _permutation(count, pass_seed, shuffle_seed)))
    else:
        order = tf.data.Dataset.range(count).shuffle(
            count, seed=shuffle_seed, reshuffle_each_iteration=True)
    order = order.batch(batch_size, drop_remainder=True)
    seeds = tf.data.Dataset.random(
        seed=augment_seed, rerandomize_each_iteration=True).batch(2)

    def make_batch(positions, seed):
        index = tf.cast(positions, tf.int32)
        batch = tf.gather(pixels, index)
        crop_seed, cutout_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2))
        if config.augment:
            batch = crop_and_flip(batch, crop_seed, config.crop_padding,
                                  config.flip)
        batch = normalize(batch, preprocessing)
        if config.augment:
            batch = cutout(batch, cutout_seed, config.cutout)
        example = {"image": batch, "index": index}
        for name, value in values.items():
            example[name] = tf.gather(value, index)
        return example

    return tf.data.Dataset.zip(order, seeds).map(
        make_batch, num_parallel_calls=AUTOTUNE, deterministic=True)


def make_train_dataset(source, splits, config,
                       preprocessing: Preprocessing) -> tf.data.Dataset:
    """One epoch of zipped train + meta batches (see the module docstring).

    The train stream is finite (one pass, reshuffled every iteration, so
    Keras `fit` sees a new order each epoch); the meta stream repeats and is
    cut to the train stream's length by the zip.

    Args:
      source: `sources.SourceData`.
      splits: `splits.Splits` (train and meta indices into train images).
      config: `DataConfig` (batch_size, meta_batch_size, augment, flip,
        crop_padding, cutout, seed).
      preprocessing: `Preprocessing` (image_size, mean, std).

    Returns:
      tf.data.Dataset of {"train": {...}, "meta": {...}} with fixed shapes.

    Raises:
      ValueError: a batch larger than its split (no full batch would exist).
    """
    n_train, n_meta = len(splits.train_index), len(splits.meta_index)
    if config.batch_size > n_train:
        raise ValueError(
            f"Received batch_size={config.batch_size} but the training set "
            f"has {n_train} examples; expected at most that. Set "
            f"--batch_size <= {n_train}."
        )
    if config.meta_batch_size > n_meta:
        raise ValueError(
            f"Received meta_batch_size={config.meta_batch_size} but the meta "
            f"set has {n_meta} examples; expected at most that. Set "
            f"--meta_batch_size <= {n_meta} or raise --num_meta_per_class."
        )
    train_shuffle, train_augment, meta_shuffle, meta_augment = (
        _stream_seeds(config.seed))
    train = _stream(
        source.train_images[splits.train_index],
        {"label": splits.train_labels,
         "clean_label": splits.train_clean_labels},
        config.batch_size, train_shuffle, train_augment, config,
        preprocessing, repeat=False)
    meta = _stream(
        source.train_images[splits.meta_index],
        {"label": splits.meta_labels},
        config.meta_batch_size, meta_shuffle, meta_augment, config,
        preprocessing, repeat=True)
    dataset = tf.data.Dataset.zip({"train": train, "meta": meta})
    return dataset.prefetch(AUTOTUNE)


def make_eval_dataset(images: np.ndarray, labels: np.ndarray,
                      preprocessing: Preprocessing,
                      batch_size: int) -> tf.data.Dataset:
    """Every example once, in order, without augmentation; cached.

    Args:
      images: uint8 [N, H, W, 3].
      labels: int [N].
      preprocessing: `Preprocessing`.
      batch_size: examples per batch; the last batch may be smaller.

    Returns:
      tf.data.Dataset of (float32 [b, h, w, 3], int32 [b]).
    """
    images = _check_images(images)
    labels = np.asarray(labels, np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    dataset = dataset.batch(batch_size).map(
        lambda x, y: (preprocess(x, preprocessing), y),
        num_parallel_calls=AUTOTUNE, deterministic=True)
    return dataset.cache().prefetch(AUTOTUNE)


def meta_eval_dataset(source, splits, preprocessing: Preprocessing,
                      batch_size: int) -> tf.data.Dataset:
    """The clean meta set as an evaluation dataset (model selection)."""
    return make_eval_dataset(source.train_images[splits.meta_index],
                             splits.meta_labels, preprocessing, batch_size)


def test_arrays(source, splits) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 images, int64 labels) of the test set the splits chose."""
    if splits.test_from_train:
        images, labels = source.train_images, source.train_labels
    else:
        images, labels = source.test_images, source.test_labels
    return images[splits.test_index], labels[splits.test_index]


def test_dataset(source, splits, preprocessing: Preprocessing,
                 batch_size: int) -> tf.data.Dataset:
    """The test set as an evaluation dataset."""
    images, labels = test_arrays(source, splits)
    return make_eval_dataset(images, labels, preprocessing, batch_size)


def steps_per_epoch(splits, config) -> int:
    """Full training batches per epoch: n_train // batch_size."""
    return len(splits.train_index) // config.batch_size
