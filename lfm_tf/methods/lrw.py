"""LRW-Easy / LRW-Random / LRW-Hard: the train-twice heuristic of MOLERE.

Jain, Suggala & Shenoy (CVPR 2024), research/seed_systems.md §2.2:

1. train an ERM classifier;
2. score every training example by its probabilistic margin
   p_y(x) - max_{k != y} p_k(x) (p = softmax) under that classifier;
3. take the delta fraction with the lowest margins (`lrw_hard`), the highest
   (`lrw_easy`) or a uniform draw (`lrw_random`) as the validation (meta)
   set, the rest as the training set;
4. train a learned-reweighting model from scratch on that split: here
   Meta-Weight-Net (`reweighting_baselines.MetaWeightNet`), whose meta
   batches now come from the chosen validation part.

Steps 1-3 run before `fit`, from `train_lib.train_and_evaluate` through
`resplit`; step 4 is the ordinary engine with the new split.

Choices where the paper is silent (README "LRW"):
* Margins are K-fold cross-fitted by default (`--lrw_margin_folds=2`): each
  example is scored by an ERM model trained on the other folds, because an
  in-sample margin saturates near 1 once a network interpolates its data.
  `--lrw_margin_folds=1` gives in-sample margins from one ERM model.
* The pool that is re-split is our (noisy) training set only. The clean meta
  set of the engine stays what it is for every method: the model-selection
  set, never trained on.
* The validation part keeps its observed (possibly noisy) labels: LRW has
  no clean set.
* Ties in the margin are broken by position (a stable sort).
"""

import dataclasses
import os
from typing import Callable

import numpy as np
from absl import logging

from lfm_tf.data import pipeline
from lfm_tf.methods import factory

SELECTIONS = {"lrw_easy": "easy", "lrw_random": "random", "lrw_hard": "hard"}


