"""Writes that never leave a half-written file behind."""

import glob
import os
import re
import shutil
import socket
import tempfile

from absl import logging


def write_text(path, text):
    """Writes `text` to `path` atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.chmod(tmp, READABLE_FILE)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Exports are read by TF Serving, often another user in a container.
READABLE_DIR = 0o755
READABLE_FILE = 0o644


def make_readable(root):
    """chmods `root` and everything under it to 0755 (dirs) / 0644 (files).

    Explicit modes, not the umask's: `tempfile.mkdtemp` makes 0700.
    """
    os.chmod(root, READABLE_DIR)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), READABLE_DIR)
        for name in files:
            if not os.path.islink(os.path.join(directory, name)):
                os.chmod(os.path.join(directory, name), READABLE_FILE)


def make_readable_dirs(path):
    """`os.makedirs(path)`; the directories it creates get 0755."""
    missing = []
    while path and not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, READABLE_DIR)


# What the atomic writers leave behind when a run is killed mid-write:
# directory exports (`export._write_directory_atomically`), `write_text`'s
# and `train_lib._write_npz`'s temporaries, in a run directory and in its
# immediate subdirectories (stage_<i>/, checkpoints/).
PARTIAL_PATTERNS = (".*.partial-*", ".*.replaced-*", ".tmp-*", "*.tmp.npz")


def temporary_prefix(name, kind="partial"):
    """`.<name>.<kind>-<pid>@<host>-`: a temporary directory's name prefix.

    The writer's PID and host let `remove_stale_partials` tell the leftovers
    of a killed writer from a live one's work in progress.
    """
    return f".{name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _writer_alive(pid, host):
    if host != socket.gethostname():
        return True  # Another machine's: it cannot be checked from here.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Another user's live process.
    return True


def remove_stale_partials(parent, name):
    """Removes `.<name>.partial-*` / `.replaced-*` whose writer is dead.

    A killed export leaves its temporary directory next to the version it
    was writing; the next export of that name removes it. Directories of a
    live writer (this host, its PID running) or of another host are kept;
    ones named before writers were recorded are removed.

    Args:
      parent: the directory holding `name`.
      name: the final directory's name (e.g. a version number).

    Returns:
      The removed paths, sorted.
    """
    pattern = re.compile(
        rf"^\.{re.escape(name)}\.(?:partial|replaced)-(?:(\d+)@(.*)-)?")
    removed = []
    for kind in ("partial", "replaced"):
        for path in glob.glob(os.path.join(parent, f".{name}.{kind}-*")):
            match = pattern.match(os.path.basename(path))
            if match and match.group(1) and _writer_alive(
                    int(match.group(1)), match.group(2)):
                continue
            logging.info("Removing %s, left by a killed export.", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return sorted(removed)


def remove_partials(directory):
    """Removes half-written leftovers of a killed run from `directory`.

    Call it only while holding the directory's lock (`workdir.lock`): a
    live writer's temporaries look the same.

    Args:
      directory: a run directory.

    Returns:
      The removed paths, sorted.
    """
    removed = []
    for pattern in PARTIAL_PATTERNS:
        for where in (pattern, os.path.join("*", pattern)):
            removed.extend(glob.glob(os.path.join(directory, where)))
    for path in sorted(removed):
        logging.info("Removing %s, left half written by a killed run.", path)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    return sorted(removed)
