"""A whole training run: data -> method -> fit -> select -> test -> export.

The run's artefacts land in `workdir`:

    config.json          the ExperimentConfig that ran
    splits.npz           the exact meta/train/test split and label noise
    logs/                TensorBoard
    checkpoints/         best-on-validation weights of the method
    backup/              whole-state checkpoints; a rerun resumes from them
    metrics.json         validation and (once) test metrics, diagnostics
    classifier.weights.h5, export_info.json, saved_model/
                         the evaluated classifier, ready for serving
    workers/worker-<i>/  multi-worker only: worker i's copy of the above
                         (backup/ aside); only the chief writes `workdir`
    .lock                held while a run writes here (`workdir.claim`)

A rerun of the same configuration resumes (or, finished, evaluates and
exports again); another configuration is refused unless `overwrite`.

Model selection reads only the clean validation (meta) set; the test set is
read once, after training.
"""

import contextlib
import json
import os
import types
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from lfm_tf import callbacks as callbacks_lib
from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import distribute
from lfm_tf import export
from lfm_tf import fileio
from lfm_tf import workdir as workdir_lib
from lfm_tf.nas import derived_network
from lfm_tf.nas import genotypes
from lfm_tf.data import pipeline
from lfm_tf.data import sources
from lfm_tf.data import splits as splits_lib
from lfm_tf.methods import factory
from lfm_tf.methods import lrw
from lfm_tf.models import backbones
from lfm_tf.models import ensemble


# What a run writes into its directory: `--overwrite` deletes these (and
# config.json) before a new configuration starts there.
ARTEFACTS = ("splits.npz", "lrw_split.npz", "logs", "checkpoints", "backup",
             "metrics.json", "test_predictions.npz", "example_weights.npz",
             "classifier.weights.h5", "export_info.json", "saved_model")


def prepare_data(config, arrays: Optional[sources.SourceData] = None):
    """Loads the source, draws the splits and builds the pipelines.

    Returns:
      dict with `source`, `splits`, `preprocessing`, `train` (zipped
      train/meta stream), `validation` and `test` datasets, and `facts`.
    """
    data_config = config.data
    source = sources.load_source(data_config, arrays)
    similar = None
    if data_config.noise_type in ("flip", "flip2"):
        similar = splits_lib.similar_classes(
            source.train_images, source.train_labels, source.num_classes)
    splits = splits_lib.make_splits(
        source.train_labels, source.num_classes, data_config,
        num_test=None if source.test_labels is None
        else len(source.test_labels),
        similar=similar,
    )
    train_images = source.train_images[splits.train_index]
    mean, std = pipeline.normalization_stats(train_images)
    preprocessing = pipeline.Preprocessing(
        image_size=data_config.image_size, mean=tuple(mean), std=tuple(std)
    )
    test_images, test_labels = _test_set(source, splits)
    meta_images = source.train_images[splits.meta_index]
    side = data_config.image_size or source.train_images.shape[1]
    steps = pipeline.steps_per_epoch(splits, data_config)
    facts = factory.DataFacts(
        num_classes=source.num_classes,
        input_shape=(side, side, 3),
        num_train=len(splits.train_index),
        num_meta=len(splits.meta_index),
        class_counts=np.bincount(
            splits.train_labels, minlength=source.num_classes
        ),
        steps_per_epoch=steps,
    )
    return dict(
        source=source,
        splits=splits,
        preprocessing=preprocessing,
        facts=facts,
        train=pipeline.make_train_dataset(
            source, splits, data_config, preprocessing
        ),
        validation=pipeline.make_eval_dataset(
            meta_images, splits.meta_labels, preprocessing,
            data_config.meta_batch_size,
        ),
        test=pipeline.make_eval_dataset(
            test_images, test_labels, preprocessing, data_config.batch_size
        ),
        test_labels=test_labels,
    )


def _test_set(source, splits):
    if splits.test_from_train:
        return (
            source.train_images[splits.test_index],
            source.train_labels[splits.test_index],
        )
    images, labels = source.test_images, source.test_labels
    return images[splits.test_index], labels[splits.test_index]


