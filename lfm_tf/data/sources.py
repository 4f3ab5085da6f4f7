"""Image sources: embedded digits, image folders or archives, TFDS, arrays.

Every source returns a `SourceData`: uint8 RGB images [N, H, W, 3], int64
labels and class names in label order, plus the source's own test split
when it has one (digits has none; `splits.make_splits` then carves one).

Pixels are uint8 everywhere on purpose: it is what files decode to, what the
exported model accepts (DESIGN §5), and four times smaller than float32 in
the tf.data cache. Normalisation happens in `pipeline.preprocess`.
"""

import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Bump when decoding changes, so that stale caches are not reused.
DECODED_CACHE_NAME = "decoded_v1.npz"
_TFDS_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class SourceData:
    """Decoded images and labels of one data set.

    Attributes:
      train_images: uint8 [N, H, W, 3].
      train_labels: int64 [N] in [0, C).
      test_images: uint8 [M, H, W, 3], or None when the source has no test
        split.
      test_labels: int64 [M], or None.
      class_names: C names, in label order.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: Optional[np.ndarray]
    test_labels: Optional[np.ndarray]
    class_names: Tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _as_rgb_uint8(images, what):
    """uint8 [N, H, W, 3] from uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3].

    Only uint8 is accepted. A float array is ambiguous (is 1.0 white, or
    almost black?), so it is rejected with the conversion to use instead of
    being guessed at.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"Received {what} of dtype {images.dtype}; expected uint8 pixels "
            "in [0, 255]. Convert floats in [0, 1] with "
            "(x * 255).round().astype(np.uint8), floats in [0, 255] with "
            "x.round().astype(np.uint8)."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise ValueError(
            f"Received {what} of shape {images.shape}; expected a non-empty "
            "[N, H, W], [N, H, W, 1] or [N, H, W, 3] array."
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _as_labels(labels, num_images, what):
    """int64 [N] from integer labels, one per image."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Received {what} of shape {labels.shape} and dtype "
            f"{labels.dtype}; expected a vector of integer class ids."
        )
    if len(labels) != num_images:
        raise ValueError(
            f"Received {num_images} images but {len(labels)} {what}; "
            "expected one label per image."
        )
    return labels.astype(np.int64)


def _check_range(labels, num_classes, what):
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Received {what} in [{labels.min()}, {labels.max()}]; expected "
            f"[0, {num_classes - 1}] for {num_classes} class names. Pass "
            "class_names for every class or fix the labels."
        )


def from_arrays(images, labels, class_names: Optional[Sequence[str]] = None,
                test_images=None, test_labels=None) -> SourceData:
    """Wraps numpy arrays after checking them.

    Args:
      images: uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3]; grayscale is
        replicated to 3 channels. Floats are rejected (see the error).
      labels: integer [N] in [0, C).
      class_names: C names; default "0".."max(labels)".
      test_images: optional uint8 test images of the same H and W.
      test_labels: integer labels of `test_images`.

    Returns:
      `SourceData`.

    Raises:
      ValueError: wrong dtype or rank, mismatched lengths or image sizes,
        labels out of range, test images without test labels (or the
        reverse).
    """
    images = _as_rgb_uint8(images, "images")
    labels = _as_labels(labels, len(images), "labels")
    if class_names is None:
        class_names = [str(c) for c in range(int(labels.max()) + 1)]
    class_names = tuple(str(name) for name in class_names)
    _check_range(labels, len(class_names), "labels")
    if (test_images is None) != (test_labels is None):
        raise ValueError(
            "Received only one of test_images and test_labels; expected "
            "both or neither."
        )
    if test_images is not None:
        test_images = _as_rgb_uint8(test_images, "test_images")
        test_labels = _as_labels(test_labels, len(test_images),
                                 "test_labels")
        _check_range(test_labels, len(class_names), "test_labels")
        if test_images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"Received test images of size {test_images.shape[1:]} and "
                f"training images of size {images.shape[1:]}; expected one "
                "size. Resize them to match."
            )
    return SourceData(images, labels, test_images, test_labels, class_names)


def load_digits() -> SourceData:
    """scikit-learn's 1,797 8x8 handwritten digits, shipped inside sklearn.

    Pixels 0..16 are scaled to 0..255 and replicated to 3 channels. No test
    split: `make_splits` carves a stratified one.

    Returns:
      `SourceData` with uint8 [1797, 8, 8, 3] images, names "0".."9".
    """
    # Imported here: sklearn is slow to import and only this source needs it.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return from_arrays(images, digits.target, [str(c) for c in range(10)])


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> str:
    """`~/.cache/lfm_tf`: where archives are extracted by default."""
    return os.path.join(os.path.expanduser("~"), ".cache", "lfm_tf")


def extract_archive(path: str, cache_dir: Optional[str] = None) -> str:
    """Extracts a `.tar.gz` once, into `<cache_dir>/<sha256 of the archive>`.

    Extraction goes to a temporary folder inside the cache, renamed into
    place when complete, so an interrupted run never leaves a half-extracted
    folder that a later run would trust. Two processes racing both extract;
    the loser drops its copy.

    Args:
      path: the archive (any compression `tarfile` reads).
      cache_dir: parent of the extraction; default `default_cache_dir()`.

    Returns:
      The extraction folder.

    Raises:
      ValueError: the file is not a readable tar archive, or is truncated
        (the partial extraction is removed).
    """
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, _sha256(path))
    if os.path.isdir(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".extract-")
    try:
        logging.info("Extracting %s to %s", path, target)
        with tarfile.open(path, "r:*") as archive:
            # filter="data" refuses absolute paths, links out of the folder
            # and device files: the archive is untrusted input.
            archive.extractall(tmp, filter="data")
    except (EOFError, zlib.error) as error:
        # gzip's stream ends early or is garbled: a cut-off download or copy.
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"Received data_path={path} ({os.path.getsize(path)} bytes), "
            f"which looks truncated or corrupt ({type(error).__name__}: "
            f"{error}); expected a complete .tar.gz of class folders. Copy or"
            " download it again and compare its size or checksum with the "
            "original."
        ) from None
    except (tarfile.TarError, OSError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            f"Received data_path={path} that could not be extracted "
            f"({error}); expected a .tar.gz of class folders. Check the file."
        ) from error
    except BaseException:
        # Interrupted (KeyboardInterrupt) or anything else: no partial
        # extraction stays behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # Another process won.
    return target


def _subfolders(root):
    return sorted(
        name for name in os.listdir(root)
        if os.path.isdir(os.path.join(root, name)) and not name.startswith(".")
    )


def _find_split_root(root):
    """The shallowest folder holding `train/`, or None (plain classes)."""
    for current, folders, _ in os.walk(root):
        folders.sort()  # Walk in a fixed order.
        if "train" in folders:
            return current
    return None


def _list_images(root, class_names):
    """Image paths under `<root>/<class>/` and their labels, sorted."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            # Hidden files (macOS "._x.jpg" forks) are not images.
            if (file.lower().endswith(IMAGE_EXTENSIONS)
                    and not file.startswith(".")):
                files.append(os.path.join(folder, file))
                labels.append(label)
    if not files:
        raise ValueError(
            f"Received data_path with no images ({', '.join(IMAGE_EXTENSIONS)})"
            f" in class folders under {root}; expected <root>/<class>/<image>"
            " or <root>/train/<class>/<image>. Point --data_path there."
        )
    return files, np.asarray(labels, np.int64)


