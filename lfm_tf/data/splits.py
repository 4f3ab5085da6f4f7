"""Seeded splits in pure numpy: test set, clean meta set, long tail, noise.

The order is fixed, and each stage draws from its own child of
`np.random.SeedSequence(seed)`:

1. **Test.** When the source ships no test split, a stratified
   `test_fraction` of its training images is carved out first.
2. **Meta.** `num_meta_per_class` clean examples per class form the balanced
   meta (validation) set. They are drawn *before* any corruption and never
   overlap the training set. (The authors' noisy-label loader draws the meta
   set twice with different seeds, so 978 of its 1000 meta images also sit in
   the training set with possibly noisy labels; lfm_reference §3.)
3. **Long tail.** The rest is subsampled to n_c = floor(n_max *
   IF^(-c / (C - 1))) examples of class c, class 0 being the head.
4. **Noise.** Training labels, and only those, are resampled from a
   transition matrix.

Because each stage has its own random stream, the test and meta sets depend
only on the labels, the seed and the sizes asked for, never on the imbalance
or noise settings: runs that differ only in IF or noise rate are evaluated on
the very same examples.
"""

import dataclasses
import os
import tempfile
from typing import Optional

import numpy as np
from absl import logging

NOISE_TYPES = ("none", "uniform", "flip", "flip2")

# Stage order of the child random streams; appending keeps old splits valid.
_TEST_STREAM, _META_STREAM, _TRAIN_STREAM, _NOISE_STREAM = range(4)


