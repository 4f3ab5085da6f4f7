"""Whole-state checkpoints and exact resume (`BackupAndRestore` semantics).

A checkpoint is one directory `<workdir>/backup/ckpt-<n>/` holding

    state.ckpt.*   a `tf.train.Checkpoint` of the method model: every learner
                   (W1, W2, V), B and r, every optimizer and its slots (the
                   functional SGD momenta, the Adam moments of B, r, V and of
                   Meta-Weight-Net), the step counter, the metric trackers and
                   the seed-generator state of stochastic layers;
    state.json     the data position (global step; epoch and step within it
                   follow), the best validation value of model selection and
                   the per-epoch history, with each epoch's seconds
                   (`EPOCH_SECONDS`: a resumed epoch counts from its resume),
                   so a run's training time survives its restarts.

It is written to `tmp-ckpt-<n>` and renamed, so a directory named `ckpt-*`
is always complete; the newest `keep` are kept. The training stream is
seeded, so it is rebuilt and the consumed batches skipped
(`resumable_stream`): the resumed run sees the batches the killed run would
have seen. Run the same command again and training continues.
"""

import json
import os
import re
import shutil
import time
from typing import Optional

import keras
import tensorflow as tf
from absl import logging

from lfm_tf import fileio

_NAME = re.compile(r"^ckpt-(\d+)$")
_STATE = "state.json"
_PREFIX = "state.ckpt"


def _number_after(complete):
    """n of the checkpoint after `complete` ([(n, path)], oldest first)."""
    return complete[-1][0] + 1 if complete else 1