def _decode_file(path, image_size=None):
    """uint8 [H, W, 3] of one file (the first frame of a GIF).

    With `image_size`, resized to [image_size, image_size, 3] exactly as
    `pipeline.resize` does (bilinear, rounded to uint8), so images resized
    here are the pixels the pipeline and the exported model would give.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    if image_size is None:
        return image
    image.set_shape([None, None, 3])
    resized = tf.image.resize(image, (image_size, image_size),
                              method="bilinear")
    return tf.cast(tf.round(tf.clip_by_value(resized, 0, 255)), tf.uint8)


def decode_images(files: Sequence[str],
                  image_size: Optional[int] = None) -> np.ndarray:
    """Decodes image files in parallel with tf.data.

    tf.io decodes (not PIL) because the exported model decodes JPEG bytes
    with tf.io too: training and serving see the same pixels. It is also
    twice as fast as a PIL thread pool here.

    Args:
      files: paths of JPEG, PNG, BMP or GIF (first frame) files.
      image_size: resize every image to this side length (`--image_size`),
        which also makes a folder of mixed sizes usable; None keeps the
        files' size, which must then be one.

    Returns:
      uint8 [N, H, W, 3]; grayscale and palette images become RGB.

    Raises:
      ValueError: a file that does not decode (all such paths are named), or
        images of different sizes without `image_size`.
    """
    files = list(files)
    dataset = tf.data.Dataset.from_tensor_slices(
        (files, np.arange(len(files))))
    dataset = dataset.map(
        lambda path, i: (_decode_file(path, image_size), i),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A corrupt file must not abort the pass: skipping it leaves a gap in
    # the running index, which names every bad file in one error.
    dataset = dataset.ignore_errors()
    images, decoded = [], []
    for image, i in dataset.as_numpy_iterator():
        images.append(image)
        decoded.append(i)
    if len(decoded) < len(files):
        bad = sorted(set(range(len(files))) - set(decoded))
        names = [files[i] for i in bad]
        raise ValueError(
            f"Received {len(bad)} image file(s) that do not decode: "
            f"{names[:5]}{' ...' if len(bad) > 5 else ''}; expected JPEG, "
            "PNG, BMP or GIF. Remove or replace them."
        )
    first = images[0].shape
    for path, image in zip(files, images):
        if image.shape != first:
            raise ValueError(
                f"Received images of different sizes: {files[0]} is {first} "
                f"but {path} is {image.shape}; expected one size. Set "
                f"--image_size={first[0]} (or another side length) to resize"
                " every image to it, or resize the files first."
            )
    return np.stack(images)


def _read_split(folder, class_names, image_size=None):
    files, labels = _list_images(folder, class_names)
    logging.info("Decoding %d images under %s", len(files), folder)
    return decode_images(files, image_size), labels


def _unwrap(root):
    """Descends through lone wrapper folders, e.g. an archive's top folder.

    A folder whose only entry is one folder that itself holds folders is a
    wrapper (`mini/` in `mini/cat/1.png`), not a class folder.
    """
    while True:
        entries = [e for e in os.listdir(root) if not e.startswith(".")]
        if len(entries) != 1:
            return root
        child = os.path.join(root, entries[0])
        if not os.path.isdir(child) or not _subfolders(child):
            return root
        root = child


def _read_layout(root, image_size=None):
    """Decodes `<root>/[train|test]/<class>/*` or `<root>/<class>/*`."""
    split_root = _find_split_root(root)
    if split_root is None:
        root = _unwrap(root)
        class_names = _subfolders(root)
        if not class_names:
            raise ValueError(
                f"Received data_path={root} without class folders; expected "
                "<root>/<class>/<image> or <root>/train/<class>/<image>."
            )
        images, labels = _read_split(root, class_names, image_size)
        return from_arrays(images, labels, class_names)
    train_dir = os.path.join(split_root, "train")
    class_names = _subfolders(train_dir)
    if not class_names:
        raise ValueError(
            f"Received {train_dir} without class folders; expected "
            f"{train_dir}/<class>/<image>."
        )
    images, labels = _read_split(train_dir, class_names, image_size)
    test_dir = os.path.join(split_root, "test")
    if not os.path.isdir(test_dir):
        return from_arrays(images, labels, class_names)
    if _subfolders(test_dir) != class_names:
        raise ValueError(
            f"Received test classes {_subfolders(test_dir)} under {test_dir}"
            f" but training classes {class_names}; expected the same class "
            "folders in train/ and test/. Add or remove folders to match."
        )
    test_images, test_labels = _read_split(test_dir, class_names, image_size)
    return from_arrays(images, labels, class_names, test_images, test_labels)


def _save_decoded(source, path):
    """Writes the decoded arrays to an `.npz`, atomically."""
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    os.close(handle)
    has_test = source.test_images is not None
    empty = np.zeros((0,), np.uint8)
    try:
        np.savez(
            tmp,
            train_images=source.train_images,
            train_labels=source.train_labels,
            test_images=source.test_images if has_test else empty,
            test_labels=source.test_labels if has_test else empty,
            has_test=has_test,
            class_names=np.asarray(source.class_names, dtype=str),
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_decoded(path):
    with np.load(path, allow_pickle=False) as data:
        has_test = bool(data["has_test"])
        return SourceData(
            train_images=data["train_images"],
            train_labels=data["train_labels"],
            test_images=data["test_images"] if has_test else None,
            test_labels=data["test_labels"] if has_test else None,
            class_names=tuple(str(name) for name in data["class_names"]),
        )


def _decoded_cache_name(image_size):
    """The decoded cache's file name: images resized at decode differ."""
    if image_size is None:
        return DECODED_CACHE_NAME
    stem, extension = os.path.splitext(DECODED_CACHE_NAME)
    return f"{stem}_{int(image_size)}px{extension}"


