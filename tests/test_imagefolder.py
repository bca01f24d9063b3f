"""The one ImageFolder listing: same classes and samples as torchvision, and clear errors."""
import json

import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from pipelines import make_loader
from pipelines.imagefolder import SymlinkLoopError, is_image_file, scan_image_folder
from tests.imagefiles import add_empty_class, jpeg_bytes, make_unreadable, write_coded_tree
from tests.unprivileged import public_dir, run_unprivileged


def touch_image(path, name_color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(Image.new("RGB", (8, 8), name_color)))


@pytest.fixture
def mixed_tree(tmp_path):
    """Classes in unsorted creation order, mixed-case extensions, non-image files."""
    root = tmp_path / "split"
    for cls in ("zebra", "Apple", "mango"):
        for name in ("b.JPEG", "a.jpg", "C.Png", "d.jpeg"):
            touch_image(root / cls / name)
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / "a.jpg.bak").write_text("backup")
    (root / "README.md").write_text("a file at the top level is not a class")
    return root


def test_listing_matches_torchvision_imagefolder(mixed_tree):
    """Classes, labels and (path, label) samples are exactly torchvision ImageFolder's."""
    index = scan_image_folder(mixed_tree)
    reference = ImageFolder(str(mixed_tree))
    assert list(index.classes) == reference.classes == ["Apple", "mango", "zebra"]
    assert list(index.samples) == reference.samples
    assert len(index) == 12


def test_extensions_are_case_insensitive_and_other_files_skipped(mixed_tree):
    """.JPEG/.jpg/.Png are listed; .txt, .bak and top-level files are not."""
    names = {p.rsplit("/", 1)[1] for p in scan_image_folder(mixed_tree).paths}
    assert names == {"b.JPEG", "a.jpg", "C.Png", "d.jpeg"}
    assert is_image_file("x.WEBP") and is_image_file("x.tiff") and not is_image_file("x.JPEG.txt")


def test_labels_and_paths_follow_sorted_classes_and_files(tmp_path):
    """Label k is the k-th class in sorted order; files are sorted within a class."""
    files = write_coded_tree(tmp_path, classes=3, per_class=4)
    index = scan_image_folder(tmp_path)
    assert index.classes == ("c00", "c01", "c02")
    assert index.paths == [str(p) for p, _, _ in files]
    assert index.labels == [label for _, label, _ in files]


def test_nested_folders_and_symlinked_folders_are_followed(tmp_path):
    """Images in sub-folders and behind directory symlinks belong to their class."""
    root = tmp_path / "split"
    touch_image(root / "a" / "x.jpg")
    touch_image(root / "a" / "deeper" / "y.jpg")
    touch_image(tmp_path / "elsewhere" / "z.jpg")
    (root / "b").mkdir()
    (root / "b" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    index = scan_image_folder(root)
    assert index.classes == ("a", "b")
    assert index.samples == ((str(root / "a" / "deeper" / "y.jpg"), 0), (str(root / "a" / "x.jpg"), 0),
                             (str(root / "b" / "linked" / "z.jpg"), 1))


def test_missing_or_non_directory_root_is_named(tmp_path):
    """A root that does not exist, or is a file, raises FileNotFoundError naming it."""
    with pytest.raises(FileNotFoundError, match=f"image folder {tmp_path / 'nope'} does not exist"):
        scan_image_folder(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        scan_image_folder(tmp_path / "file")


def test_root_without_class_folders_is_an_error(tmp_path):
    """Images directly in the root (no class folders) are refused, not read as zero classes."""
    touch_image(tmp_path / "img.jpg")
    with pytest.raises(FileNotFoundError, match="has no class sub-folders"):
        scan_image_folder(tmp_path)


def test_empty_class_is_an_error_naming_it_unless_allowed(tmp_path):
    """An empty class (or one with only non-images) is named in the error; allowed, it keeps its label."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    empty = add_empty_class(tmp_path, "c01_empty")
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"class folder {empty} holds no image files"):
        scan_image_folder(tmp_path)
    index = scan_image_folder(tmp_path, allow_empty_classes=True)
    assert index.classes == ("c00", "c01", "c01_empty")
    assert index.labels == [0, 0, 1, 1]


def test_unreadable_class_folder_is_named():
    """A class folder the user cannot list raises PermissionError naming it (run as nobody)."""
    with public_dir() as root:
        write_coded_tree(root, classes=2, per_class=2)
        make_unreadable(root / "c01")
        code = ("from pipelines.imagefolder import scan_image_folder\n"
                f"try:\n    scan_image_folder({str(root)!r})\n"
                "except PermissionError as e:\n    print(json.dumps(str(e)))\n")
        result = run_unprivileged("import json\n" + code, modules=("json", "pipelines.imagefolder"))
        (root / "c01").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert f"cannot list class folder {root / 'c01'}" in json.loads(result.stdout)


@pytest.mark.parametrize("splits", [("train", "val"), ("train", "val", "test")])
def test_a_dataset_root_given_as_a_split_is_refused_naming_the_mistake(tmp_path, splits):
    """root/train/<class>/... and root/val/<class>/... read as a split would be two classes,
    'train' and 'val': the scan (so every backend) refuses it and names the split to pass."""
    for split in splits:
        write_coded_tree(tmp_path / split, classes=2, per_class=1)
    with pytest.raises(ValueError, match=f"looks like a dataset root, not a split; pass {tmp_path / 'train'}"):
        scan_image_folder(tmp_path)
    with pytest.raises(ValueError, match="looks like a dataset root"):
        make_loader("folder", tmp_path, train=True, batch_size=1, resolution=32, num_workers=0)
    (tmp_path / "zebra").mkdir()  # a third class that is no split name: a real split
    touch_image(tmp_path / "zebra" / "z.jpg")
    assert scan_image_folder(tmp_path).classes == (*sorted(splits), "zebra")


@pytest.mark.parametrize("target", ["..", "../..", "../../..", "."])
def test_directory_symlink_loops_are_refused_naming_the_link(tmp_path, target):
    """c01/sub/link pointing at an ancestor (the class, the split, above it) would list the
    same files again and again: refused with every such link named. A link elsewhere is
    followed (see above), and so is a link to a sibling class."""
    root = tmp_path / "split"
    write_coded_tree(root, classes=2, per_class=2)
    (root / "c01" / "sub").mkdir()
    loop = root / "c01" / "sub" / "link"
    loop.symlink_to(target, target_is_directory=True)
    (root / "c00" / "other").symlink_to("../c01", target_is_directory=True)
    with pytest.raises(SymlinkLoopError, match="loop back into the tree") as err:
        scan_image_folder(root)
    assert f"{loop} -> {target}" in str(err.value)
    with pytest.raises(ValueError, match=str(loop)):
        make_loader("folder", root, train=False, batch_size=1, resolution=32, num_workers=0)
    loop.unlink()
    index = scan_image_folder(root)
    assert len(index) == 4 + 2 and str(root / "c00" / "other" / "img000.JPEG") in index.paths
