"""One run per workdir: an exclusive lock, the config guard, `--overwrite`.

A workdir holds one configuration's artefacts. `claim` is the door every
writing entry point (`train_lib.train_and_evaluate`, `search_lib.run_search`)
goes through before it writes anything:

1. It takes an exclusive `fcntl.flock` on `<directory>/.lock`, held until
   the run ends (the kernel drops it when the process dies, even by
   SIGKILL), so a second process fails at once, naming the holder's PID,
   instead of deleting the first one's checkpoint temporaries. Under
   multi-worker training each writer locks its own directory
   (`distribute.artefact_dir`).
2. It removes what a killed run left half written (`fileio.remove_partials`).
3. It compares the configuration with the `config.json` already there
   (whenever one is), and refuses a different one with the fields that
   differ, unless `--overwrite`, which deletes the previous run's
   artefacts first. The same configuration resumes or re-finishes the run,
   as before.

`config.json` itself is written by the entry point only once the data and
the model have been validated (`write_config`), so a refused configuration
never leaves one behind to block the corrected command.
"""

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
from typing import Iterator, Sequence

from absl import logging

from lfm_tf import config as config_lib
from lfm_tf import fileio

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# How a run is executed may change between tries; what it computes may not.
RUN_CONTROL = ("strategy", "tpu", "checkpoint_every_steps",
               "checkpoints_to_keep", "run_eagerly", "overwrite")


class WorkdirInUseError(ValueError):
    """Another live process holds the workdir's lock."""


class ConfigMismatchError(ValueError):
    """The workdir holds another configuration's run."""


@contextlib.contextmanager
def lock(directory: str, name: str = LOCK_FILE) -> Iterator[str]:
    """Holds an exclusive lock on `directory` for the `with` block.

    Args:
      directory: the run's directory (created if missing).
      name: the lock file's name; another name is another lock (a grid
        worker's claim on a cell, around the run's own lock).

    Yields:
      The lock file's path; it holds the holder's PID.

    Raises:
      WorkdirInUseError: another process holds it (its PID is named).
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip()
            raise WorkdirInUseError(
                f"Received --workdir={directory}, which another run (PID "
                f"{holder or 'unknown'}) is using; expected a workdir no "
                "other process writes. Wait for that run to end, stop it, "
                "or use a new --workdir."
            ) from None
        # Only the holder writes here, so the PID is never half written for
        # the next process that reads it.
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        # Closing drops the flock. The file stays: unlinking it would let a
        # third process lock a new inode while a second waits on the old.
        os.close(handle)


def _comparable(values: dict) -> dict:
    """A config dict without run-control fields, missing fields defaulted.

    A `config.json` written before a field existed has that field at its
    default, so older workdirs still resume.
    """
    try:
        values = json.loads(
            config_lib.ExperimentConfig.from_dict(values).to_json())
    except TypeError:  # A field since removed: compare what is there.
        values = json.loads(json.dumps(values))
    for key in RUN_CONTROL:
        values.get("train", {}).pop(key, None)
    return values


def config_differences(previous: dict, current: dict) -> list:
    """["group.field: old -> new"] of the fields that differ, sorted."""
    previous, current = _comparable(previous), _comparable(current)
    differences = []
    for group in sorted(set(previous) | set(current)):
        old, new = previous.get(group, {}), current.get(group, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                differences.append(f"{group}: {old!r} -> {new!r}")
            continue
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                differences.append(
                    f"{group}.{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return differences


def check_config(directory: str, config, command: str) -> bool:
    """Refuses a configuration other than the one `directory` already ran.

    Args:
      directory: the run's directory.
      config: the `ExperimentConfig` about to run.
      command: the entry point, for the error (e.g. "pipelines.train").

    Returns:
      Whether `directory` holds a previous run (a `config.json`).

    Raises:
      ConfigMismatchError: a different configuration without `--overwrite`,
        naming every differing field and the fixes.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    if config.train.overwrite:
        return True
    with open(path) as f:
        previous = json.load(f)
    differences = config_differences(previous,
                                     json.loads(config.to_json()))
    if differences:
        shown = "; ".join(differences[:10])
        more = f" (and {len(differences) - 10} more)" if len(
            differences) > 10 else ""
        raise ConfigMismatchError(
            f"Received a configuration that differs from the one in {path} "
            f"in {len(differences)} field(s): {shown}{more}; expected the "
            f"`{command}` command that wrote {directory} (rerun it to resume"
            " or re-finish that run). Pass --overwrite to replace that run "
            "with this one (its artefacts are deleted), or use a new "
            "--workdir."
        )
    return True


def clear(directory: str, patterns: Sequence[str]):
    """Deletes a previous run's artefacts (`--overwrite`), config.json last.

    Only the named artefacts go, never the whole directory: it may be a
    user's folder, and it holds other workers' directories and the lock.

    Args:
      directory: the run's directory.
      patterns: glob patterns relative to `directory` (config.json aside).
    """
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(directory, pattern))):
            logging.info("--overwrite: removing %s", path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    # Last: until it is gone, an interrupted clear is still guarded.
    config = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(config):
        os.remove(config)


@contextlib.contextmanager
def claim(directory: str, config, artefacts: Sequence[str],
          command: str) -> Iterator[bool]:
    """Lock, clean up, check the config (and clear with `--overwrite`).

    Args:
      directory: this writer's directory (`distribute.artefact_dir`).
      config: the validated `ExperimentConfig`.
      artefacts: glob patterns of what the entry point writes there.
      command: the entry point, for errors.

    Yields:
      Whether a previous run of the same configuration may be resumed
      (False after `--overwrite` cleared one, or when there was none).
    """
    with lock(directory):
        fileio.remove_partials(directory)
        existed = check_config(directory, config, command)
        if existed and config.train.overwrite:
            clear(directory, artefacts)
            existed = False
        yield existed


def write_config(directory: str, config):
    """`config.json`, atomically; call once the run's inputs validated."""
    fileio.write_text(os.path.join(directory, CONFIG_FILE), config.to_json())