@dataclasses.dataclass(frozen=True)
class Splits:
    """Index arrays into the source data, plus what the corruption did.

    Attributes:
      train_index: int64 [n_train], indices into `SourceData.train_images`.
      train_labels: int64 [n_train], observed (possibly noisy) labels.
      train_clean_labels: int64 [n_train], the labels before corruption.
      meta_index: int64 [n_meta], indices into `SourceData.train_images` of
        the clean, balanced meta (validation) set.
      meta_labels: int64 [n_meta], clean labels of the meta set.
      test_index: int64 [n_test], indices into `SourceData.test_images`, or
        into `SourceData.train_images` when `test_from_train`.
      test_from_train: whether the test set was carved from the train images.
      transition_matrix: float64 [C, C], the realised P(observed | clean):
        rows are clean classes, columns observed ones; identity without noise.
      num_classes: C.
      seed: the seed that produced these splits.
    """

    train_index: np.ndarray
    train_labels: np.ndarray
    train_clean_labels: np.ndarray
    meta_index: np.ndarray
    meta_labels: np.ndarray
    test_index: np.ndarray
    test_from_train: bool
    transition_matrix: np.ndarray
    num_classes: int
    seed: int

    @property
    def is_corrupted(self) -> np.ndarray:
        """bool [n_train]: the observed label differs from the clean one."""
        return self.train_labels != self.train_clean_labels

    @property
    def class_counts(self) -> np.ndarray:
        """int64 [C]: training examples per *observed* label.

        Observed, because that is all a method may know about the training
        set (class-balanced losses weight by it).
        """
        return np.bincount(self.train_labels, minlength=self.num_classes)

    def save(self, path: str) -> None:
        """Writes an `.npz` atomically: a temporary file, then a rename."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=directory, suffix=".npz")
        os.close(handle)
        try:
            arrays = {
                field.name: np.asarray(getattr(self, field.name))
                for field in dataclasses.fields(self)
            }
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "Splits":
        """Reads what `save` wrote.

        Raises:
          ValueError: the file lacks a field (not written by `save`).
        """
        with np.load(path, allow_pickle=False) as data:
            values = {name: data[name] for name in data.files}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values]
        if missing:
            raise ValueError(
                f"Received {path} without fields {missing}; expected a file "
                "written by Splits.save. Re-create it with make_splits."
            )
        values["test_from_train"] = bool(values["test_from_train"])
        values["num_classes"] = int(values["num_classes"])
        values["seed"] = int(values["seed"])
        return cls(**values)


def long_tail_counts(n_max: int, num_classes: int,
                     imbalance_factor: float) -> np.ndarray:
    """Per-class sizes n_c = floor(n_max * IF^(-c / (C - 1))), class 0 first.

    Args:
      n_max: size of the head class 0.
      num_classes: C.
      imbalance_factor: IF >= 1, the ratio n_0 / n_{C-1}.

    Returns:
      int64 [C], non-increasing.

    Raises:
      ValueError: IF < 1, or IF so large that a class would be left empty.
    """
    if imbalance_factor < 1:
        raise ValueError(
            f"Received imbalance_factor={imbalance_factor}; expected >= 1 "
            "(n_max / n_min). Use 100 for 'imbalance 100', not 0.01."
        )
    counts = _tail(n_max, num_classes, imbalance_factor)
    if np.any(counts == 0):
        empty = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(
            f"Received imbalance_factor={imbalance_factor} with {n_max} head "
            f"examples; that leaves class {empty} empty, expected at least "
            f"one example per class. Set --imbalance_factor="
            f"{largest_imbalance_factor(n_max, num_classes)} (the largest "
            f"that keeps one) or lower."
        )
    return counts


def _tail(n_max, num_classes, imbalance_factor):
    """floor(n_max * IF^(-c/(C-1))), int64 [C] (no checks)."""
    if num_classes == 1:
        return np.array([n_max], np.int64)
    exponents = np.arange(num_classes) / (num_classes - 1)
    counts = np.floor(n_max * float(imbalance_factor) ** -exponents)
    return counts.astype(np.int64)


def largest_imbalance_factor(n_max: int, num_classes: int) -> int:
    """The largest integer IF whose long tail leaves no class empty.

    Mathematically IF = n_max leaves the last class one example, but
    floor(n * n^-1) is 0 in floating point for some n (49, 98, ...): the
    answer is checked with the very computation `long_tail_counts` runs.
    """
    factor = max(int(n_max), 1)
    while factor > 1 and np.any(_tail(n_max, num_classes, factor) == 0):
        factor -= 1
    return factor


def similar_classes(images: np.ndarray, labels: np.ndarray,
                    num_classes: int, k: int = 2) -> np.ndarray:
    """Each class's k most similar other classes, by mean-image cosine.

    These are the targets of `flip` noise: a cat is mislabelled as a dog
    rather than as a ship. Deriving them from the data works for any data
    set, without a hand-made pairing per data set.

    Args:
      images: uint8 [N, H, W, 3].
      labels: int [N], clean labels.
      num_classes: C (> k).
      k: neighbours per class.

    Returns:
      int64 [C, k], most similar first; ties go to the lower class index.
    """
    flat = np.asarray(images).reshape(len(images), -1)
    means = np.zeros((num_classes, flat.shape[1]))
    for c in range(num_classes):
        members = flat[labels == c]
        if len(members):
            means[c] = members.mean(axis=0, dtype=np.float64) / 255.0
    # Centre across classes: the shared average image would otherwise make
    # every pair look alike.
    means -= means.mean(axis=0, keepdims=True)
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True),
                              1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, :k].astype(np.int64)


def _default_similar(num_classes):
    """(c + 1) and (c + 2) mod C: the neighbours when no pairing is given."""
    offsets = np.arange(1, 3)
    return (np.arange(num_classes)[:, None] + offsets) % num_classes


def noise_transition(noise_type: str, rate: float, num_classes: int,
                     rng: Optional[np.random.Generator] = None,
                     similar: Optional[np.ndarray] = None) -> np.ndarray:
    """The intended P(observed | clean), float64 [C, C]; rows sum to 1.

    * `uniform`: to any *other* class, each with rate / (C - 1). (The GLC
      loader's `unif` also "flips" to the same class, so its effective rate
      is rate * (C - 1) / C; here the asked rate is the realised one.)
    * `flip`: to class `similar[c, 0]` with probability `rate`.
    * `flip2`: rate / 2 to each of `similar[c, 0]` and `similar[c, 1]`.

    Without `similar`, class c's neighbours are (c + 1) and (c + 2) mod C.
    Pass `similar_classes(...)` for data-driven neighbours.

    Args:
      noise_type: `none`, `uniform`, `flip` or `flip2`.
      rate: probability in [0, 1) that a label is changed.
      num_classes: C.
      rng: unused: the intended matrix is deterministic. Accepted so that
        callers can hand every noise helper the same generator.
      similar: optional int [C, >= 1 (flip) or >= 2 (flip2)], each class's
        flip targets, none equal to the class itself.

    Returns:
      float64 [C, C].

    Raises:
      ValueError: unknown type, rate outside [0, 1), too few classes, or a
        bad `similar`.
    """
    del rng  # Deterministic; see Args.
    if noise_type not in NOISE_TYPES:
        raise ValueError(
            f"Received noise_type={noise_type!r}; expected one of "
            f"{list(NOISE_TYPES)}. Set --noise_type accordingly."
        )
    if not 0 <= rate < 1:
        raise ValueError(
            f"Received noise_rate={rate}; expected a value in [0, 1). Set "
            "--noise_rate=0.4 for 40% noise."
        )
    matrix = np.eye(num_classes)
    if noise_type == "none" or rate == 0:
        return matrix
    needed = 3 if noise_type == "flip2" else 2
    if num_classes < needed:
        raise ValueError(
            f"Received noise_type={noise_type!r} for {num_classes} classes; "
            f"expected at least {needed}. Use --noise_type=none."
        )
    similar = _check_similar(similar, noise_type, num_classes)
    matrix *= 1.0 - rate
    rows = np.arange(num_classes)
    if noise_type == "uniform":
        matrix += (1.0 - np.eye(num_classes)) * rate / (num_classes - 1)
    elif noise_type == "flip":
        matrix[rows, similar[:, 0]] += rate
    else:
        matrix[rows, similar[:, 0]] += rate / 2
        matrix[rows, similar[:, 1]] += rate / 2
    return matrix


def _check_similar(similar, noise_type, num_classes):
    if similar is None:
        return _default_similar(num_classes)
    similar = np.asarray(similar)
    width = 2 if noise_type == "flip2" else 1
    rows = np.arange(num_classes)[:, None]
    if (similar.ndim != 2 or similar.shape[0] != num_classes
            or similar.shape[1] < width):
        raise ValueError(
            f"Received similar of shape {similar.shape}; expected "
            f"[{num_classes}, >= {width}] (each class's flip targets), e.g. "
            "from splits.similar_classes."
        )
    used = similar[:, :width]
    if (np.any(used < 0) or np.any(used >= num_classes)
            or np.any(used == rows)
            or (width == 2 and np.any(used[:, 0] == used[:, 1]))):
        raise ValueError(
            f"Received similar={used.tolist()}; expected distinct targets in "
            f"[0, {num_classes - 1}] that differ from their own class."
        )
    return similar


def corrupt_labels(labels: np.ndarray, matrix: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Draws observed label i from row `labels[i]` of `matrix`.

    Args:
      labels: int [N] clean labels in [0, C).
      matrix: float [C, C], rows summing to 1.
      rng: the generator to draw from.

    Returns:
      int64 [N].
    """
    labels = np.asarray(labels, np.int64)
    cumulative = np.cumsum(matrix, axis=1)
    # Round-off can leave a row's total just below 1; a draw above it would
    # fall off the end of the row.
    cumulative[:, -1] = 1.0
    draws = rng.random(len(labels))
    return (draws[:, None] >= cumulative[labels]).sum(axis=1).astype(np.int64)


