"""Architecture search end to end: DARTS, P-DARTS and their LFM versions.

`run_search(config, workdir)` runs every stage with Keras `fit` (one stage
for DARTS; P-DARTS' stages of growing depth, each a fresh supernet over the
ops the previous stage kept) and writes into `workdir`:

    config.json, splits.npz
    genotype.json            the current parse after every epoch; the final
                             genotype at the end
    stage_<i>/backup/        whole-state checkpoints (resume: rerun the same
                             command)
    stage_<i>/result.json    a finished stage: its ops, genotype, next ops
    logs/                    TensorBoard: losses, α's softmax per edge and
                             op, the genotype per epoch as text
    search_summary.json      genotype, stages, time to first step, wall time
    workers/worker-<i>/      multi-worker only: worker i's copy of the
                             above (backups aside); only the chief writes
                             `workdir`
    .lock                    held while a search writes here
                             (`workdir.claim`); another configuration is
                             refused unless `overwrite`

The search reads the training split (weights) and the meta split
(architecture) only; the test split is never touched.
"""

import json
import os
import time

import keras
import tensorflow as tf
from absl import logging

from lfm_tf import callbacks as callbacks_lib
from lfm_tf import checkpointing
from lfm_tf import config as config_lib
from lfm_tf import distribute
from lfm_tf import fileio
from lfm_tf import train_lib
from lfm_tf import workdir as workdir_lib
from lfm_tf.data import pipeline
from lfm_tf.methods import search_factory
from lfm_tf.nas import genotypes
from lfm_tf.nas import pdarts

GENOTYPE_FILE = "genotype.json"
# What a search writes into its directory: `--overwrite` deletes these (and
# config.json) before a new configuration starts there.
ARTEFACTS = ("splits.npz", GENOTYPE_FILE, "stage_*", "logs",
             "search_summary.json")


def run_search(config, workdir):
    """Searches a cell and returns the final `Genotype` (also written)."""
    config.validate()
    if config.method.method not in config_lib.SEARCH_METHODS:
        raise ValueError(
            f"Received method={config.method.method!r}; expected one of "
            f"{list(config_lib.SEARCH_METHODS)} for a search. Train other "
            "methods with `python -m pipelines.train`."
        )
    # First: multi-worker collectives must be configured before TF runs ops.
    strategy = distribute.make_strategy(config.train.strategy,
                                        config.train.tpu)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.data.seed)
    outdir = distribute.artefact_dir(workdir, strategy)
    # Held for the whole search; each writer locks its own directory.
    with workdir_lib.claim(outdir, config, ARTEFACTS, "pipelines.search"):
        return _search(config, workdir, outdir, strategy)


