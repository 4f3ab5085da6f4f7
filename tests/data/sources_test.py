"""Every source: digits, folders and archives, TFDS (mocked), arrays."""

import hashlib
import os
import shutil
import tarfile
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from lfm_tf import config as config_lib
from lfm_tf.data import sources

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CIFAR10_ARCHIVE = os.environ.get(
    "LFM_TF_CIFAR10_ARCHIVE",
    os.path.join(_REPO_ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz"))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")


def _write_images(root, classes=("cat", "dog"), per_class=3, size=5,
                  splits=("train", "test"), fmt="png"):
    """Writes random images to `<root>/<split>/<class>/NNN.<fmt>`.

    Returns:
      path -> (uint8 [size, size, 3] pixels, class index in sorted order).
    """
    rng = np.random.default_rng(0)
    order = sorted(classes)
    written = {}
    for split in splits:
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
                path = os.path.join(folder, f"{i:03d}.{fmt}")
                Image.fromarray(pixels).save(path)
                written[path] = (pixels, order.index(name))
    return written


def _tar(source_dir, archive, arcname):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_dir, arcname=arcname)
    return archive


class DigitsTest(tf.test.TestCase):

    def test_digits(self):
        from sklearn import datasets  # pylint: disable=g-import-not-at-top

        data = sources.load_digits()
        raw = datasets.load_digits()
        self.assertEqual(data.train_images.shape, (1797, 8, 8, 3))
        self.assertEqual(data.train_images.dtype, np.uint8)
        self.assertEqual(data.train_labels.dtype, np.int64)
        # 0..16 scaled to 0..255, the same in every channel.
        expected = np.round(raw.images * 255 / 16).astype(np.uint8)
        for channel in range(3):
            self.assertAllEqual(data.train_images[..., channel], expected)
        self.assertEqual(data.train_images.max(), 255)
        self.assertAllEqual(data.train_labels, raw.target)
        self.assertEqual(data.class_names, tuple(str(c) for c in range(10)))
        self.assertEqual(data.num_classes, 10)
        self.assertIsNone(data.test_images)
        self.assertIsNone(data.test_labels)


class ArraysTest(tf.test.TestCase):

    def test_grayscale_becomes_rgb(self):
        gray = np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6)
        for images in (gray, gray[..., None]):
            data = sources.from_arrays(images, [0, 1, 0, 1])
            self.assertEqual(data.train_images.shape, (4, 6, 6, 3))
            self.assertAllEqual(data.train_images[..., 2], gray)
        self.assertEqual(data.class_names, ("0", "1"))
        self.assertEqual(data.train_labels.dtype, np.int64)

    def test_with_test_split(self):
        data = sources.from_arrays(
            np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 2, 1], np.int32),
            class_names=["a", "b", "c"],
            test_images=np.ones((2, 4, 4), np.uint8), test_labels=[2, 2])
        self.assertEqual(data.test_images.shape, (2, 4, 4, 3))
        self.assertAllEqual(data.test_labels, [2, 2])
        self.assertEqual(data.num_classes, 3)

    def test_bad_inputs(self):
        images = np.zeros((2, 4, 4, 3), np.uint8)
        cases = [
            (dict(images=np.zeros((3, 4, 4, 3), np.uint8), labels=[0, 1]),
             "3 images but 2 labels"),
            (dict(images=np.zeros((2, 4, 4, 3), np.float32), labels=[0, 1]),
             r"dtype float32.*\(x \* 255\).round\(\)"),
            (dict(images=images, labels=[0, 5], class_names=["a", "b"]),
             r"labels in \[0, 5\]; expected \[0, 1\]"),
            (dict(images=images, labels=[0.0, 1.0]), "integer class ids"),
            (dict(images=np.zeros((2, 4, 4, 2), np.uint8), labels=[0, 1]),
             r"shape \(2, 4, 4, 2\)"),
            (dict(images=np.zeros((4, 4), np.uint8), labels=[0, 1]),
             r"shape \(4, 4\)"),
            (dict(images=images, labels=[0, 1],
                  test_images=np.zeros((1, 4, 4, 3), np.uint8)),
             "only one of test_images and test_labels"),
            (dict(images=images, labels=[0, 1],
                  test_images=np.zeros((1, 5, 5, 3), np.uint8),
                  test_labels=[0]), r"size \(5, 5, 3\).*one size"),
            (dict(images=images, labels=[0, 1], class_names=["a", "b"],
                  test_images=np.zeros((1, 4, 4, 3), np.uint8),
                  test_labels=[2]), r"test_labels in \[2, 2\]"),
        ]
        for kwargs, message in cases:
            with self.subTest(message):
                with self.assertRaisesRegex(ValueError, message):
                    sources.from_arrays(**kwargs)