def realised_transition(clean: np.ndarray, noisy: np.ndarray,
                        num_classes: int) -> np.ndarray:
    """Empirical P(observed | clean), float64 [C, C].

    A class with no training example has an identity row: nothing of it was
    seen corrupted.

    Raises:
      ValueError: mismatched lengths or labels out of range.
    """
    clean = _check_labels(clean, num_classes, "clean labels")
    noisy = _check_labels(noisy, num_classes, "noisy labels")
    if len(clean) != len(noisy):
        raise ValueError(
            f"Received {len(clean)} clean but {len(noisy)} noisy labels; "
            "expected one noisy label per clean label."
        )
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (clean, noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1),
                    np.eye(num_classes))


def _check_labels(labels, num_classes, what="labels"):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(
            labels.dtype, np.integer)):
        raise ValueError(
            f"Received {what} of shape {labels.shape} and dtype "
            f"{labels.dtype}; expected a vector of integer class ids."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Received {what} in [{labels.min()}, {labels.max()}]; expected "
            f"[0, {num_classes - 1}] for num_classes={num_classes}. Pass the "
            "right number of classes or fix the labels."
        )
    return labels.astype(np.int64)


def _take_per_class(labels, pool, per_class, rng):
    """`per_class[c]` random members of class c from index array `pool`.

    Returns:
      int64, sorted (so that the choice, not the order, carries the seed).
    """
    chosen = [
        rng.permutation(pool[labels[pool] == c])[:count]
        for c, count in enumerate(per_class)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _split_cap(per_class, cap):
    """Scales `per_class` down to sum to `cap`, by largest remainders."""
    total = int(per_class.sum())
    if cap is None or total <= cap:
        return per_class
    exact = per_class * (cap / total)
    scaled = np.floor(exact).astype(np.int64)
    short = cap - int(scaled.sum())
    # Stable sort: equal remainders favour the lower class index.
    order = np.argsort(-(exact - scaled), kind="stable")
    scaled[order[:short]] += 1
    return scaled


def _test_index(labels, num_classes, config, num_test, rng):
    """The test indices, and whether they were carved from train labels."""
    if num_test is not None:
        index = np.arange(num_test, dtype=np.int64)
        cap = config.max_test_examples
        if cap and num_test > cap:
            index = np.sort(rng.permutation(index)[:cap])
        return index, False
    counts = np.bincount(labels, minlength=num_classes)
    per_class = np.floor(counts * config.test_fraction).astype(np.int64)
    per_class = _split_cap(per_class, config.max_test_examples)
    return _take_per_class(labels, np.arange(len(labels)), per_class,
                           rng), True


def _train_counts(available, config):
    """Training examples per class after test and meta: the long tail.

    IF = 1 applies no tail: every class keeps what it has, capped at
    `max_train_per_class`. IF > 1: n_max = the examples of class 0 left,
    capped at `max_train_per_class`, then n_c = floor(n_max *
    IF^(-c/(C-1))). A class with fewer than n_c left keeps what it has (and
    a warning says the tail is shallower there).
    """
    cap = config.max_train_per_class
    if config.imbalance_factor == 1:
        return np.minimum(available, cap) if cap else available.copy()
    n_max = int(min(available[0], cap) if cap else available[0])
    empty = np.flatnonzero(
        _tail(n_max, len(available), config.imbalance_factor) == 0)
    if empty.size:
        # Advice that works when followed: the IF this head allows, or the
        # cap that would allow this IF when the cap is what limits the head.
        fixes = [f"--imbalance_factor="
                 f"{largest_imbalance_factor(n_max, len(available))} or lower"]
        if cap and cap < available[0]:
            needed = _smallest_head(len(available), config.imbalance_factor,
                                    int(available[0]))
            if needed is not None:
                fixes.append(f"--max_train_per_class={needed} or higher")
        raise ValueError(
            f"Received imbalance_factor={config.imbalance_factor} with "
            f"{n_max} examples left in head class 0; that leaves class "
            f"{int(empty[0])} empty, expected at least one example per "
            f"class. Set {' or '.join(fixes)}."
        )
    wanted = long_tail_counts(n_max, len(available), config.imbalance_factor)
    short = np.flatnonzero(wanted > available)
    if short.size:
        logging.warning(
            "Long tail wants %s examples of classes %s but only %s are left; "
            "keeping those.", wanted[short].tolist(), short.tolist(),
            available[short].tolist())
    return np.minimum(wanted, available)


def _smallest_head(num_classes, imbalance_factor, limit):
    """The smallest n_max <= limit whose tail keeps every class, or None."""
    start = max(int(np.ceil(imbalance_factor)), 1)
    for n_max in range(start, limit + 1):
        if not np.any(_tail(n_max, num_classes, imbalance_factor) == 0):
            return n_max
    return None


def make_splits(labels: np.ndarray, num_classes: int, config,
                has_test: Optional[bool] = None, *,
                num_test: Optional[int] = None,
                similar: Optional[np.ndarray] = None) -> Splits:
    """Draws the test (if needed), meta, long-tailed train sets, and noise.

    Args:
      labels: int [N], clean labels of the source's training images.
      num_classes: C.
      config: `DataConfig`; reads num_meta_per_class, imbalance_factor,
        max_train_per_class, noise_type, noise_rate, test_fraction,
        max_test_examples and seed.
      has_test: whether the source ships a test split. Defaults to
        `num_test is not None`; True needs `num_test`.
      num_test: size of the source's test split (test_index is then
        arange(num_test), or a seeded subset of `max_test_examples`).
      similar: optional int [C, >= 2] flip-noise targets per class
        (`similar_classes`); default (c + 1) and (c + 2) mod C.

    Returns:
      `Splits`. The same inputs and seed give bit-identical arrays.

    Raises:
      ValueError: bad labels, a meta set as large as a class, a class left
        empty, bad noise settings, `has_test` without `num_test`.
    """
    labels = _check_labels(labels, num_classes)
    if has_test is None:
        has_test = num_test is not None
    if has_test != (num_test is not None):
        raise ValueError(
            f"Received has_test={has_test} with num_test={num_test}; expected"
            " num_test=len(source.test_labels) exactly when the source has a"
            " test split."
        )
    streams = [np.random.default_rng(s)
               for s in np.random.SeedSequence(config.seed).spawn(4)]

    test_index, test_from_train = _test_index(
        labels, num_classes, config, num_test, streams[_TEST_STREAM])
    pool = np.arange(len(labels), dtype=np.int64)
    if test_from_train:
        pool = np.setdiff1d(pool, test_index)

    available = np.bincount(labels[pool], minlength=num_classes)
    if config.num_meta_per_class >= available.min():
        smallest = int(np.argmin(available))
        raise ValueError(
            f"Received num_meta_per_class={config.num_meta_per_class}, but "
            f"class {smallest} has only {available.min()} examples left "
            "after the test set; expected fewer, so that training keeps "
            "some. Set --num_meta_per_class="
            f"{max(int(available.min()) // 2, 1)}."
        )
    meta_index = _take_per_class(
        labels, pool, [config.num_meta_per_class] * num_classes,
        streams[_META_STREAM])
    pool = np.setdiff1d(pool, meta_index)

    per_class = _train_counts(
        np.bincount(labels[pool], minlength=num_classes), config)
    if np.any(per_class == 0):
        empty = int(np.flatnonzero(per_class == 0)[0])
        raise ValueError(
            f"Class {empty} has no training examples left after the test and"
            " meta sets; expected at least one. Lower --num_meta_per_class "
            "or --test_fraction."
        )
    train_index = _take_per_class(labels, pool, per_class,
                                  streams[_TRAIN_STREAM])
    clean = labels[train_index]

    matrix = noise_transition(config.noise_type, config.noise_rate,
                              num_classes, similar=similar)
    noisy = corrupt_labels(clean, matrix, streams[_NOISE_STREAM])
    logging.info(
        "Splits: %d train (noise %.3f), %d meta, %d test%s.", len(clean),
        float(np.mean(noisy != clean)) if len(clean) else 0.0,
        len(meta_index), len(test_index),
        " carved from train" if test_from_train else "")
    return Splits(
        train_index=train_index,
        train_labels=noisy,
        train_clean_labels=clean,
        meta_index=meta_index,
        meta_labels=labels[meta_index],
        test_index=test_index,
        test_from_train=test_from_train,
        transition_matrix=realised_transition(clean, noisy, num_classes),
        num_classes=int(num_classes),
        seed=int(config.seed),
    )