def _search(config, workdir, outdir, strategy):
    """`run_search` inside its claimed workdir."""
    start = time.time()
    data = train_lib.prepare_data(config)
    # Only now: the data is valid, so this configuration runs.
    workdir_lib.write_config(outdir, config)
    data["splits"].save(os.path.join(outdir, "splits.npz"))
    writer = tf.summary.create_file_writer(os.path.join(outdir, "logs"))

    stage = search_factory.first_stage(config)
    previous, summaries, first_step = None, [], None
    stage_plan = config.search.stages
    for index, (cells, keep, rate) in enumerate(stage_plan):
        stage = search_factory.SearchStage(
            cells, stage.normal_ops, stage.reduce_ops, rate, index)
        # --overwrite starts afresh: no worker reuses what the chief is
        # deleting.
        done = None if config.train.overwrite else _read_stage(workdir, index)
        if done is not None:
            logging.info("Stage %d already finished; skipping it.", index)
            summaries.append(done)
            stage = search_factory.SearchStage(
                cells, done["next_normal_ops"], done["next_reduce_ops"])
            continue
        # Under the run's strategy and dtype policy, as train_lib builds the
        # other methods.
        with strategy.scope(), train_lib._precision(  # pylint: disable=protected-access
                config.train.mixed_precision):
            model = search_factory.build_search_method(
                config, data["facts"], stage)
        if config.train.mixed_precision != "none":
            search_factory.float32_outputs(model)
        _carry_over(previous, model)
        timer = _FirstStep()
        _fit_stage(config, data, model, stage, workdir, outdir, writer,
                   timer, strategy)
        first_step = first_step or timer.seconds
        normal_p, reduce_p = model.architecture.numpy_probabilities()
        if keep is None:
            next_ops = (stage.normal_ops, stage.reduce_ops)
        else:
            next_ops = (pdarts.keep_strongest(normal_p, stage.normal_ops, keep),
                        pdarts.keep_strongest(reduce_p, stage.reduce_ops, keep))
        if config.search.progressive and index == len(stage_plan) - 1:
            genotype = pdarts.derive(
                normal_p, reduce_p, stage.normal_ops, stage.reduce_ops,
                config.search.search_steps, config.search.pdarts_max_skips)
        else:
            genotype = model.architecture.genotype()
        summary = {
            "stage": index, "cells": cells,
            "normal_ops": stage.normal_ops, "reduce_ops": stage.reduce_ops,
            "genotype": genotype.to_dict(),
            "next_normal_ops": next_ops[0], "next_reduce_ops": next_ops[1],
            "arch_normal": normal_p.tolist(), "arch_reduce": reduce_p.tolist(),
        }
        fileio.write_text(_stage_file(outdir, index),
                          json.dumps(summary, indent=1))
        summaries.append(summary)
        previous = model
        stage = search_factory.SearchStage(cells, *next_ops)

    genotype = genotypes.Genotype.from_dict(summaries[-1]["genotype"])
    genotype.save(os.path.join(outdir, GENOTYPE_FILE))
    fileio.write_text(os.path.join(outdir, "search_summary.json"), json.dumps({
        "genotype": genotype.to_dict(),
        "normal_skip_connects": genotype.skip_count("normal"),
        "stages": [{k: s[k] for k in ("stage", "cells", "genotype")}
                   for s in summaries],
        "seconds_to_first_step": first_step,
        "wall_seconds": time.time() - start,
    }, indent=2))
    logging.info("Search finished in %.0f s; genotype in %s",
                 time.time() - start, os.path.join(outdir, GENOTYPE_FILE))
    return genotype


def train_command(config, workdir):
    """The `pipelines.train` command that trains the searched cell from
    scratch under the evaluation protocol of `--eval_flagfile`."""
    return (
        f"python -m pipelines.train --flagfile={config.search.eval_flagfile}"
        f" --genotype={os.path.join(workdir, GENOTYPE_FILE)}"
        f" --workdir={workdir.rstrip('/')}_eval"
    )


def _stage_file(workdir, index):
    return os.path.join(workdir, f"stage_{index}", "result.json")


def _read_stage(workdir, index):
    path = _stage_file(workdir, index)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _carry_over(previous, model):
    """V and r persist across P-DARTS stages (LFM-PDARTS); weights and α
    start afresh, as in P-DARTS."""
    if previous is None or not hasattr(previous, "weighting_table"):
        return
    model.weighting_table.values.assign(previous.weighting_table.values)
    if model.encoder is not None and previous.encoder is not None:
        for target, source in zip(model.encoder.weights,
                                  previous.encoder.weights):
            target.assign(source)


def _segments(global_step, steps, warmup, epochs):
    """[(initial_epoch, end_epoch, steps_per_epoch, arch_updates)] left.

    A resumed run first finishes its interrupted epoch; the weight-only
    warm-up epochs and the epochs that also move α are separate `fit`
    calls, because the train step differs (a Python switch, traced once per
    segment).
    """
    epoch, offset = divmod(global_step, steps)
    segments = []
    if offset and epoch < epochs:
        segments.append((epoch, epoch + 1, steps - offset, epoch >= warmup))
        epoch += 1
    if epoch < min(warmup, epochs):
        segments.append((epoch, min(warmup, epochs), steps, False))
        epoch = warmup
    if epoch < epochs:
        segments.append((epoch, epochs, steps, True))
    return segments