class FolderTest(tf.test.TestCase):

    def test_train_and_test_folders(self):
        root = os.path.join(self.get_temp_dir(), "data")
        # Created out of order: labels must follow the sorted names.
        written = _write_images(root, classes=("zebra", "ant"))
        data = sources.load_image_folder(root)
        self.assertEqual(data.class_names, ("ant", "zebra"))
        self.assertEqual(data.train_images.shape, (6, 5, 5, 3))
        self.assertEqual(data.test_images.shape, (6, 5, 5, 3))
        self.assertAllEqual(data.train_labels, [0, 0, 0, 1, 1, 1])
        self.assertAllEqual(data.test_labels, [0, 0, 0, 1, 1, 1])
        # PNG is lossless: the exact pixels come back, in file order.
        for i, name in enumerate(["000", "001", "002"]):
            path = os.path.join(root, "train", "zebra", f"{name}.png")
            self.assertAllEqual(data.train_images[3 + i], written[path][0])

    def test_jpeg_and_grayscale(self):
        root = os.path.join(self.get_temp_dir(), "mixed_formats")
        written = _write_images(root, splits=("plain",), fmt="jpg", size=8)
        gray = np.full((8, 8), 77, np.uint8)
        Image.fromarray(gray).save(
            os.path.join(root, "plain", "cat", "g.png"))
        data = sources.load_image_folder(os.path.join(root, "plain"))
        self.assertEqual(data.train_images.shape, (7, 8, 8, 3))
        # Sorted file order: 000.jpg, 001.jpg, 002.jpg, g.png.
        self.assertAllEqual(data.train_images[3], np.full((8, 8, 3), 77))
        # JPEG is lossy: compare with PIL's decoding of the same file.
        path = os.path.join(root, "plain", "cat", "000.jpg")
        self.assertIn(path, written)
        with Image.open(path) as image:
            reference = np.asarray(image.convert("RGB"), np.int64)
        error = np.abs(data.train_images[0].astype(np.int64) - reference)
        # The two libjpeg set-ups round chroma differently by a few levels.
        self.assertLess(error.mean(), 2.0)
        self.assertLessEqual(error.max(), 8)

    def test_plain_class_folders_are_train_only(self):
        root = self.get_temp_dir()
        _write_images(root, splits=("only",))
        data = sources.load_image_folder(os.path.join(root, "only"))
        self.assertIsNone(data.test_images)
        self.assertEqual(data.class_names, ("cat", "dog"))
        self.assertEqual(data.train_images.shape, (6, 5, 5, 3))

    def test_archive_is_extracted_once_by_hash_and_cached(self):
        root = self.get_temp_dir()
        _write_images(os.path.join(root, "src", "mini"))
        archive = _tar(os.path.join(root, "src", "mini"),
                       os.path.join(root, "mini.tar.gz"), "nested/mini")
        with open(archive, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        cache = os.path.join(root, "cache")
        first = sources.load_image_folder(archive, cache)
        self.assertEqual(os.listdir(cache), [digest])  # No temporaries.
        extracted = os.path.join(cache, digest)
        self.assertTrue(os.path.exists(
            os.path.join(extracted, sources.DECODED_CACHE_NAME)))
        self.assertEqual(first.class_names, ("cat", "dog"))
        self.assertEqual(first.test_images.shape, (6, 5, 5, 3))
        # The second load reads the .npz: the images are no longer needed.
        shutil.rmtree(os.path.join(extracted, "nested"))
        second = sources.load_image_folder(archive, cache)
        self.assertAllEqual(first.train_images, second.train_images)
        self.assertAllEqual(first.train_labels, second.train_labels)
        self.assertAllEqual(first.test_images, second.test_images)
        self.assertAllEqual(first.test_labels, second.test_labels)
        self.assertEqual(first.class_names, second.class_names)

    def test_archive_of_plain_class_folders(self):
        root = self.get_temp_dir()
        _write_images(root, splits=("flat",), classes=("a", "b", "c"))
        archive = _tar(os.path.join(root, "flat"),
                       os.path.join(root, "flat.tar.gz"), "flat")
        data = sources.load_image_folder(archive,
                                         os.path.join(root, "cache2"))
        self.assertEqual(data.class_names, ("a", "b", "c"))
        self.assertIsNone(data.test_images)
        self.assertLen(data.train_labels, 9)

    def test_interrupted_extraction_is_not_trusted(self):
        root = self.get_temp_dir()
        _write_images(os.path.join(root, "src2"), splits=("train",))
        archive = _tar(os.path.join(root, "src2"),
                       os.path.join(root, "a.tar.gz"), "a")
        cache = os.path.join(root, "cache3")
        failing = mock.patch.object(tarfile.TarFile, "extractall",
                                    side_effect=OSError("disk full"))
        with failing, self.assertRaisesRegex(ValueError, "disk full"):
            sources.load_image_folder(archive, cache)
        self.assertEqual(os.listdir(cache), [])
        data = sources.load_image_folder(archive, cache)
        self.assertLen(data.train_labels, 6)

    def test_not_an_archive(self):
        path = os.path.join(self.get_temp_dir(), "junk.tar.gz")
        with open(path, "wb") as f:
            f.write(b"not a tar file")
        with self.assertRaisesRegex(ValueError,
                                    "junk.tar.gz that could not be extracted"):
            sources.load_image_folder(path, self.get_temp_dir())

    def test_no_images(self):
        root = os.path.join(self.get_temp_dir(), "empty")
        os.makedirs(os.path.join(root, "a"))
        os.makedirs(os.path.join(root, "b"))
        with open(os.path.join(root, "a", "notes.txt"), "w") as f:
            f.write("not an image")
        with self.assertRaisesRegex(ValueError, "no images.*<class>"):
            sources.load_image_folder(root)

    def test_corrupt_image_is_named(self):
        root = self.get_temp_dir()
        _write_images(root, splits=("bad",))
        broken = os.path.join(root, "bad", "dog", "001.png")
        with open(broken, "wb") as f:
            f.write(b"not a png")
        # A JPEG cut short, as an interrupted copy leaves it.
        truncated = os.path.join(root, "bad", "cat", "002.jpg")
        Image.fromarray(np.full((5, 5, 3), 9, np.uint8)).save(truncated)
        with open(truncated, "rb") as f:
            head = f.read()[:200]
        with open(truncated, "wb") as f:
            f.write(head)
        with self.assertRaisesRegex(
                ValueError, "2 image file.*cat/002.jpg.*dog/001.png.*Remove"):
            sources.load_image_folder(os.path.join(root, "bad"))

    def test_images_of_different_sizes(self):
        root = self.get_temp_dir()
        _write_images(root, splits=("sizes",))
        odd = os.path.join(root, "sizes", "dog", "big.png")
        Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(odd)
        with self.assertRaisesRegex(
                ValueError,
                r"different sizes.*\(5, 5, 3\).*big.png is \(7, 7.*"
                r"--image_size=5"):
            sources.load_image_folder(os.path.join(root, "sizes"))

    def test_image_size_resizes_a_folder_of_mixed_sizes(self):
        root = os.path.join(self.get_temp_dir(), "mixed")
        rng = np.random.default_rng(1)
        pixels = {"a": rng.integers(0, 256, (5, 7, 3), np.uint8),
                  "b": rng.integers(0, 256, (9, 4, 3), np.uint8)}
        for name, image in pixels.items():
            os.makedirs(os.path.join(root, name))
            Image.fromarray(image).save(os.path.join(root, name, "0.png"))
        with self.assertRaisesRegex(
                ValueError, r"a/0.png is \(5, 7, 3\).*b/0.png is \(9, 4, 3\)"
                r".*--image_size"):
            sources.load_image_folder(root)
        data = sources.load_source(config_lib.DataConfig(
            source="folder", data_path=root, image_size=6))
        self.assertEqual(data.train_images.shape, (2, 6, 6, 3))
        # The pixels the pipeline's (and the exported model's) resize gives.
        from lfm_tf.data import pipeline  # pylint: disable=g-import-not-at-top
        preprocessing = pipeline.Preprocessing(6, (0.0,) * 3, (1.0,) * 3)
        for got, name in zip(data.train_images, ("a", "b")):
            want = pipeline.resize(tf.constant(pixels[name]), preprocessing)
            self.assertAllEqual(got, want)

    def test_truncated_archive_is_named_and_cleaned_up(self):
        root = self.get_temp_dir()
        _write_images(os.path.join(root, "src4"), splits=("train",),
                      per_class=20, size=16)
        archive = _tar(os.path.join(root, "src4"),
                       os.path.join(root, "whole.tar.gz"), "d")
        with open(archive, "rb") as f:
            content = f.read()
        cut = os.path.join(root, "cut.tar.gz")
        with open(cut, "wb") as f:
            f.write(content[:len(content) // 2])
        cache = os.path.join(root, "cache5")
        with self.assertRaisesRegex(
                ValueError, r"cut.tar.gz \(\d+ bytes\), which looks "
                r"truncated or corrupt.*EOFError.*again"):
            sources.load_image_folder(cut, cache)
        self.assertEqual(os.listdir(cache), [])  # No .extract-* left.

    def test_train_and_test_classes_differ(self):
        root = os.path.join(self.get_temp_dir(), "differ")
        _write_images(root)
        os.makedirs(os.path.join(root, "test", "emu"))
        with self.assertRaisesRegex(ValueError,
                                    r"test classes \['cat', 'dog', 'emu'\]"):
            sources.load_image_folder(root)

    def test_missing_path(self):
        with self.assertRaisesRegex(ValueError,
                                    "/no/such/place, which does not exist"):
            sources.load_image_folder("/no/such/place")

    def test_real_cifar10_archive(self):
        if not os.path.exists(CIFAR10_ARCHIVE):
            self.skipTest(
                f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}; set "
                "LFM_TF_CIFAR10_ARCHIVE to its path to run this test.")
        # The default cache: warm after the first run (~20 s cold).
        data = sources.load_image_folder(CIFAR10_ARCHIVE)
        self.assertEqual(data.class_names, CIFAR10_CLASSES)
        self.assertEqual(data.train_images.shape, (50000, 32, 32, 3))
        self.assertEqual(data.test_images.shape, (10000, 32, 32, 3))
        self.assertAllEqual(np.bincount(data.train_labels), [5000] * 10)
        self.assertAllEqual(np.bincount(data.test_labels), [1000] * 10)


class TfdsTest(tf.test.TestCase):

    def test_mocked_grayscale_data_set(self):
        with tfds.testing.mock_data(num_examples=12):
            data = sources.load_tfds("mnist")
        self.assertEqual(data.train_images.shape, (12, 28, 28, 3))
        self.assertEqual(data.train_images.dtype, np.uint8)
        self.assertAllEqual(data.train_images[..., 0],
                            data.train_images[..., 2])
        self.assertEqual(data.test_images.shape, (12, 28, 28, 3))
        self.assertEqual(data.class_names, tuple(str(c) for c in range(10)))

    def test_load_source_dispatch(self):
        with tfds.testing.mock_data(num_examples=4):
            data = sources.load_source(config_lib.DataConfig(
                source="tfds", tfds_name="cifar10"))
        # Mocked CIFAR-10 has no label file, so its names are "0".."9".
        self.assertLen(data.class_names, 10)
        self.assertEqual(data.train_images.shape, (4, 32, 32, 3))
        self.assertBetween(int(data.train_labels.max()), 0, 9)

    def test_unknown_name(self):
        with self.assertRaisesRegex(ValueError, "tfds_name='no_such_set'"):
            sources.load_tfds("no_such_set")

    def test_unprepared_data_set_fails_without_downloading(self):
        data_dir = os.path.join(self.get_temp_dir(), "tfds_empty")
        with self.assertRaisesRegex(ValueError,
                                    "not prepared.*download_and_prepare"):
            sources.load_tfds("mnist", data_dir=data_dir)


class LoadSourceTest(tf.test.TestCase):

    def test_digits_and_arrays(self):
        config = config_lib.DataConfig(source="digits")
        self.assertEqual(sources.load_source(config).train_images.shape,
                         (1797, 8, 8, 3))
        arrays = sources.from_arrays(np.zeros((2, 3, 3), np.uint8), [0, 1])
        self.assertIs(
            sources.load_source(config_lib.DataConfig(source="arrays"),
                                arrays), arrays)

    def test_folder(self):
        root = os.path.join(self.get_temp_dir(), "via_config")
        _write_images(root)
        data = sources.load_source(config_lib.DataConfig(
            source="folder", data_path=root))
        self.assertEqual(data.class_names, ("cat", "dog"))

    def test_arrays_source_needs_arrays(self):
        with self.assertRaisesRegex(ValueError, "without arrays"):
            sources.load_source(config_lib.DataConfig(source="arrays"))


if __name__ == "__main__":
    tf.test.main()
