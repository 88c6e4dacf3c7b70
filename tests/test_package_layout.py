"""The layout issue 12 asks for, checked from the source: ``fdistill/config/`` only describes
(it imports nothing of the package but the error hierarchy and the atomic writer, two leaf
modules), and the builders live beside what they build."""
import ast
from pathlib import Path

import fdistill

PKG = Path(fdistill.__file__).resolve().parent
#: leaf modules config may use: the one error hierarchy and the one atomic writer
ALLOWED = {"fdistill.errors", "fdistill.io"}


def _package_imports(path: Path, pkg: str = ""):
    """Absolute names of the fdistill modules ``path`` (in package ``pkg``, default: where it lies
    in fdistill) imports, at module level or in functions."""
    pkg = pkg or ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])  # e.g. fdistill.config
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                yield ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("fdistill"):
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("fdistill"))


def test_config_imports_nothing_of_the_package_but_two_leaf_modules():
    files = sorted((PKG / "config").glob("*.py"))
    assert len(files) >= 5
    outside = {(f.name, m) for f in files for m in _package_imports(f)
               if not m.startswith("fdistill.config") and m not in ALLOWED}
    assert not outside, f"config/ imports the rest of the package: {sorted(outside)}"
    for leaf in ALLOWED:  # and those two import nothing of the package themselves
        path = PKG / (leaf.split(".")[1] + ".py")
        assert not list(_package_imports(path)), leaf


def test_the_import_walker_sees_relative_and_function_level_imports(tmp_path):
    # the oracle for the test above: a module of fdistill.config written here
    fake = tmp_path / "probe.py"
    fake.write_text("import fdistill.data\n\ndef f():\n    from ..engine import optim\n    from .core import ConfigError\n"
                    "    from .. import io\n")
    assert set(_package_imports(fake, "fdistill.config")) == {"fdistill.data", "fdistill.engine", "fdistill.config.core",
                                                              "fdistill"}


def test_the_schemas_student_names_are_the_models():
    from fdistill.config.distill import STUDENT_ARCHS
    from fdistill.models.student import STUDENT_SIZES

    assert set(STUDENT_ARCHS) == set(STUDENT_SIZES)


def test_builders_live_beside_the_loops():
    import fdistill.config.distill as cd
    import fdistill.config.finetune as cf
    from fdistill.engine import builders
    from fdistill.eval import builders as eval_builders

    assert not [n for n in dir(cd) if n.startswith("build_") or n == "validate_without_building"]
    assert not [n for n in dir(cf) if n.startswith("build_")]
    assert {"build_distiller", "build_teacher", "build_student", "build_loader"} <= set(builders.__all__)
    assert {"build_finetune_recipe", "build_segprobe_recipe"} <= set(eval_builders.__all__)
