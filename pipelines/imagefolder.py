"""The one listing of an ImageFolder tree that every backend (and the dataset check) uses.

``root/<class>/<file>``: classes are the sub-folders in sorted order, labels their indices,
files are those with an image extension (case-insensitive, torchvision's list), sorted.
Because DALI's file list, FFCV's ``.beton`` writer and the torchvision loader all read this
one listing, a class index means the same class in every backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS


@dataclass(frozen=True)
class ImageFolderIndex:
    """Classes and ``(path, label)`` samples of one split, in ImageFolder order."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def is_image_file(name: str) -> bool:
    """Whether a file name has one of the image extensions ImageFolder accepts."""
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike, *, allow_empty_classes: bool = False) -> ImageFolderIndex:
    """List ``root``; raise naming the path if it is missing, has no classes or an empty class.

    An empty class folder is an error by default: dropping it would shift every later label,
    keeping it silently gives a class that never appears.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except PermissionError as e:
        raise PermissionError(f"cannot list image folder {root}: {e}") from e
    if not classes:
        raise FileNotFoundError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        try:
            files = sorted(f for f in _walk_files(class_dir) if is_image_file(f))
        except PermissionError as e:
            raise PermissionError(f"cannot list class folder {class_dir}: {e}") from e
        if not files and not allow_empty_classes:
            raise FileNotFoundError(
                f"class folder {class_dir} holds no image files; remove it or add images "
                f"(an empty class would shift or orphan labels)")
        samples.extend((f, label) for f in files)
    return ImageFolderIndex(root, tuple(classes), tuple(samples))


def _walk_files(class_dir: Path) -> list[str]:
    """All files below ``class_dir`` (ImageFolder follows sub-folders and links too)."""
    def fail(err: OSError) -> None:
        raise err

    out = []
    for dirpath, _, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        out.extend(os.path.join(dirpath, f) for f in filenames)
    return out
