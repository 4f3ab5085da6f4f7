"""Flags mirror config fields one to one; every shipped flagfile validates;
bad input is refused naming the flag, without a traceback."""

import contextlib
import glob
import io
import os
import re
import subprocess
import sys

import tensorflow as tf
from absl import flags
from absl.testing import parameterized

from lfm_tf import config as config_lib
from pipelines import flags as flags_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FLAGFILES = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.flags"),
                       recursive=True)
    # The grid's flagfiles carry pipelines.benchmark's own flags; its tests
    # parse them.
    if os.sep + "benchmark" + os.sep not in p)


class FlagsTest(tf.test.TestCase, parameterized.TestCase):

    def test_every_field_has_a_flag(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        for name in config_lib.field_names():
            self.assertIn(name, values)
            self.assertIsNone(values[name].default, name)
        self.assertLen(set(config_lib.field_names()),
                       len(config_lib.field_names()))

    def test_unset_flags_keep_defaults(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", "--noise_rate=0.2", "--noise_type=flip"])
        config = flags_lib.config_from_flags(values=values)
        self.assertEqual(config.data.noise_rate, 0.2)
        self.assertEqual(config.data.batch_size,
                         config_lib.DataConfig().batch_size)

    def test_invalid_value_names_the_flag(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", "--imbalance_factor=0.01"])
        with self.assertRaisesRegex(ValueError, "imbalance_factor=0.01"):
            flags_lib.config_from_flags(values=values)

    @parameterized.parameters(*FLAGFILES)
    def test_flagfile_parses_and_validates(self, path):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        if path.startswith(os.path.join("configs", "tune")):
            flags_lib.define_tune_flags(values)
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            values(["prog", f"--flagfile={path}"])
        finally:
            os.chdir(cwd)
        config = flags_lib.config_from_flags(values=values)
        self.assertIsInstance(config, config_lib.ExperimentConfig)

    def test_config_json_round_trip(self):
        config = config_lib.ExperimentConfig().replace(noise_rate=0.3,
                                                       noise_type="uniform")
        import json  # pylint: disable=g-import-not-at-top
        again = config_lib.ExperimentConfig.from_dict(
            json.loads(config.to_json()))
        self.assertEqual(again, config)

    def test_unknown_override(self):
        with self.assertRaisesRegex(ValueError, "unknown config fields"):
            config_lib.ExperimentConfig().replace(nosuch=1)


class ChoiceFlagsTest(tf.test.TestCase, parameterized.TestCase):
    """Choice fields are absl enums built from `config.CHOICES`."""

    def test_every_choice_field_is_an_enum_flag(self):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        for name, choices in config_lib.CHOICES.items():
            self.assertIsInstance(values[name], flags.EnumFlag, name)
            self.assertEqual(values[name].parser.enum_values, list(choices))
            self.assertIsNone(values[name].default, name)

    def test_choices_is_the_one_source_of_truth(self):
        # validate() refuses what the enum refuses, and every field that
        # validate() checks as a choice is in CHOICES (so it is an enum).
        for name in config_lib.CHOICES:
            with self.assertRaisesRegex(ValueError, f"{name}='nosuch'"):
                config_lib.ExperimentConfig().replace(
                    **{name: "nosuch"}).validate()
        with open(config_lib.__file__) as f:
            checked = set(re.findall(r'_check_choice\(\s*"(\w+)"', f.read()))
        self.assertNotEmpty(checked)
        self.assertEmpty(checked - set(config_lib.CHOICES))

    def test_help_lists_the_choices(self):
        # What --helpfull prints for these flags.
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        text = values.get_help()
        self.assertIn(
            "--hypergradient: <exact|finite_difference|first_order>", text)
        self.assertIn("--method: <erm|focal|class_balanced|", text)

    @parameterized.parameters(
        ("--method=nosuch", "--method=nosuch: value should be one of <erm|"),
        ("--hypergradient=Exact", "one of <exact|finite_difference|"),
        ("--source=cifar10", "--source=cifar10: value should be one of"),
        ("--mixed_precision=float16", "<none|mixed_bfloat16|mixed_float16>"),
    )
    def test_bad_enum_value_names_flag_and_choices(self, arg, message):
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        with self.assertRaisesRegex(flags.IllegalFlagValueError,
                                    re.escape(message)):
            values(["prog", arg])


class DataFlagsTest(tf.test.TestCase, parameterized.TestCase):

    @parameterized.parameters(
        (dict(seed=-1), "seed=-1; expected an integer in \\[0, 4294967295\\]"),
        (dict(seed=2**32), "seed=4294967296"),
        (dict(data_path="/data/x.tar.gz"),
         "data_path='/data/x.tar.gz' with source='digits'.*--source=folder"),
        (dict(source="tfds", tfds_name="cifar10", data_path="x"),
         "with source='tfds', which does not read it"),
        (dict(tfds_name="cifar10"), "tfds_name='cifar10' with "
         "source='digits'.*--source=tfds"),
    )
    def test_refused(self, overrides, message):
        with self.assertRaisesRegex(ValueError, message):
            config_lib.ExperimentConfig().replace(**overrides).validate()

    def test_cleared_path_is_accepted(self):
        # `--data_path=` clears a path a flagfile set.
        config_lib.ExperimentConfig().replace(data_path="").validate()


def _run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
        text=True, timeout=600, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


class EntryPointErrorTest(tf.test.TestCase):
    """Bad input ends in one 'error: ...' line and status 1, no traceback."""

    def test_validation_error(self):
        # What every pipelines/*.py main runs its work under.
        values = flags.FlagValues()
        flags_lib.define_flags(values)
        values(["prog", "--seed=-1"])
        with self.assertRaises(SystemExit) as caught:
            with flags_lib.exit_on_bad_input():
                flags_lib.config_from_flags(values=values)
        self.assertStartsWith(str(caught.exception.code),
                              "error: Received seed=-1; expected")

    def test_data_error_while_training(self):
        # One real entry point end to end (each costs a TensorFlow import).
        missing = os.path.join(self.get_temp_dir(), "no_such_data")
        result = _run("pipelines.train", "--source=folder",
                      f"--data_path={missing}",
                      f"--workdir={self.get_temp_dir()}/run")
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        self.assertIn(f"error: Received data_path={missing}, which does not "
                      "exist", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_serving_client_refused_flags(self):
        from serving import client  # pylint: disable=g-import-not-at-top

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = client.main(["--model=lfm", "--version=1",
                                  "--version_label=stable", "x.jpg"])
        self.assertEqual(status, 1)
        self.assertIn("error: Pass version or version_label, not both.",
                      stderr.getvalue())


if __name__ == "__main__":
    tf.test.main()