def train_and_evaluate(config, workdir, arrays=None, extra_callbacks=()):
    """Runs one experiment end to end and returns its metrics dict."""
    config.validate()
    if config.method.method in config_lib.SEARCH_METHODS:
        raise ValueError(
            f"Received method={config.method.method!r}, an architecture "
            "search; run it with `python -m pipelines.search`, then train "
            "its genotype here with --genotype=<workdir>/genotype.json."
        )
    # First: multi-worker collectives must be configured before TF runs ops.
    strategy = distribute.make_strategy(config.train.strategy,
                                        config.train.tpu)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.data.seed)
    outdir = distribute.artefact_dir(workdir, strategy)
    # Held for the whole run; each writer locks its own directory.
    with workdir_lib.claim(outdir, config, ARTEFACTS, "pipelines.train"):
        return _run(config, workdir, outdir, strategy, arrays,
                    extra_callbacks)


def _run(config, workdir, outdir, strategy, arrays, extra_callbacks):
    """`train_and_evaluate` inside its claimed workdir."""
    manager = checkpointing.Manager(
        os.path.join(workdir, "backup"), config.train.checkpoints_to_keep,
        is_chief=distribute.is_chief(strategy),
        worker_id=distribute.worker_id(strategy),
    )
    # --overwrite starts afresh: the chief has deleted its backup/ already,
    # and no other worker may resume from what the chief is deleting.
    resume = None if config.train.overwrite else manager.latest_state()

    data = prepare_data(config, arrays)
    data["splits"].save(os.path.join(outdir, "splits.npz"))
    if config.method.method in lrw.SELECTIONS:
        # LRW's first phase: ERM, margins, a new train/validation split.
        data = lrw.resplit(config, data, outdir)
    with strategy.scope(), _precision(config.train.mixed_precision):
        model = factory.compile_method(
            factory.build_method(config, data["facts"]), config
        )
    if config.train.mixed_precision != "none":
        _float32_outputs(model)
    # Only now: data and model are valid, so this configuration runs.
    workdir_lib.write_config(outdir, config)
    checkpoint = os.path.join(outdir, "checkpoints", "best.weights.h5")
    os.makedirs(os.path.dirname(checkpoint), exist_ok=True)
    selection = keras.callbacks.ModelCheckpoint(
        checkpoint, monitor="val_accuracy", mode="max",
        save_best_only=True, save_weights_only=True,
    )
    steps = config.train.steps_per_epoch or data["facts"].steps_per_epoch
    backup = checkpointing.BackupAndRestore(
        manager, steps, config.train.checkpoint_every_steps, resume,
        selection,
    )
    callbacks = [
        # First: a non-finite step stops the run before anything (model
        # selection, a checkpoint) records it.
        callbacks_lib.StopOnNonFinite(
            steps, backup.global_step, config.train.checkpoint_every_steps,
            callbacks_lib.divergence_settings(config)),
        keras.callbacks.TensorBoard(os.path.join(outdir, "logs")),
        selection,
        *callbacks_lib.weight_diagnostics(model, data["splits"]),
        *_drop_path(model, config),
        *extra_callbacks,
        backup,  # Last: its epoch-end checkpoint records the selection.
    ]
    for initial_epoch, epochs, epoch_steps in _phases(
            backup.global_step, steps, config.train.epochs):
        model.fit(
            checkpointing.resumable_stream(
                lambda: _train_dataset(config, data), backup.global_step),
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps_per_epoch=epoch_steps,
            validation_data=data["validation"],
            callbacks=callbacks,
            verbose=2,
            shuffle=False,  # The pipeline shuffles, seeded.
        )
    history = types.SimpleNamespace(history=backup.history)
    model.load_weights(checkpoint)
    metrics = _final_metrics(model, data, history, outdir)
    fileio.write_text(
        os.path.join(outdir, "metrics.json"),
        json.dumps(metrics, indent=2, sort_keys=True),
    )
    _write_classifier(model, config, data, outdir)
    logging.info(
        "Test accuracy %.4f (selected on validation accuracy %.4f). "
        "Artefacts in %s", metrics["test_accuracy"],
        metrics["best_val_accuracy"], outdir,
    )
    return metrics


