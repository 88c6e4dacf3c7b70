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


def _image_normalisations(path: Path):
    """Lines of ``path`` that standardise or rescale pixels by hand: ``(x - <..mean..>) / <..std..>``
    or a division of a value by 255."""
    def name(n):
        return ast.unparse(n).lower()

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Sub) and "mean" in name(node.left.right) \
                    and "std" in name(node.right):
                yield node.lineno
            elif isinstance(node.right, ast.Constant) and node.right.value in (255, 255.0):
                yield node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("div", "div_") \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in (255, 255.0):
            yield node.lineno


def test_one_image_normaliser():
    """Pixels are scaled and standardised in ``fdistill/images.py`` only (issue 12: image
    normalisation was written six times). The per-channel statistics of teacher *features*
    (``multi/normalize.py``) are another concept."""
    found = {(str(f.relative_to(PKG)), line) for f in sorted(PKG.rglob("*.py")) for line in _image_normalisations(f)
             if f.relative_to(PKG).as_posix() not in ("images.py", "multi/normalize.py")}
    assert not found, f"image normalisation written outside fdistill/images.py: {sorted(found)}"
    assert len(list(_image_normalisations(PKG / "images.py"))) == 2  # the oracle: it finds both of the one
    assert not list(_package_imports(PKG / "images.py"))  # a leaf module


def _autocast_regions(path: Path):
    """Line numbers of ``torch.autocast(...)`` calls that *choose* a precision (a ``dtype``, or an
    ``enabled`` that is not the constant False); ``enabled=False`` fp32 islands choose none."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "autocast" \
                and ast.unparse(node.func.value).split(".")[0] == "torch":  # torch.autocast, torch.amp.autocast
            kw = {k.arg: k.value for k in node.keywords}
            island = "enabled" in kw and isinstance(kw["enabled"], ast.Constant) and kw["enabled"].value is False
            if not island:
                yield node.lineno


def test_one_autocast_resolver(tmp_path):
    """Autocast is entered with a precision in ``fdistill/precision.py`` only (issue 12: precision was
    resolved in five places; the evaluation had a second autocast until this test)."""
    found = {(str(f.relative_to(PKG)), line) for f in sorted(PKG.rglob("*.py")) for line in _autocast_regions(f)
             if f.relative_to(PKG).as_posix() != "precision.py"}
    assert not found, f"torch.autocast with a precision outside fdistill/precision.py: {sorted(found)}"
    assert len(list(_autocast_regions(PKG / "precision.py"))) == 1
    oracle = tmp_path / "m.py"  # the walker finds a second resolver and lets an fp32 island pass
    oracle.write_text("import torch\nwith torch.autocast('cpu', dtype=torch.bfloat16):\n    pass\n"
                      "with torch.autocast('cpu', enabled=False):\n    pass\n"
                      "with torch.autocast('cuda', enabled=use_amp):\n    pass\n")
    assert list(_autocast_regions(oracle)) == [2, 6]  # and self.autocast() (a method) is not torch's