def load_image_folder(path: str, cache_dir: Optional[str] = None,
                      image_size: Optional[int] = None) -> SourceData:
    """Class folders, or a `.tar.gz` of them.

    Layouts: `<root>/train/<class>/*` (+ optional `<root>/test/<class>/*`),
    where `<root>` is the shallowest folder holding `train/`; or
    `<root>/<class>/*` (training images only). Class names sorted
    alphabetically are the label indices. An archive is extracted once to
    `<cache_dir>/<sha256>/` and its decoded arrays are cached beside the
    extraction as an `.npz`, so a second load takes a fraction of a second.

    Args:
      path: a folder or a tar archive.
      cache_dir: extraction parent; default `~/.cache/lfm_tf`.
      image_size: resize every image to this side (`decode_images`); the
        decoded cache is then kept per size.

    Returns:
      `SourceData` (test split only with a `test/` folder).

    Raises:
      ValueError: a missing path, no images, undecodable images (named),
        images of different sizes without `image_size`, different class
        folders in train/ and test/, a truncated archive.
    """
    if not os.path.exists(path):
        raise ValueError(
            f"Received data_path={path}, which does not exist; expected a "
            "folder or .tar.gz of class folders. Set --data_path."
        )
    if os.path.isdir(path):
        return _read_layout(path, image_size)
    root = extract_archive(path, cache_dir)
    cached = os.path.join(root, _decoded_cache_name(image_size))
    if os.path.exists(cached):
        logging.info("Loading decoded images from %s", cached)
        return _load_decoded(cached)
    source = _read_layout(root, image_size)
    _save_decoded(source, cached)
    return source


