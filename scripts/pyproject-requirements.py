"""Print the project's requirements from pyproject.toml, one per line, for `pip install -r`.

`make venv` installs the dependencies (and the extras named as arguments) without building the
project itself: the project runs from its work tree and has no package to install.
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project.get("dependencies", []))
for extra in sys.argv[1:]:
    requirements += project.get("optional-dependencies", {})[extra]
print("\n".join(requirements))
