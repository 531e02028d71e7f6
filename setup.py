"""Packaging: a wheel holds one package, `glean_sr`, made at build time from the repository's flat modules.

The repository stays flat for reading: glean.py, infer.py, images.py ... import each other by their plain names.
A wheel must not install such generic names (infer, images, zoo, ...) at the top of site-packages, so the build
copies the modules into glean_sr/ and makes their imports of each other relative (`import glean` -> `from . import
glean`, `from images import x` -> `from .images import x`), with the shipped weights beside them. Everything else
(metadata, dependencies, commands) is in pyproject.toml.

An editable install (pip install -e .) maps the flat modules themselves, as a clone uses them.
"""
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MODULES = ["glean", "glean_fast", "glean_io", "glean_pickle", "rrdbnet", "stylegan2", "weight_formats", "zoo", "images",
           "faces", "photos", "infer", "export", "batch", "demo", "train", "train_bank", "train_cli", "train_data",
           "train_run", "evaluate"]
WEIGHTS = ["weights/*.safetensors", "weights/*.md"]
IMPORT = re.compile(r"^(\s*)(?:import (\w+)(\s+as \w+)?|from (\w+) import )")


def relative_imports(source: str, name: str) -> str:
    """The module's source with its imports of the project's modules made relative to the package."""
    out = []
    for line in source.splitlines(keepends=True):
        m = IMPORT.match(line)
        if m and m.group(2) in MODULES:
            line = f"{m.group(1)}from . import {m.group(2)}{m.group(3) or ''}" + line[m.end():]
        elif m and m.group(4) in MODULES:
            line = f"{m.group(1)}from .{m.group(4)} import " + line[m.end():]
        elif re.match(r"^\s*import [\w.]+,", line) and any(re.search(rf"\b{x}\b", line) for x in MODULES):
            raise SystemExit(f"setup.py: {name}.py imports a project module in a form this build cannot make "
                             f"relative: {line.strip()}")
        out.append(line)
    return "".join(out)


class BuildPackage(build_py):
    """build_py that writes glean_sr/<module>.py from the flat modules, and the shipped weights beside them."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        package = Path(self.build_lib) / "glean_sr"
        for name in MODULES:
            (package / f"{name}.py").write_text(relative_imports((ROOT / f"{name}.py").read_text(), name))
        for pattern in WEIGHTS:
            for f in ROOT.glob(pattern):
                (package / "weights").mkdir(exist_ok=True)
                shutil.copyfile(f, package / "weights" / f.name)


# pip install -e: the flat modules keep their own names (a developer's clone); a wheel gets only glean_sr
EDITABLE = "editable_wheel" in sys.argv
setup(py_modules=MODULES if EDITABLE else [], cmdclass={"build_py": BuildPackage})