def probabilistic_margins(logits, labels):
    """p_y - max_{k != y} p_k for every example.

    Args:
      logits: float [N, C].
      labels: int [N].

    Returns:
      float64 [N] in [-1, 1]; negative where the classifier is wrong.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    true = probabilities[rows, labels]
    others = probabilities.copy()
    others[rows, labels] = -np.inf
    return true - others.max(axis=1)


def select_validation(margins, delta, selection, seed=0):
    """Splits positions into (train, validation) by margin.

    Args:
      margins: float [N].
      delta: validation fraction in (0, 1); round(delta * N) examples, at
        least 1 and at most N - 1.
      selection: `hard` (lowest margins), `easy` (highest) or `random`.
      seed: seed of the `random` draw.

    Returns:
      (train_positions, validation_positions), sorted int64 arrays that
      partition range(N).
    """
    margins = np.asarray(margins)
    n = len(margins)
    if n < 2:
        raise ValueError(
            f"Received {n} margins; expected at least 2 examples to split "
            "into a training and a validation part."
        )
    count = int(min(max(round(delta * n), 1), n - 1))
    if selection == "hard":
        chosen = np.argsort(margins, kind="stable")[:count]
    elif selection == "easy":
        chosen = np.argsort(-margins, kind="stable")[:count]
    elif selection == "random":
        chosen = np.random.default_rng(seed).permutation(n)[:count]
    else:
        raise ValueError(
            f"Received selection={selection!r}; expected one of "
            "['easy', 'random', 'hard']. Use --method=lrw_easy|lrw_random|"
            "lrw_hard."
        )
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def cross_fitted_margins(n, folds, seed,
                         fit_and_score: Callable[[np.ndarray, np.ndarray],
                                                 np.ndarray]):
    """Margins where each example is scored by a model that never saw it.

    Args:
      n: number of examples.
      folds: K; 1 means in-sample (one model on all, scoring all).
      seed: seed of the fold assignment.
      fit_and_score: (fit_positions, score_positions) -> margins of the
        score positions, float [len(score_positions)].

    Returns:
      float64 [n].
    """
    positions = np.arange(n)
    if folds == 1:
        return np.asarray(fit_and_score(positions, positions), np.float64)
    if folds > n:
        raise ValueError(
            f"Received lrw_margin_folds={folds} for {n} examples; expected at "
            f"most {n}. Lower --lrw_margin_folds."
        )
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    margins = np.empty(n, np.float64)
    for fold in range(folds):
        held_out = positions[fold_of == fold]
        margins[held_out] = fit_and_score(positions[fold_of != fold],
                                          held_out)
    return margins


def _subset_splits(splits, train_positions, meta_positions=None):
    """`Splits` whose training part is `train_positions` of `splits`'s, and,
    when given, whose meta part is `meta_positions` of it (observed labels)."""
    values = dict(
        train_index=splits.train_index[train_positions],
        train_labels=splits.train_labels[train_positions],
        train_clean_labels=splits.train_clean_labels[train_positions],
    )
    if meta_positions is not None:
        values.update(meta_index=splits.train_index[meta_positions],
                      meta_labels=splits.train_labels[meta_positions])
    return dataclasses.replace(splits, **values)


def _erm_fit_and_score(config, data):
    """fit_and_score for `cross_fitted_margins`: one ERM model per call."""
    splits, source = data["splits"], data["source"]
    erm_config = config.replace(
        method="erm", epochs=config.method.lrw_erm_epochs or config.train.epochs)

    def fit_and_score(fit_positions, score_positions):
        fit_splits = _subset_splits(splits, fit_positions)
        facts = dataclasses.replace(
            data["facts"], num_train=len(fit_positions),
            class_counts=np.bincount(fit_splits.train_labels,
                                     minlength=data["facts"].num_classes),
            steps_per_epoch=pipeline.steps_per_epoch(fit_splits, config.data))
        model = factory.compile_method(
            factory.build_method(erm_config, facts), erm_config)
        model.fit(
            pipeline.make_train_dataset(source, fit_splits, config.data,
                                        data["preprocessing"]),
            epochs=erm_config.train.epochs,
            steps_per_epoch=erm_config.train.steps_per_epoch, verbose=0,
            shuffle=False)
        labels = splits.train_labels[score_positions]
        logits = model.predict(
            pipeline.make_eval_dataset(
                source.train_images[splits.train_index[score_positions]],
                labels, data["preprocessing"], config.data.batch_size),
            verbose=0)
        return probabilistic_margins(logits, labels)

    return fit_and_score


def resplit(config, data, workdir=None):
    """LRW's first phase: ERM, margins, and the data of the second phase.

    Args:
      config: validated `ExperimentConfig` with an `lrw_*` method.
      data: `train_lib.prepare_data`'s dict.
      workdir: where `lrw_split.npz` (positions into the training set,
        margins) is written; None writes nothing.

    Returns:
      A copy of `data` whose `splits`, `train` and `facts` describe the LRW
      split; `validation` and `test` are unchanged (model selection stays on
      the clean meta set).
    """
    selection = SELECTIONS[config.method.method]
    splits = data["splits"]
    margins = cross_fitted_margins(
        len(splits.train_index), config.method.lrw_margin_folds,
        config.data.seed, _erm_fit_and_score(config, data))
    train_positions, val_positions = select_validation(
        margins, config.method.lrw_delta, selection, config.data.seed + 1)
    if len(val_positions) < config.data.meta_batch_size:
        raise ValueError(
            f"Received lrw_delta={config.method.lrw_delta} for "
            f"{len(margins)} training examples: a validation part of "
            f"{len(val_positions)}, smaller than meta_batch_size="
            f"{config.data.meta_batch_size}. Raise --lrw_delta or lower "
            "--meta_batch_size."
        )
    new_splits = _subset_splits(splits, train_positions, val_positions)
    corrupted = splits.is_corrupted
    logging.info(
        "LRW-%s: %d validation / %d training examples; corrupted fraction "
        "%.3f in validation, %.3f in training; mean margin %.3f vs %.3f.",
        selection, len(val_positions), len(train_positions),
        corrupted[val_positions].mean(), corrupted[train_positions].mean(),
        margins[val_positions].mean(), margins[train_positions].mean())
    if workdir is not None:
        path = os.path.join(workdir, "lrw_split.npz")
        # Written whole, then renamed: never half a file.
        with open(path + ".tmp", "wb") as f:
            np.savez(f, train_positions=train_positions,
                     validation_positions=val_positions, margins=margins)
        os.replace(path + ".tmp", path)
    facts = dataclasses.replace(
        data["facts"], num_train=len(train_positions),
        num_meta=len(val_positions), class_counts=new_splits.class_counts,
        steps_per_epoch=pipeline.steps_per_epoch(new_splits, config.data))
    return dict(
        data, splits=new_splits, facts=facts,
        train=pipeline.make_train_dataset(
            data["source"], new_splits, config.data, data["preprocessing"]),
        lrw_margins=margins)
