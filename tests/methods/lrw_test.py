"""LRW-Easy/Random/Hard: margins, selection, cross-fitting, the re-split."""

import numpy as np
import tensorflow as tf

from lfm_tf import config as config_lib
from lfm_tf import train_lib
from lfm_tf.methods import lrw

# Rows of probabilities; logits = log(p) so that softmax(logits) = p.
_PROBABILITIES = np.array([
    [0.7, 0.2, 0.1],
    [0.7, 0.2, 0.1],
    [0.3, 0.3, 0.4],
    [0.3, 0.3, 0.4],
    [0.05, 0.05, 0.9],
])
_LABELS = np.array([0, 1, 2, 0, 2])
# p_y - max_{k != y} p_k, by hand.
_MARGINS = np.array([0.7 - 0.2, 0.2 - 0.7, 0.4 - 0.3, 0.3 - 0.4, 0.9 - 0.05])


class MarginTest(tf.test.TestCase):

    def test_margins_by_hand(self):
        margins = lrw.probabilistic_margins(np.log(_PROBABILITIES), _LABELS)
        self.assertAllClose(margins, _MARGINS)

    def test_margins_ignore_a_logit_shift(self):
        logits = np.log(_PROBABILITIES) + 100.0
        self.assertAllClose(lrw.probabilistic_margins(logits, _LABELS),
                            _MARGINS)


class SelectionTest(tf.test.TestCase):

    def test_hard_picks_the_lowest_margins(self):
        train, val = lrw.select_validation(_MARGINS, 0.4, "hard")
        # Margins 0.5, -0.5, 0.1, -0.1, 0.85: the two lowest are 1 and 3.
        self.assertAllEqual(val, [1, 3])
        self.assertAllEqual(train, [0, 2, 4])

    def test_easy_picks_the_highest_margins(self):
        train, val = lrw.select_validation(_MARGINS, 0.4, "easy")
        self.assertAllEqual(val, [0, 4])
        self.assertAllEqual(train, [1, 2, 3])

    def test_random_is_a_seeded_partition_of_the_right_size(self):
        margins = np.linspace(-1, 1, 50)
        train, val = lrw.select_validation(margins, 0.1, "random", seed=3)
        self.assertLen(val, 5)
        self.assertAllEqual(np.sort(np.concatenate([train, val])),
                            np.arange(50))
        again = lrw.select_validation(margins, 0.1, "random", seed=3)[1]
        self.assertAllEqual(val, again)
        # Not the hard or easy choice (which would be 0..4 or 45..49).
        self.assertNotAllEqual(val, np.arange(5))
        self.assertNotAllEqual(val, np.arange(45, 50))

    def test_bad_selection_names_the_value(self):
        with self.assertRaisesRegex(ValueError, "selection='medium'"):
            lrw.select_validation(_MARGINS, 0.4, "medium")


class CrossFitTest(tf.test.TestCase):

    def test_each_example_is_scored_once_by_a_model_that_never_saw_it(self):
        calls = []

        def fit_and_score(fit, score):
            calls.append((fit, score))
            self.assertEmpty(np.intersect1d(fit, score))
            self.assertAllEqual(np.sort(np.concatenate([fit, score])),
                                np.arange(11))
            return score * 10.0

        margins = lrw.cross_fitted_margins(11, 3, 0, fit_and_score)
        self.assertLen(calls, 3)
        self.assertAllEqual(margins, np.arange(11) * 10.0)

    def test_one_fold_is_in_sample(self):
        margins = lrw.cross_fitted_margins(
            4, 1, 0, lambda fit, score: fit + score.astype(float))
        self.assertAllEqual(margins, [0.0, 2.0, 4.0, 6.0])


class ResplitTest(tf.test.TestCase):

    def test_hard_split_holds_the_lowest_margin_training_examples(self):
        config = config_lib.ExperimentConfig().replace(
            source="digits", noise_type="uniform", noise_rate=0.4,
            num_meta_per_class=5, batch_size=32, meta_batch_size=25,
            backbone="small_cnn", width=4, epochs=1, steps_per_epoch=2,
            flip=False, method="lrw_hard", lrw_margin_folds=2,
            lrw_delta=0.1).validate()
        data = train_lib.prepare_data(config)
        workdir = self.get_temp_dir()
        new = lrw.resplit(config, data, workdir)
        splits, margins = data["splits"], new["lrw_margins"]
        saved = np.load(f"{workdir}/lrw_split.npz")
        val = saved["validation_positions"]
        self.assertLen(val, round(0.1 * len(splits.train_index)))
        self.assertLess(margins[val].max(),
                        margins[saved["train_positions"]].min() + 1e-12)
        # The new meta set is those training examples, observed labels.
        self.assertAllEqual(new["splits"].meta_index, splits.train_index[val])
        self.assertAllEqual(new["splits"].meta_labels,
                            splits.train_labels[val])
        self.assertEqual(new["facts"].num_train + new["facts"].num_meta,
                         len(splits.train_index))
        # Model selection still reads the clean meta set.
        self.assertIs(new["validation"], data["validation"])


if __name__ == "__main__":
    tf.test.main()
