"""One error hierarchy (issue 12): every user-fixable error is an ``FdistillError`` the CLI prints
as one line; each keeps its old built-in base; command-line mistakes are ``UsageError``s."""
import subprocess
import sys

import pytest

from fdistill import errors
from fdistill.config import ConfigError
from fdistill.data import DataError
from fdistill.engine import RunError
from fdistill.teachers import TeacherError
from fdistill.weights import WeightsError


def test_every_error_is_one_of_the_hierarchy_and_keeps_its_base():
    assert ConfigError is errors.ConfigError and RunError is errors.RunError  # one class, re-exported
    for cls, base in [(ConfigError, ValueError), (errors.UsageError, ValueError), (DataError, RuntimeError),
                      (TeacherError, RuntimeError), (WeightsError, RuntimeError), (RunError, RuntimeError)]:
        assert issubclass(cls, errors.FdistillError) and issubclass(cls, base)


def test_a_command_line_mistake_is_a_usage_error_printed_in_one_line():
    from fdistill.config.finetune import FinetuneConfig
    from fdistill.eval.commands import compare

    with pytest.raises(errors.UsageError, match="--compare needs --output"):
        compare("finetune", FinetuneConfig(), models=["a", "b"], output=None)
    r = subprocess.run([sys.executable, "-m", "fdistill.cli.main", "finetune", "--compare", "timm:a", "timm:b",
                        "--train", "synthetic:8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "fdistill finetune: error: finetune: give an output folder with --output DIR"
    assert "Traceback" not in r.stderr
