"""Exports a trained classifier into TF Serving's model layout.

    python -m pipelines.export --workdir=runs/digits_lfm \
        --export_dir=models [--version=N] [--overwrite] [--model_name=lfm] \
        [--max_image_bytes=20971520] [--max_image_pixels=16777216]

Writes `<export_dir>/<model_name>/<version>/`, a SavedModel with the
training preprocessing inside (serving/README.md has the signatures and the
commands that serve it). The version defaults to one more than the newest
present; an existing version is replaced only with --overwrite. The version
is written to a temporary directory and renamed into place, so a running
server never loads half of it. Only the final classifier is exported.
"""

from absl import app
from absl import flags

from lfm_tf import export

_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "A finished `python -m pipelines.train` run (export_info.json, "
    "classifier.weights.h5).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", None,
    "Directory of the model base paths TF Serving watches; the version goes "
    "to <export_dir>/<model_name>/<version>/.")
_VERSION = flags.DEFINE_integer(
    "version", None, "Version number (positive); default: the next free one.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace the version if it exists.")
_MODEL_NAME = flags.DEFINE_string(
    "model_name", None, "Model name; default: the run's export_info.json "
    "model_name (the training method).")
_MAX_IMAGE_BYTES = flags.DEFINE_integer(
    "max_image_bytes", None,
    "Largest encoded image serving_bytes accepts (larger: INVALID_ARGUMENT);"
    f" default {export.DEFAULT_MAX_IMAGE_BYTES} (20 MiB).")
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", None,
    "Most height x width per image either signature accepts, read from the "
    "file's header before decoding (more: INVALID_ARGUMENT); default "
    f"{export.DEFAULT_MAX_IMAGE_PIXELS} (4096 x 4096).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        path = export.export_for_serving(
            _WORKDIR.value, _EXPORT_DIR.value, version=_VERSION.value,
            overwrite=_OVERWRITE.value, model_name=_MODEL_NAME.value,
            max_image_bytes=_MAX_IMAGE_BYTES.value,
            max_image_pixels=_MAX_IMAGE_PIXELS.value)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"SavedModel written to {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "export_dir"])
    app.run(main)
