"""The ``dot_models`` model folder, registered with ComfyUI's folder_paths.

``extra_model_paths.yaml`` is applied before custom nodes load and may already have made a
``dot_models`` entry; it is extended, never replaced.
"""
import os

import folder_paths

FOLDER = "dot_models"
EXTENSIONS = {".safetensors"}


def register() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, extensions = entry
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(extensions) | EXTENSIONS)


def list_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def full_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)