def _drop_path(model, config):
    """DARTS' linear drop-path ramp for a searched cell's network."""
    if not (config.model.genotype and config.model.drop_path_rate):
        return []
    return [derived_network.DropPathSchedule(
        model.classifier, config.model.drop_path_rate, config.train.epochs)]


@contextlib.contextmanager
def _precision(policy):
    """Builds under a mixed-precision policy; heads compute in float32.

    Layers keep the policy they were built with, so the global policy is
    restored afterwards; `_float32_outputs` then keeps every loss, the meta
    objective and the finite-difference differences in float32.
    """
    if policy == "none":
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _float32_outputs(model):
    """Features, embeddings and logits in float32 under mixed precision.

    The last layer of every trunk (W1's, W2's, V) and the heads compute in
    float32, so similarities, u, a and every loss are float32.
    """
    for name in ("classifier", "w2_trunk", "w2_head", "encoder"):
        part = getattr(model, name, None)
        if part is None:
            continue
        if name == "classifier":
            part.trunk.layers[-1].dtype_policy = "float32"
            part.head.dtype_policy = "float32"
        elif isinstance(part, keras.Model):
            part.layers[-1].dtype_policy = "float32"
        else:
            part.dtype_policy = "float32"


def _train_dataset(config, data):
    """A fresh, identically seeded copy of `data["train"]`."""
    return pipeline.make_train_dataset(
        data["source"], data["splits"], config.data, data["preprocessing"])


def _phases(global_step, steps, epochs):
    """[(initial_epoch, epochs, steps_per_epoch)] of the `fit` calls left.

    A run resumed mid-epoch first finishes that epoch (its remaining steps),
    then runs whole epochs; a fresh run is one call.
    """
    epoch, offset = divmod(global_step, steps)
    phases = []
    if offset and epoch < epochs:
        phases.append((epoch, epoch + 1, steps - offset))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, steps))
    return phases


def _final_metrics(model, data, history, workdir=None):
    """Validation history, one test pass, per-class test accuracy.

    With `workdir`, that one pass's labels and predictions also go to
    `test_predictions.npz` (and learned per-example weights, where the
    method has them, to `example_weights.npz`), so reports such as
    `pipelines.benchmark` never read the test set again.
    """
    val_curve = [float(v) for v in history.history.get("val_accuracy", [])]
    epoch_seconds = [round(float(v), 3) for v in history.history.get(
        checkpointing.EPOCH_SECONDS, [])]
    logits = model.predict(data["test"], verbose=0)
    predictions = np.argmax(logits, axis=1)
    labels = data["test_labels"]
    num_classes = data["facts"].num_classes
    per_class = [
        float(np.mean(predictions[labels == c] == c))
        if np.any(labels == c) else None
        for c in range(num_classes)
    ]
    metrics = {
        "best_val_accuracy": max(val_curve) if val_curve else None,
        "best_epoch": int(np.argmax(val_curve)) + 1 if val_curve else None,
        "val_accuracy_per_epoch": val_curve,
        # Seconds of each epoch (training and validation, across resumes):
        # the run's cost, which a restarted process's wall time is not.
        # None where some epochs went untimed (resumed from a checkpoint
        # written before epochs were timed).
        "epoch_seconds": epoch_seconds,
        "train_seconds": (float(sum(epoch_seconds))
                          if len(epoch_seconds) == len(val_curve) else None),
        "test_accuracy": float(np.mean(predictions == labels)),
        "test_accuracy_per_class": per_class,
        "num_train": int(data["facts"].num_train),
        "num_meta": int(data["facts"].num_meta),
        "num_test": int(len(labels)),
        # By observed label, as the methods receive them; a report reads
        # the head / tail split from here without the cell's splits.npz.
        "train_class_counts": [int(c) for c in data["facts"].class_counts],
        "train_noise_rate": float(np.mean(data["splits"].is_corrupted)),
        # The method's own training metrics (LFM-DR's diagnostics among
        # them), one value per epoch, as TensorBoard shows them.
        "train_metrics_per_epoch": {
            name: history.history[name]
            for name in getattr(model, "METRIC_NAMES", ())
            if name in history.history},
    }
    metrics.update(callbacks_lib.final_weight_summary(model, data["splits"]))
    if workdir is not None:
        _write_npz(os.path.join(workdir, "test_predictions.npz"),
                   labels=np.asarray(labels), predictions=predictions)
        weights = _example_weights(model, data["splits"])
        if weights is not None:
            _write_npz(os.path.join(workdir, "example_weights.npz"),
                       weights=weights,
                       train_labels=data["splits"].train_labels,
                       is_corrupted=data["splits"].is_corrupted)
    return metrics


