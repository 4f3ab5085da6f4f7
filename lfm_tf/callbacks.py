"""Diagnostics of learned example weights B, per epoch and at the end.

When the clean labels are known (they always are for our synthetic noise),
a working reweighting method puts less weight on corrupted examples; these
numbers show whether it does, overall and per class.
"""

import keras
import numpy as np
from absl import logging


def example_weight_summary(weights, splits):
    """Mean B on clean vs corrupted examples and per observed class.

    Args:
      weights: float [n_train], B by training position.
      splits: the run's `Splits`.

    Returns:
      dict of floats (per-class entries as a list, None for empty classes).
    """
    weights = np.asarray(weights, dtype=np.float64)
    corrupted = np.asarray(splits.is_corrupted, dtype=bool)
    summary = {
        "b_mean": float(weights.mean()),
        "b_clean_mean": float(weights[~corrupted].mean())
        if np.any(~corrupted) else None,
        "b_corrupted_mean": float(weights[corrupted].mean())
        if np.any(corrupted) else None,
    }
    labels = np.asarray(splits.train_labels)
    summary["b_per_class"] = [
        float(weights[labels == c].mean()) if np.any(labels == c) else None
        for c in range(splits.num_classes)
    ]
    return summary


def example_weights_of(model, splits):
    """B by training position, float [n_train], or None without B."""
    table = getattr(model, "example_weight_table", None)
    if table is None:
        return None
    if hasattr(model, "example_weights_by_position"):
        # LFM-DR's B may be per class: expanded by the observed labels.
        return np.asarray(model.example_weights_by_position(
            np.asarray(splits.train_labels)))
    return table.values.numpy()


class ExampleWeightLogger(keras.callbacks.Callback):
    """Adds B's clean/corrupted means to the epoch logs (TensorBoard, history).

    Args:
      splits: the run's `Splits` (clean labels, corruption mask).
    """

    def __init__(self, splits):
        super().__init__()
        self.splits = splits

    def on_epoch_end(self, epoch, logs=None):
        weights = example_weights_of(self.model, self.splits)
        summary = example_weight_summary(weights, self.splits)
        for key in ("b_clean_mean", "b_corrupted_mean"):
            if summary[key] is not None and logs is not None:
                logs[f"epoch_{key}"] = summary[key]
        logging.info("epoch %d example weights: %s", epoch + 1, summary)


def weight_diagnostics(model, splits):
    """The diagnostic callbacks that apply to `model` (maybe none)."""
    if example_weights_of(model, splits) is None:
        return []
    return [ExampleWeightLogger(splits)]


def final_weight_summary(model, splits):
    """`example_weight_summary` of the final B, or {} without B."""
    weights = example_weights_of(model, splits)
    if weights is None:
        return {}
    return {
        f"final_{k}": v
        for k, v in example_weight_summary(weights, splits).items()
    }


class NonFiniteError(ValueError):
    """Training produced a NaN or Inf loss or weight."""


def non_finite_logs(logs) -> dict:
    """{name: value} of the loss logs that are NaN or +-Inf.

    Only losses are checked: a diagnostic such as a mean over the corrupted
    examples of a batch may be NaN legitimately (none in the batch).
    """
    return {name: float(value) for name, value in (logs or {}).items()
            if "loss" in name and np.ndim(value) == 0
            and not np.isfinite(float(value))}


def non_finite_variables(variables) -> list:
    """Paths of the floating-point variables holding a NaN or +-Inf."""
    bad = []
    for variable in variables:
        value = np.asarray(variable)
        if (np.issubdtype(value.dtype, np.floating)
                and not np.all(np.isfinite(value))):
            bad.append(getattr(variable, "path", None) or variable.name)
    return bad


def divergence_settings(config) -> dict:
    """The settings a diverged run's error quotes: step sizes, clipping."""
    settings = {"w1_learning_rate": config.optimizer.w1_learning_rate,
                "grad_clip_norm": config.optimizer.grad_clip_norm}
    if config.method.method.startswith("lfm"):
        settings["w2_learning_rate"] = config.optimizer.w2_learning_rate
    return settings


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops a diverged run with an error: nothing is selected or exported.

    `keras.callbacks.TerminateOnNaN` only ends `fit`, after which the run
    would evaluate and export the broken model and exit 0. This raises
    `NonFiniteError` instead, naming the epoch and step and the likely
    fixes. Losses are checked after every step; the weights (a NaN weight
    can precede a NaN loss by a step) at every epoch end and at every step
    where `BackupAndRestore` writes a checkpoint, so no checkpoint and no
    selected model holds them. Put it first in the callback list.

    Args:
      steps_per_epoch: steps in a full epoch.
      start_step: global steps already taken (a resumed run).
      checkpoint_every_steps: the run's mid-epoch checkpoint interval
        (None/0: epoch ends only).
      settings: {flag: value} the error quotes (learning rates, clipping).
    """

    def __init__(self, steps_per_epoch, start_step=0,
                 checkpoint_every_steps=None, settings=None):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.global_step = int(start_step)
        self.every_steps = int(checkpoint_every_steps or 0)
        self.settings = dict(settings or {})

    def _where(self, step):
        epoch, offset = divmod(step - 1, self.steps_per_epoch)
        return (f"epoch {epoch + 1}, step {offset + 1} of "
                f"{self.steps_per_epoch} (global step {step})")

    def _fail(self, what, step):
        ran = ", ".join(f"--{k}={v}" for k, v in sorted(self.settings.items()))
        raise NonFiniteError(
            f"Received {what} at {self._where(step)}; expected finite "
            "values. Training diverged, so the run stops here and nothing is"
            " exported. Likely cause: a learning rate too high for this "
            "model or exploding gradients"
            f"{f' (this run: {ran})' if ran else ''}: lower the learning "
            "rates (e.g. 10x) or clip harder (a smaller --grad_clip_norm); "
            "under --mixed_precision=mixed_float16 an overflow (try "
            "mixed_bfloat16). Checkpoints before this step are kept; rerun "
            "with the fix and --overwrite, or in a new --workdir."
        )

    def _check_weights(self, step):
        bad = non_finite_variables(self.model.variables)
        if bad:
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            self._fail(f"NaN/Inf weights in {len(bad)} variable(s) ({shown})",
                       step)

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        bad = non_finite_logs(logs)
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            self._fail(f"a non-finite loss ({shown})", self.global_step)
        if (self.every_steps and self.global_step % self.every_steps == 0
                and self.global_step % self.steps_per_epoch):
            self._check_weights(self.global_step)

    def on_epoch_end(self, epoch, logs=None):
        # Weights first: a NaN val_loss is their symptom, not the cause.
        self._check_weights(self.global_step)
        bad = non_finite_logs(logs)
        if bad:
            shown = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            self._fail(f"a non-finite epoch loss ({shown})", self.global_step)