class Manager:
    """Writes, lists, prunes and restores checkpoints in one directory.

    Args:
      directory: where `ckpt-<n>` directories live (created on demand).
      keep: how many of the newest to keep (>= 1).
      is_chief: only the chief's checkpoints are kept; other workers (multi
        worker) take part in the write, into a scratch directory, because
        reading synchronised variables may need every worker.
      worker_id: names the scratch directory of a non-chief worker.
    """

    def __init__(self, directory, keep=2, is_chief=True, worker_id=0):
        if keep < 1:
            raise ValueError(
                f"Received keep={keep}; expected >= 1 checkpoints to keep. "
                "Set --checkpoints_to_keep=2."
            )
        self.directory = directory
        self.keep = int(keep)
        self.is_chief = is_chief
        self.worker_id = worker_id

    def _complete(self):
        """[(n, path)] of complete checkpoints, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = _NAME.match(name)
            path = os.path.join(self.directory, name)
            if match and os.path.exists(os.path.join(path, _STATE)):
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None."""
        complete = self._complete()
        return complete[-1][1] if complete else None

    def next_number(self) -> int:
        """n of the next `ckpt-<n>`: one past the newest complete one."""
        return _number_after(self._complete())

    def latest_state(self) -> Optional[dict]:
        """The `state.json` of the newest checkpoint (plus its `path`)."""
        path = self.latest()
        if path is None:
            return None
        with open(os.path.join(path, _STATE)) as f:
            state = json.load(f)
        state["path"] = path
        return state

    def save(self, model, state: dict) -> str:
        """Writes model variables + `state` atomically; prunes old ones.

        Args:
          model: the method model (a `keras.Model`).
          state: JSON-ready dict (data position, best value, history).

        Returns:
          The checkpoint directory (a scratch path on non-chief workers,
          already removed).
        """
        complete = self._complete()
        number = _number_after(complete)
        if self.is_chief:
            final = os.path.join(self.directory, f"ckpt-{number}")
            scratch = os.path.join(self.directory, f"tmp-ckpt-{number}")
        else:
            final = None
            scratch = os.path.join(
                self.directory, f"tmp-worker-{self.worker_id}")
        if os.path.exists(scratch):
            shutil.rmtree(scratch)
        os.makedirs(scratch)
        _checkpoint(model).write(os.path.join(scratch, _PREFIX))
        fileio.write_text(os.path.join(scratch, _STATE),
                          json.dumps(state, indent=2, sort_keys=True))
        if final is None:
            shutil.rmtree(scratch)
            return scratch
        os.rename(scratch, final)  # Atomic: the checkpoint appears whole.
        for _, old in complete[:max(0, len(complete) + 1 - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        logging.info("Checkpoint %s (global step %d).", final,
                     state.get("global_step", -1))
        return final

    def restore(self, model, path: str):
        """Restores every variable of `model` from the checkpoint at `path`.

        Raises:
          ValueError: the checkpoint does not match the model (another method
            or architecture), naming the path and the fix.
        """
        try:
            status = _checkpoint(model).read(os.path.join(path, _PREFIX))
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            raise ValueError(
                f"Received checkpoint {path} that does not match the model "
                f"being trained ({error}); expected one written by the same "
                "configuration. Use a new --workdir, or delete "
                f"{os.path.dirname(path)} to start over."
            ) from None
        status.expect_partial()


def _checkpoint(model) -> tf.train.Checkpoint:
    """The model's object graph plus every Keras-tracked variable.

    TensorFlow's object graph of a Keras 3 model reaches its layers and
    optimizers but not every variable Keras tracks (the functional SGD
    momenta of `FunctionalSGD` layers, the metric trackers), so those are
    listed explicitly, in Keras' deterministic order.
    """
    variables = list(model.variables) + list(model.metrics_variables)
    return tf.train.Checkpoint(
        model=model, variables=[getattr(v, "value", v) for v in variables])


# The history key of each epoch's wall time (training and validation).
EPOCH_SECONDS = "epoch_seconds"


class BackupAndRestore(keras.callbacks.Callback):
    """Checkpoints every `every_steps` steps and at every epoch end; resumes.

    Put it after the callbacks whose state it records (`ModelCheckpoint`), so
    an epoch's checkpoint holds that epoch's selection.

    Args:
      manager: a `Manager`.
      steps_per_epoch: steps in a full epoch (fixes epoch and position).
      every_steps: also checkpoint every this many global steps (None/0:
        only at epoch ends).
      state: the `state.json` to resume from (None: a fresh run).
      model_checkpoint: the run's `keras.callbacks.ModelCheckpoint`, whose
        best value is part of the state.
    """

    def __init__(self, manager, steps_per_epoch, every_steps=None,
                 state=None, model_checkpoint=None):
        super().__init__()
        self.manager = manager
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_steps = int(every_steps or 0)
        self.model_checkpoint = model_checkpoint
        self._pending = state
        self.global_step = int(state["global_step"]) if state else 0
        self.history = dict(state["history"]) if state else {}
        if state and model_checkpoint is not None:
            model_checkpoint.best = state.get("best")
        self._epoch_start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()
        # After Keras reset the metrics: the restored trackers carry the
        # killed epoch's running means on.
        if self._pending is not None:
            self.manager.restore(self.model, self._pending["path"])
            if not self._pending["step_in_epoch"]:
                # Saved at an epoch end: this epoch starts from zero.
                self.model.reset_metrics()
            logging.info("Resumed from %s at global step %d (epoch %d).",
                         self._pending["path"], self.global_step, epoch + 1)
            self._pending = None

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        if self.every_steps and self.global_step % self.every_steps == 0:
            if self.global_step % self.steps_per_epoch:  # Not an epoch end.
                self.save()

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        # Keras calls this after the epoch's validation pass.
        self.history.setdefault(EPOCH_SECONDS, []).append(
            time.monotonic() - self._epoch_start)
        self.save()

    def state(self) -> dict:
        best = getattr(self.model_checkpoint, "best", None)
        return {
            "global_step": self.global_step,
            "epoch": self.global_step // self.steps_per_epoch,
            "step_in_epoch": self.global_step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "best": None if best is None else float(best),
            "history": self.history,
        }

    def save(self):
        return self.manager.save(self.model, self.state())


def resumable_stream(make_dataset, start_step: int) -> tf.data.Dataset:
    """The training stream from global step `start_step` on, forever.

    Args:
      make_dataset: builds one epoch of the seeded training dataset afresh
        (new seed-generator state, so every call yields the same sequence).
      start_step: batches already consumed.

    Returns:
      `make_dataset().repeat().skip(start_step)`: epoch k of a fresh run is
      the k-th repetition, and the resumed run skips what the killed run
      consumed. Skipping re-reads the skipped batches (input pipeline only,
      no training compute).
    """
    dataset = make_dataset().repeat()
    return dataset.skip(start_step) if start_step else dataset