def _example_weights(model, splits):
    """Learned per-example weights by training position, or None.

    LFM's B is a table; the penalty method keeps logits u and exposes
    a = example_weights(index). Methods whose weights are a function of
    the loss (MW-Net, L2RW) have no per-example table and give None.
    """
    weights = callbacks_lib.example_weights_of(model, splits)
    if weights is not None:
        return np.asarray(weights, dtype=np.float32)
    logits = getattr(model, "example_weight_logits", None)
    if logits is not None and hasattr(model, "example_weights"):
        index = tf.range(tf.shape(logits)[0])
        return np.asarray(model.example_weights(index), dtype=np.float32)
    return None


def _write_npz(path, **arrays):
    """`np.savez` to a temporary file, then a rename (never half written)."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_classifier(model, config, data, workdir):
    """Weights + export_info.json + SavedModel of the evaluated learner."""
    facts = data["facts"]
    classifier = evaluated_classifier(model, config, facts)
    classifier.save_weights(os.path.join(workdir, "classifier.weights.h5"))
    info = {
        "model_name": config.method.method,
        "class_names": list(data["source"].class_names),
        "input_shape": list(facts.input_shape),
        "preprocessing": data["preprocessing"].to_dict(),
        "architecture": _exported_architecture(config),
    }
    fileio.write_text(
        os.path.join(workdir, "export_info.json"),
        json.dumps(info, indent=2, sort_keys=True),
    )
    warmup = data["source"].train_images[data["splits"].meta_index[:4]]
    export.write_saved_model(
        classifier,
        os.path.join(workdir, "saved_model"),
        class_names=info["class_names"],
        preprocessing=data["preprocessing"],
        input_shape=facts.input_shape,
        warmup_images=warmup,
    )


def _exported_architecture(config):
    """export_info.json's architecture: one backbone, or an ensemble of
    two (W1 and W2) under `evaluate_learner=ensemble`."""
    architecture = {"kind": "backbone",
                    "model": _exportable_model_config(config.model)}
    if _is_ensemble(config):
        architecture.update(kind="ensemble", members=2)
    return architecture


def _is_ensemble(config):
    return (config.method.method == "lfm"
            and config.method.evaluate_learner == "ensemble")


def _exportable_model_config(model_config):
    """The model config with a searched cell inlined as JSON text, so the
    export needs no genotype file from the search's machine."""
    values = dict(vars(model_config))
    if model_config.genotype:
        values["genotype"] = genotypes.load(model_config.genotype).to_json()
    return values


def evaluated_classifier(model, config, facts):
    """The learner that is evaluated, as a standalone `Classifier`.

    W1 is already one. For `evaluate_learner=w2` W2's trunk and head (which
    may be W1's trunk under PS) are copied into a fresh `Classifier` of the
    same architecture, so export never sees W1, V, r or B. For `ensemble`,
    copies of W1 and W2 form one `LogitEnsemble` (mean of their logits).
    """
    if config.method.method != "lfm" or config.method.evaluate_learner == "w1":
        return model.classifier
    w2 = _learner_copy(config, facts, model.w2_trunk, model.w2_head,
                       "w2_export")
    if not _is_ensemble(config):
        return w2
    w1 = _learner_copy(config, facts, model.classifier.trunk,
                       model.classifier.head, "w1_export")
    return ensemble.LogitEnsemble([w1, w2], name="ensemble_export")


def _learner_copy(config, facts, trunk, head, name):
    """A fresh `Classifier` holding a copy of (trunk, head)'s weights."""
    classifier = backbones.build_backbone(
        config.model, facts.num_classes, tuple(facts.input_shape), name=name,
    )
    for target, source in zip(
        classifier.trunk.weights + classifier.head.weights,
        trunk.weights + head.weights,
    ):
        target.assign(source)
    return classifier
