"""tf.data: the zipped element, positions, augmentation, seeds, errors."""

import dataclasses
import json

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from lfm_tf import config as config_lib
from lfm_tf.data import pipeline
from lfm_tf.data import sources
from lfm_tf.data import splits as splits_lib

_MEAN = (0.4, 0.5, 0.6)
_STD = (0.2, 0.25, 0.3)


def _setup(num_test=None, **overrides):
    """120 random 6x6 images of 3 classes, split 80 train / 12 meta."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 6, 6, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 40)
    test = {}
    if num_test:
        test = dict(test_images=images[:num_test],
                    test_labels=labels[:num_test])
    source = sources.from_arrays(images, labels, ["a", "b", "c"], **test)
    values = dict(source="arrays", num_meta_per_class=4, batch_size=8,
                  meta_batch_size=6, noise_type="uniform", noise_rate=0.3,
                  crop_padding=1)
    values.update(overrides)
    config = config_lib.DataConfig(**values)
    splits = splits_lib.make_splits(source.train_labels, 3, config,
                                    num_test=num_test)
    mean, std = pipeline.normalization_stats(
        source.train_images[splits.train_index])
    prep = pipeline.Preprocessing(config.image_size, tuple(mean), tuple(std))
    return source, splits, config, prep


def _normalized(images, prep):
    return (images / 255.0 - np.array(prep.mean)) / np.array(prep.std)


def _first(dataset):
    return next(iter(dataset))


class NormalizationTest(tf.test.TestCase):

    def test_stats_by_hand(self):
        images = np.zeros((2, 2, 2, 3), np.uint8)
        images[0, ..., 0] = 255  # Channel 0: half 0, half 255.
        images[..., 1] = 51  # Channel 1: constant 0.2.
        mean, std = pipeline.normalization_stats(images)
        self.assertEqual(mean.dtype, np.float32)
        self.assertEqual(std.dtype, np.float32)
        self.assertAllClose(mean, [0.5, 0.2, 0.0])
        # A constant channel gets the 1e-3 floor, not a zero divisor.
        self.assertAllClose(std, [0.5, 1e-3, 1e-3])

    def test_stats_match_numpy_on_many_chunks(self):
        images = np.random.default_rng(1).integers(
            0, 256, (9000, 2, 2, 3), dtype=np.uint8)
        mean, std = pipeline.normalization_stats(images)
        pixels = images.reshape(-1, 3) / 255.0
        self.assertAllClose(mean, pixels.mean(0), atol=1e-6)
        self.assertAllClose(std, pixels.std(0), atol=1e-6)

    def test_stats_reject_floats(self):
        with self.assertRaisesRegex(ValueError, "float32.*expected uint8"):
            pipeline.normalization_stats(np.zeros((1, 2, 2, 3), np.float32))

    def test_preprocess(self):
        prep = pipeline.Preprocessing(None, _MEAN, _STD)
        images = np.random.default_rng(2).integers(
            0, 256, (2, 4, 4, 3), dtype=np.uint8)
        result = pipeline.preprocess(tf.constant(images), prep)
        self.assertEqual(result.dtype, tf.float32)
        self.assertAllClose(result, _normalized(images, prep), atol=1e-5)
        # Float pixels in [0, 255] (the export's resized images) agree.
        self.assertAllClose(
            pipeline.normalize(tf.constant(images, tf.float32), prep),
            result)

    def test_preprocess_resizes_in_a_graph(self):
        prep = pipeline.Preprocessing(4, _MEAN, _STD)
        serve = tf.function(
            lambda x: pipeline.preprocess(x, prep),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
        flat = np.full((1, 2, 2, 3), 128, np.uint8)
        result = serve(tf.constant(flat))
        self.assertEqual(result.shape, (1, 4, 4, 3))
        self.assertAllClose(result[0, 0, 0],
                            _normalized(np.full(3, 128), prep), atol=1e-5)

    def test_preprocessing_dict_round_trip(self):
        prep = pipeline.Preprocessing(16, tuple(np.float32([0.1, 0.2, 0.3])),
                                      (0.5, 0.25, 0.125))
        values = json.loads(json.dumps(prep.to_dict()))
        again = pipeline.Preprocessing.from_dict(values)
        self.assertEqual(again.image_size, 16)
        self.assertAllClose(again.mean, prep.mean)
        self.assertEqual(again.std, (0.5, 0.25, 0.125))

    def test_preprocessing_rejects_bad_values(self):
        with self.assertRaisesRegex(ValueError, "3 values each"):
            pipeline.Preprocessing(None, (0.5,), (0.2,) * 3)
        with self.assertRaisesRegex(ValueError, "std=.*positive"):
            pipeline.Preprocessing(None, _MEAN, (0.2, 0.0, 0.2))


class AugmentationTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.images = np.random.default_rng(3).integers(
            1, 256, (64, 5, 7, 3), dtype=np.uint8)  # No zero pixels.
        self.seed = tf.constant([4, 5], tf.int64)

    def test_crop_is_a_window_of_the_padded_image(self):
        padding = 2
        result = pipeline.crop_and_flip(self.images, self.seed, padding,
                                        flip=False).numpy()
        self.assertEqual(result.dtype, np.uint8)
        padded = np.pad(self.images, [[0, 0], [2, 2], [2, 2], [0, 0]])
        offsets = set()
        for image, original in zip(result, padded):
            matches = [(dy, dx) for dy in range(5) for dx in range(5)
                       if np.array_equal(original[dy:dy + 5, dx:dx + 7],
                                         image)]
            self.assertNotEmpty(matches)
            offsets.add(matches[0])
        self.assertGreater(len(offsets), 10)  # Offsets vary per image.

    def test_flip_mirrors_about_half(self):
        result = pipeline.crop_and_flip(self.images, self.seed, 0,
                                        flip=True).numpy()
        mirrored = np.all(result == self.images[:, :, ::-1], axis=(1, 2, 3))
        kept = np.all(result == self.images, axis=(1, 2, 3))
        self.assertTrue(np.all(mirrored | kept))
        self.assertBetween(int(mirrored.sum()), 16, 48)

    def test_crop_then_flip(self):
        result = pipeline.crop_and_flip(self.images, self.seed, 1,
                                        flip=True).numpy()
        padded = np.pad(self.images, [[0, 0], [1, 1], [1, 1], [0, 0]])
        for image, original in zip(result, padded):
            windows = [original[dy:dy + 5, dx:dx + 7]
                       for dy in range(3) for dx in range(3)]
            self.assertTrue(any(
                np.array_equal(w, image) or np.array_equal(w[:, ::-1], image)
                for w in windows))

    def test_nothing_asked_changes_nothing(self):
        result = pipeline.crop_and_flip(self.images, self.seed, 0, False)
        self.assertAllEqual(result, self.images)

    @parameterized.parameters(1, 2, 3)
    def test_cutout_zeroes_one_clipped_square(self, size):
        ones = tf.ones([64, 5, 7, 3])
        result = pipeline.cutout(ones, self.seed, size).numpy()
        for image in result:
            zero = image[..., 0] == 0
            self.assertAllEqual(zero, np.all(image == 0, axis=-1))
            rows = np.flatnonzero(zero.any(axis=1))
            cols = np.flatnonzero(zero.any(axis=0))
            self.assertNotEmpty(rows)  # The centre is always inside.
            # The zeros fill a rectangle of at most size x size.
            self.assertEqual(zero.sum(), len(rows) * len(cols))
            self.assertLessEqual(len(rows), size)
            self.assertLessEqual(len(cols), size)
            self.assertEqual(len(rows), rows[-1] - rows[0] + 1)
        self.assertAllEqual(pipeline.cutout(ones, self.seed, 0), ones)

    def test_same_seed_same_result_in_graph_and_eager(self):
        eager = pipeline.crop_and_flip(self.images, self.seed, 2, True)
        graph = tf.function(pipeline.crop_and_flip)(
            tf.constant(self.images), self.seed, 2, True)
        self.assertAllEqual(eager, graph)
        other = pipeline.crop_and_flip(self.images, tf.constant([4, 6]), 2,
                                       True)
        self.assertNotAllEqual(eager, other)


class TrainDatasetTest(tf.test.TestCase):

    def test_element_structure(self):
        source, splits, config, prep = _setup()
        dataset = pipeline.make_train_dataset(source, splits, config, prep)
        spec = dataset.element_spec
        self.assertEqual(set(spec), {"train", "meta"})
        self.assertEqual(set(spec["train"]),
                         {"image", "label", "clean_label", "index"})
        self.assertEqual(set(spec["meta"]), {"image", "label", "index"})
        self.assertEqual(spec["train"]["image"],
                         tf.TensorSpec((8, 6, 6, 3), tf.float32))
        self.assertEqual(spec["meta"]["image"],
                         tf.TensorSpec((6, 6, 6, 3), tf.float32))
        for part, size in (("train", 8), ("meta", 6)):
            for key in spec[part]:
                if key != "image":
                    self.assertEqual(spec[part][key],
                                     tf.TensorSpec((size,), tf.int32))

    def test_positions_index_the_splits_without_augmentation(self):
        source, splits, config, prep = _setup(augment=False)
        dataset = pipeline.make_train_dataset(source, splits, config, prep)
        seen = []
        for element in dataset:
            train, meta = element["train"], element["meta"]
            position = train["index"].numpy()
            seen.extend(position)
            self.assertAllEqual(train["label"],
                                splits.train_labels[position])
            self.assertAllEqual(train["clean_label"],
                                splits.train_clean_labels[position])
            self.assertAllClose(train["image"], _normalized(
                source.train_images[splits.train_index[position]], prep),
                atol=1e-5)
            meta_position = meta["index"].numpy()
            self.assertAllEqual(meta["label"],
                                splits.meta_labels[meta_position])
            self.assertAllClose(meta["image"], _normalized(
                source.train_images[splits.meta_index[meta_position]],
                prep), atol=1e-5)
        n_train = len(splits.train_index)
        steps = pipeline.steps_per_epoch(splits, config)
        self.assertEqual(steps, n_train // 8)
        self.assertLen(seen, steps * 8)  # drop_remainder, one pass.
        self.assertLen(set(seen), len(seen))
        self.assertTrue(np.any(splits.train_labels[seen]
                               != splits.train_clean_labels[seen]))

    def test_meta_stream_repeats_whole_passes(self):
        # 12 meta examples, batches of 6: every two batches are one pass.
        source, splits, config, prep = _setup(augment=False)
        dataset = pipeline.make_train_dataset(source, splits, config, prep)
        batches = [e["meta"]["index"].numpy() for e in dataset]
        self.assertGreater(len(batches), 4)
        for first, second in zip(batches[0::2], batches[1::2]):
            self.assertAllEqual(np.sort(np.concatenate([first, second])),
                                np.arange(12))
        self.assertNotAllEqual(batches[0], batches[2])  # Reshuffled.

    def test_normalised_training_pixels(self):
        source, splits, config, prep = _setup(augment=False)
        dataset = pipeline.make_train_dataset(source, splits, config, prep)
        pixels = np.concatenate(
            [e["train"]["image"].numpy().reshape(-1, 3) for e in dataset])
        self.assertAllClose(pixels.mean(0), np.zeros(3), atol=0.05)
        self.assertAllClose(pixels.std(0), np.ones(3), atol=0.05)

    def test_augmentation_changes_images_but_not_labels(self):
        source, splits, config, prep = _setup(cutout=2)
        element = _first(pipeline.make_train_dataset(source, splits, config,
                                                     prep))
        position = element["train"]["index"].numpy()
        plain = _normalized(source.train_images[splits.train_index[position]],
                            prep)
        self.assertNotAllClose(element["train"]["image"], plain)
        self.assertAllEqual(element["train"]["label"],
                            splits.train_labels[position])
        # Cutout leaves exact zeros (the mean colour after normalising).
        self.assertTrue(np.any(element["train"]["image"].numpy() == 0))

    def test_seed_repeats_batches_and_epochs_reshuffle(self):
        source, splits, config, prep = _setup(cutout=2)
        dataset = pipeline.make_train_dataset(source, splits, config, prep)
        again = pipeline.make_train_dataset(source, splits, config, prep)
        first = _first(dataset)
        repeat = _first(again)
        for part in ("train", "meta"):
            self.assertAllEqual(first[part]["index"], repeat[part]["index"])
            self.assertAllEqual(first[part]["image"], repeat[part]["image"])
        second_epoch = _first(dataset)
        self.assertNotAllEqual(first["train"]["index"],
                               second_epoch["train"]["index"])
        other_seed = _first(pipeline.make_train_dataset(
            source, splits, dataclasses.replace(config, seed=1), prep))
        self.assertNotAllEqual(first["train"]["index"],
                               other_seed["train"]["index"])

    def test_resize(self):
        source, splits, config, _ = _setup(image_size=10)
        prep = pipeline.Preprocessing(10, _MEAN, _STD)
        element = _first(pipeline.make_train_dataset(source, splits, config,
                                                     prep))
        self.assertEqual(element["train"]["image"].shape, (8, 10, 10, 3))
        self.assertEqual(element["meta"]["image"].shape, (6, 10, 10, 3))

    def test_batches_larger_than_their_splits(self):
        source, splits, config, prep = _setup()
        too_big = dataclasses.replace(config, meta_batch_size=13)
        with self.assertRaisesRegex(
                ValueError, "meta_batch_size=13.*--meta_batch_size <= 12"):
            pipeline.make_train_dataset(source, splits, too_big, prep)
        n_train = len(splits.train_index)
        too_big = dataclasses.replace(config, batch_size=n_train + 1)
        with self.assertRaisesRegex(
                ValueError, f"--batch_size <= {n_train}"):
            pipeline.make_train_dataset(source, splits, too_big, prep)


class EvalDatasetTest(tf.test.TestCase):

    def test_every_example_in_order(self):
        source, _, _, prep = _setup()
        images = source.train_images[:11]
        labels = np.arange(11) % 3
        dataset = pipeline.make_eval_dataset(images, labels, prep, 4)
        batches = list(dataset)
        self.assertEqual([x.shape[0] for x, _ in batches], [4, 4, 3])
        self.assertEqual(batches[0][0].dtype, tf.float32)
        self.assertEqual(batches[0][1].dtype, tf.int32)
        self.assertAllEqual(np.concatenate([y for _, y in batches]), labels)
        self.assertAllClose(np.concatenate([x for x, _ in batches]),
                            _normalized(images, prep), atol=1e-5)
        # Cached and unaugmented: a second pass is identical.
        self.assertAllEqual(next(iter(dataset))[0], batches[0][0])

    def test_rejects_floats(self):
        prep = pipeline.Preprocessing(None, _MEAN, _STD)
        with self.assertRaisesRegex(ValueError, "expected uint8"):
            pipeline.make_eval_dataset(np.zeros((2, 4, 4, 3)), [0, 1], prep,
                                       2)

    def test_carved_test_set(self):
        source, splits, _, prep = _setup()
        self.assertTrue(splits.test_from_train)
        images, labels = pipeline.test_arrays(source, splits)
        self.assertAllEqual(images, source.train_images[splits.test_index])
        self.assertAllEqual(labels, source.train_labels[splits.test_index])
        count = sum(int(y.shape[0]) for _, y in
                    pipeline.test_dataset(source, splits, prep, 7))
        self.assertEqual(count, len(splits.test_index))

    def test_shipped_test_set_and_meta(self):
        source, splits, _, prep = _setup(num_test=9)
        images, labels = pipeline.test_arrays(source, splits)
        self.assertAllEqual(images, source.test_images)
        self.assertAllEqual(labels, source.test_labels)
        meta = list(pipeline.meta_eval_dataset(source, splits, prep, 5))
        self.assertAllEqual(np.concatenate([y for _, y in meta]),
                            splits.meta_labels)


if __name__ == "__main__":
    tf.test.main()