def load_tfds(name: str, data_dir: Optional[str] = None) -> SourceData:
    """A prepared TFDS image-classification data set, train and test splits.

    Nothing is downloaded (`download=False`): an unprepared data set fails
    at once instead of after ~200 s of retries offline. Works under
    `tfds.testing.mock_data`.

    Args:
      name: TFDS name, e.g. `cifar10` or `mnist`.
      data_dir: TFDS data directory; default TFDS's own.

    Returns:
      `SourceData`, class names from `info.features["label"].names`,
      grayscale replicated to 3 channels.

    Raises:
      ValueError: unknown name, data set not prepared, images of different
        sizes.
    """
    # Imported here: tensorflow_datasets is slow to import and optional.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    try:
        train, info = tfds.load(name, split="train", data_dir=data_dir,
                                as_supervised=True, with_info=True,
                                download=False)
    except tfds.core.DatasetNotFoundError as error:
        raise ValueError(
            f"Received tfds_name={name!r}, which TFDS does not know; expected"
            " an image-classification data set name such as 'cifar10'. "
            "Check --tfds_name."
        ) from error
    except AssertionError as error:
        raise ValueError(
            f"Received tfds_name={name!r} that is not prepared in "
            f"data_dir={data_dir}; expected a prepared data set (nothing is "
            f"downloaded). Run tfds.builder({name!r}, data_dir=...)."
            "download_and_prepare() on a connected machine and pass "
            "--data_dir."
        ) from error
    class_names = info.features["label"].names
    images, labels = _tfds_arrays(train, name)
    test_images = test_labels = None
    # Mocked data sets (tfds.testing.mock_data) list no splits at all but
    # serve any split asked for; prepared ones list theirs.
    if "test" in info.splits or not info.splits:
        test = tfds.load(name, split="test", data_dir=data_dir,
                         as_supervised=True, download=False)
        test_images, test_labels = _tfds_arrays(test, name)
    return from_arrays(images, labels, class_names, test_images, test_labels)


def _tfds_arrays(dataset, name):
    """(uint8 images, int64 labels) of a supervised TFDS split."""
    try:
        batches = list(dataset.batch(_TFDS_BATCH).as_numpy_iterator())
    except tf.errors.InvalidArgumentError as error:
        raise ValueError(
            f"Received tfds_name={name!r} whose images differ in size; "
            "expected one size. Use --source=folder with resized images."
        ) from error
    images = np.concatenate([batch[0] for batch in batches])
    labels = np.concatenate([batch[1] for batch in batches])
    return images, labels


def load_source(config, arrays: Optional[SourceData] = None) -> SourceData:
    """The source named by `config.source`.

    Args:
      config: `DataConfig`.
      arrays: the data for `source="arrays"` (from `from_arrays`).

    Raises:
      ValueError: an unknown source, or `arrays` missing for "arrays".
    """
    if config.source == "digits":
        return load_digits()
    if config.source == "folder":
        return load_image_folder(config.data_path, config.cache_dir,
                                 config.image_size)
    if config.source == "tfds":
        return load_tfds(config.tfds_name, config.data_dir)
    if config.source == "arrays":
        if arrays is None:
            raise ValueError(
                "Received source='arrays' without arrays; expected a "
                "SourceData. Pass arrays=sources.from_arrays(images, labels)."
            )
        return arrays
    raise ValueError(
        f"Received source={config.source!r}; expected one of digits, folder,"
        " tfds, arrays. Set --source."
    )
