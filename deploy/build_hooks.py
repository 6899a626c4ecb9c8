"""Build hook (pyproject [tool.setuptools] cmdclass): the wheel carries pyproject.toml as `fedrad/flower_app.toml`.

The Flower app config (`[tool.flwr.app]`, the run-config defaults) lives in pyproject.toml; an installed fedrad
(no checkout) builds its Flower app folder from this copy (fedrad.deploy.processes.app_dir), so `fedrad run`
works from a wheel and the defaults have one source.
"""

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parents[1]  # the project root


class BuildPyWithAppConfig(build_py):
    """build_py, plus the app config copied into the built `fedrad` package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "fedrad"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HERE / "pyproject.toml", target / "flower_app.toml")
        shutil.copyfile(HERE / "README.md", target / "flower_app_README.md")

