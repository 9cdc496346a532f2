"""The checkout's layout: the one module that knows where things live in it.

Paths are absolute (taken from this file), so they hold from any working directory:
tritonserver's model stubs, for one, do not run in the checkout.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
BUILD_DIR = REPO_ROOT / "build"  # build outputs only (ignored by git)
DEFAULT_MODEL_DIR = BUILD_DIR / "models" / "default"  # tools/build_default_model.py writes it
COMPILED_ROOT = BUILD_DIR / "compiled"  # compiled models: <runtime folder>/<model folder name>/ (`make engine`)


def from_repo_root(path: str | Path) -> Path:
    """`path` as given when absolute, else taken from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path