def _fit_stage(config, data, model, stage, workdir, outdir, writer, timer,
               strategy):
    search = config.search
    epochs = config.train.epochs
    steps = config.train.steps_per_epoch or data["facts"].steps_per_epoch
    manager = checkpointing.Manager(
        os.path.join(workdir, f"stage_{stage.index}", "backup"),
        config.train.checkpoints_to_keep,
        is_chief=distribute.is_chief(strategy),
        worker_id=distribute.worker_id(strategy))
    resume = None if config.train.overwrite else manager.latest_state()
    backup = checkpointing.BackupAndRestore(
        manager, steps, config.train.checkpoint_every_steps, resume)
    callbacks = [
        timer,
        # Before the checkpoint: a diverged step is never recorded.
        callbacks_lib.StopOnNonFinite(
            steps, backup.global_step, config.train.checkpoint_every_steps,
            callbacks_lib.divergence_settings(config)),
        backup,  # A resumed model is restored before anything reads it.
        _StageSchedule(model, stage, search, epochs, steps, backup),
        _GenotypeLogger(model, outdir, writer, stage.index),
        keras.callbacks.TensorBoard(
            os.path.join(outdir, f"stage_{stage.index}", "logs")),
    ]
    segments = _segments(backup.global_step, steps,
                         search.arch_warmup_epochs, epochs)
    if resume and not segments:
        # Killed after the stage's last checkpoint: nothing left to fit, so
        # restore here (BackupAndRestore restores at an epoch start).
        manager.restore(model, resume["path"])
    for initial, end, epoch_steps, arch_updates in segments:
        model.arch_updates = arch_updates
        model.train_function = None  # The step differs: trace it anew.
        model.fit(
            checkpointing.resumable_stream(
                lambda: pipeline.make_train_dataset(
                    data["source"], data["splits"], config.data,
                    data["preprocessing"]),
                backup.global_step),
            initial_epoch=initial, epochs=end, steps_per_epoch=epoch_steps,
            validation_data=data["validation"], callbacks=callbacks,
            verbose=2, shuffle=False)


class _FirstStep(keras.callbacks.Callback):
    """Seconds from `fit` to the end of the first step (trace included)."""

    def __init__(self):
        super().__init__()
        self.seconds, self._start = None, None

    def on_train_begin(self, logs=None):
        self._start = self._start or time.time()

    def on_train_batch_end(self, batch, logs=None):
        if self.seconds is None:
            self.seconds = time.time() - self._start
            logging.info("Time to first search step: %.1f s", self.seconds)


class _StageSchedule(keras.callbacks.Callback):
    """P-DARTS' skip-connect dropout per epoch, and W2 := W1 when α starts
    to move (LFM-PDARTS, as the authors do)."""

    def __init__(self, model, stage, search, epochs, steps, backup):
        super().__init__()
        self.method, self.stage, self.search = model, stage, search
        self.epochs, self.steps, self.backup = epochs, steps, backup

    def on_epoch_begin(self, epoch, logs=None):
        if self.stage.skip_dropout:
            self.method.classifier.trunk.set_skip_dropout(
                pdarts.skip_dropout_rate(self.stage.skip_dropout, epoch,
                                         self.epochs,
                                         self.search.arch_warmup_epochs))
        warmup = self.search.arch_warmup_epochs
        fresh_start = self.backup.global_step == warmup * self.steps
        if (warmup and epoch == warmup and fresh_start
                and hasattr(self.method, "copy_w1_to_w2")):
            self.method.copy_w1_to_w2()


class _GenotypeLogger(keras.callbacks.Callback):
    """genotype.json and TensorBoard (α softmax per edge and op, genotype as
    text) at the end of every epoch."""

    def __init__(self, model, workdir, writer, stage_index):
        super().__init__()
        self.method, self.workdir = model, workdir
        self.writer, self.stage_index = writer, stage_index

    def on_epoch_end(self, epoch, logs=None):
        architecture = self.method.architecture
        genotype = architecture.genotype()
        genotype.save(os.path.join(self.workdir, GENOTYPE_FILE))
        step = 1000 * self.stage_index + epoch
        with self.writer.as_default(step=step):
            for kind, probabilities, edge_ops in zip(
                    ("normal", "reduce"), architecture.numpy_probabilities(),
                    (architecture.normal_ops, architecture.reduce_ops)):
                for e, (row, ops) in enumerate(zip(probabilities, edge_ops)):
                    for p, op in zip(row, ops):
                        tf.summary.scalar(f"arch_{kind}/edge_{e:02d}/{op}",
                                          float(p))
            tf.summary.text("genotype", genotype.to_json())
        self.writer.flush()
        logging.info("Stage %d epoch %d genotype: %s", self.stage_index,
                     epoch + 1, genotype)
