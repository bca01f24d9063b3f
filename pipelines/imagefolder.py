"""The one listing of an ImageFolder tree that every backend (and the dataset check) uses.

``root/<class>/<file>``: classes are the sub-folders in sorted order, labels their indices,
files are those with an image extension (case-insensitive, torchvision's list), sorted.
Because DALI's file list, FFCV's ``.beton`` writer and the torchvision loader all read this
one listing, a class index means the same class in every backend, and every backend refuses
what it refuses: a dataset root passed instead of a split (class folders ``train`` and
``val``), an empty class, and directory symlinks that loop back into the tree (followed, they
would list the same files again and again).
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
    if set(classes) in SPLIT_NAMES:
        raise ValueError(
            f"image folder {root} has the class folders {', '.join(classes)}: it looks like a "
            f"dataset root, not a split; pass {root / 'train'} or {root / 'val'}")
    samples: list[tuple[str, int]] = []
    loops: list[str] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        try:
            files = sorted(f for f in _walk_files(class_dir, loops) if is_image_file(f))
        except PermissionError as e:
            raise PermissionError(f"cannot list class folder {class_dir}: {e}") from e
        if not files and not allow_empty_classes:
            raise FileNotFoundError(
                f"class folder {class_dir} holds no image files; remove it or add images "
                f"(an empty class would shift or orphan labels)")
        samples.extend((f, label) for f in files)
    if loops:
        raise SymlinkLoopError(
            f"image folder {root}: {len(loops)} directory symlink(s) loop back into the tree "
            f"(followed, they list the same files again and again); remove them:\n"
            + "\n".join(f"{link} -> {os.readlink(link)}" for link in loops))
    return ImageFolderIndex(root, tuple(classes), tuple(samples))


#: Class folder names that mean a dataset root was given instead of one of its splits.
SPLIT_NAMES = ({"train", "val"}, {"train", "val", "test"})


class SymlinkLoopError(ValueError):
    """A directory symlink in an image folder points back at one of its own ancestors."""


def _walk_files(class_dir: Path, loops: list[str]) -> list[str]:
    """All files below ``class_dir``: ImageFolder follows sub-folders and links too, but a
    directory link to one of its own ancestors (a loop) is appended to ``loops``, not followed."""
    def fail(err: OSError) -> None:
        raise err

    def key(path: str | Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    real = class_dir.resolve()
    ancestors = {str(class_dir): frozenset(key(p) for p in (real, *real.parents))}
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        above = ancestors.pop(dirpath)
        followed = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            inode = key(path)
            if inode in above:
                loops.append(path)
            else:
                followed.append(name)
                ancestors[path] = above | {inode}
        dirnames[:] = followed
        out.extend(os.path.join(dirpath, f) for f in filenames)
    return out
