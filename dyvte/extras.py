"""Optional dependencies, the extras in pyproject.toml: checked or imported where they are needed, and when one is
missing the error names the extra that brings it (`pip install "dyvte[search]"`)."""

import importlib
import importlib.util
from types import ModuleType


def check_installed(module: str, extra: str, needed_for: str) -> None:
    """Raise ImportError naming `pip install "dyvte[<extra>]"` unless `module` can be imported (nothing imported)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{needed_for} needs {module}, which is not installed: pip install \"dyvte[{extra}]\" "
            f"(in a checkout: pip install -e \".[{extra}]\")."
        )


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import `module` of the optional extra `extra`, or fail as `check_installed` does."""
    check_installed(module, extra, needed_for)
    return importlib.import_module(module)
