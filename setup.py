"""The wheel carries the sources `tqkv build` compiles (patches/, tq_ggml/, codebooks/) inside the
package as tqkv/_src, so an installed tqkv builds without the source checkout. An editable install
reads them from the checkout instead (tqkv.sources)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SOURCES = ("patches", "tq_ggml", "codebooks")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        here = Path(__file__).resolve().parent
        dest = Path(self.build_lib) / "tqkv" / "_src"
        shutil.rmtree(dest, ignore_errors=True)
        for name in SOURCES:
            shutil.copytree(here / name, dest / name, ignore=shutil.ignore_patterns("experiments", "__pycache__"))


setup(cmdclass={"build_py": BuildPy})
