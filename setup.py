"""Packaging hook: the recipes live at the top of the repository (``recipes/``) and ship inside the
package (``lsdtool/recipes``), so an installed lsd distils with the same recipes as a checkout."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildWithRecipes(build_py):
    """build_py, then copy recipes/*.toml into the built package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "lsdtool" / "recipes"
        target.mkdir(parents=True, exist_ok=True)
        for recipe in sorted(RECIPES.glob("*.toml")):
            shutil.copy2(recipe, target / recipe.name)


setup(cmdclass={"build_py": BuildWithRecipes})
