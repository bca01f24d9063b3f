"""The dataset check finds every kind of bad file by path and kind, and nothing in a clean tree."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines.check import KINDS, check_file, check_tree, list_tree, main
from pipelines.imagefolder import scan_image_folder
from tests.imagefiles import (BAD_FILE_WRITERS, CHECK_ONLY_WRITERS, DECODABLE, add_bad_file,
                              add_empty_class, jpeg_bytes, make_unreadable, write_coded_tree)
from tests.unprivileged import REPO, public_dir, run_unprivileged

#: The kind the check must report for each bad file of tests/imagefiles.py.
EXPECTED_KIND = {"truncated": "truncated", "corrupt": "corrupt", "corrupt_scan": "corrupt_scan",
                 "png_as_jpeg": "wrong_format", "cmyk": "cmyk", "grayscale": "grayscale",
                 "empty": "empty", "non_image": "non_image"}


def photo_jpeg(size=(160, 120), seed=0) -> bytes:
    """A textured JPEG big enough that its headers survive truncation at 70%."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return jpeg_bytes(Image.fromarray(pixels), quality=90)


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """A split with clean images plus one file of every bad kind, an empty class and skipped files;
    returns (root, {path: expected kind})."""
    root = tmp_path_factory.mktemp("bad")
    write_coded_tree(root, classes=3, per_class=3)
    expected = {}
    for kind in sorted({**BAD_FILE_WRITERS, **CHECK_ONLY_WRITERS}):
        path, _ = add_bad_file(root, kind, class_dir="c01")
        expected[str(path)] = EXPECTED_KIND[kind]
    late = root / "c02" / "cut_after_headers.JPEG"
    late.write_bytes(photo_jpeg()[: int(0.7 * len(photo_jpeg()))])
    expected[str(late)] = "truncated"
    for name, fmt in (("bmp.JPEG", "BMP"), ("webp.jpg", "WEBP")):
        Image.new("RGB", (32, 24), (90, 60, 30)).save(root / "c02" / name, format=fmt)
        expected[str(root / "c02" / name)] = "wrong_format"
    (root / "c02" / "jpeg.png").write_bytes(photo_jpeg((32, 24)))
    expected[str(root / "c02" / "jpeg.png")] = "wrong_format"
    Image.new("I;16", (32, 24), 1000).save(root / "c02" / "sixteen_bit.png")
    expected[str(root / "c02" / "sixteen_bit.png")] = "high_bit_depth"
    expected[str(add_empty_class(root))] = "empty_class"
    for path in (root / "c00" / "labels.txt", root / "c00" / "img.JPEG.bak", root / "stray.jpg"):
        path.write_text("loaders never read this")
        expected[str(path)] = "skipped"
    return root, expected


@pytest.fixture(scope="module")
def bad_report(bad_tree):
    root, _ = bad_tree
    return check_tree(root)


def test_every_bad_file_is_found_by_path_with_the_right_kind(bad_tree, bad_report):
    """Each bad file, the empty class and each skipped file is reported once, with its kind;
    the clean images are not reported."""
    _, expected = bad_tree
    assert {p.path: p.kind for p in bad_report} == expected
    assert len(bad_report) == len(expected)


def test_severity_says_whether_loaders_handle_the_kind(bad_report):
    """Decodable kinds (and skipped files) are warnings; failing or mis-read kinds are errors."""
    handled = {EXPECTED_KIND[k] for k in DECODABLE} | {"skipped", "jpeg_warning",
                                                        "high_bit_depth"}
    for problem in bad_report:
        assert problem.error == (problem.kind not in handled), problem
        assert problem.to_dict()["loaders"].startswith(("fail", "mis-read") if problem.error
                                                       else ("handled", "skipped"))


def test_check_file_agrees_with_the_tree_check(bad_tree, bad_report):
    """check_file on a single path gives the same finding as the tree check."""
    for problem in bad_report:
        if problem.kind not in ("empty_class", "skipped"):
            assert check_file(problem.path) == problem


def test_junk_before_the_end_marker_is_a_warning_and_decodes_correctly(tmp_path):
    """libjpeg's 'extraneous bytes before marker 0xd9' is only a warning: PIL decodes the picture
    exactly as without the junk."""
    data = photo_jpeg((48, 32))
    path = tmp_path / "junk.JPEG"
    path.write_bytes(data[:-2] + b"\x00" * 16 + data[-2:])
    problem = check_file(path)
    assert problem.kind == "jpeg_warning" and not problem.error
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_clean_tree_reports_nothing_and_exits_0(tmp_path, capsys):
    """A tree of good JPEGs: no problems, exit status 0, JSON with zero errors and warnings."""
    write_coded_tree(tmp_path, classes=3, per_class=4)
    assert check_tree(tmp_path) == []
    assert main([str(tmp_path), "--json", "--workers", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"root": str(tmp_path), "images": 12, "errors": 0, "warnings": 0, "problems": []}


def test_warnings_alone_exit_0(tmp_path, capsys):
    """CMYK and grayscale files are listed as warnings but do not fail the check."""
    write_coded_tree(tmp_path, classes=2, per_class=2)
    cmyk, _ = add_bad_file(tmp_path, "cmyk")
    gray, _ = add_bad_file(tmp_path, "grayscale")
    assert main([str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"warning  cmyk          {cmyk}" in out and f"warning  grayscale     {gray}" in out
    assert "checked 6 images: 0 errors, 2 warnings" in out


def test_cli_json_lists_every_problem_and_exits_1_on_errors(bad_tree, capsys):
    """JSON output: counts, and per problem its path, kind, severity, detail and loader behaviour."""
    root, expected = bad_tree
    assert main([str(root), "--json", "--workers", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {p["path"]: p["kind"] for p in report["problems"]} == expected
    assert report["images"] == len(scan_image_folder(root, allow_empty_classes=True))
    assert report["errors"] == sum(KINDS[k].error for k in expected.values())
    assert report["errors"] + report["warnings"] == len(expected)
    assert all(p["severity"] in ("error", "warning") and p["detail"] for p in report["problems"])


def test_python_dash_m_entry_point_exits_1_on_errors_with_progress_on_stderr(bad_tree):
    """`python -m pipelines.check` names every bad file, shows progress on stderr, exits 1."""
    root, expected = bad_tree
    result = subprocess.run([sys.executable, "-m", "pipelines.check", str(root), "--workers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert all(path in result.stdout for path in expected)
    images = len(scan_image_folder(root, allow_empty_classes=True))
    assert f"{images}/{images}" in result.stderr


def test_missing_folder_exits_2_naming_it(tmp_path, capsys):
    """A folder that does not exist cannot be checked: exit status 2 and an error naming it."""
    assert main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_dataset_root_checks_both_splits(tmp_path):
    """Given a root with train/ and val/, both splits are listed and checked."""
    write_coded_tree(tmp_path / "train", classes=2, per_class=3)
    write_coded_tree(tmp_path / "val", classes=2, per_class=1)
    path, _ = add_bad_file(tmp_path / "val", "corrupt_scan")
    (tmp_path / "boxes.json").write_text("{}")    # beside the splits: not part of either
    paths, _ = list_tree(tmp_path)
    assert len(paths) == 6 + 2 + 1
    assert [(p.path, p.kind) for p in check_tree(tmp_path)] == [(str(path), "corrupt_scan")]


def test_checked_files_are_exactly_the_loaders_listing(bad_tree):
    """The check decodes exactly the files scan_image_folder gives the loaders, no more, no less."""
    root, _ = bad_tree
    paths, _ = list_tree(root)
    assert paths == scan_image_folder(root, allow_empty_classes=True).paths


def test_quick_mode_reads_headers_only(bad_tree):
    """--quick still finds wrong formats, modes, empty and non-image files, but not corrupt data
    behind intact headers (which is why the full decode is the default)."""
    root, expected = bad_tree
    quick = {p.path: p.kind for p in check_tree(root, decode=False)}
    full_only = {path for path, kind in expected.items() if kind in ("corrupt", "corrupt_scan")}
    full_only.add(str(root / "c02" / "cut_after_headers.JPEG"))
    assert quick == {path: kind for path, kind in expected.items() if path not in full_only}


def test_unreadable_file_is_reported():
    """A file the user may not read (checked as user nobody) is an 'unreadable' error."""
    with public_dir() as root:
        write_coded_tree(root, classes=2, per_class=2)
        path, _ = add_bad_file(root, "cmyk", name="locked.JPEG")
        make_unreadable(path)
        code = f"from pipelines.check import main\nsys.exit(main([{str(root)!r}, '--json', '--workers', '1']))"
        result = run_unprivileged("import sys\n" + code, modules=("json", "pipelines.check"))
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert problems == [{"path": str(path), "kind": "unreadable", "severity": "error",
                         "detail": "Permission denied", "loaders": KINDS["unreadable"].loaders}]


def test_directory_symlink_loops_exit_2_naming_every_link(tmp_path, capsys):
    """Links back into the tree (which the loaders refuse too) are named, each one; the check
    of a dataset root still reads its train/ and val/ splits."""
    write_coded_tree(tmp_path / "train", classes=2, per_class=2)
    write_coded_tree(tmp_path / "val", classes=2, per_class=1)
    loops = [tmp_path / "train" / "c00" / "up", tmp_path / "train" / "c01" / "deep" / "root"]
    loops[1].parent.mkdir()
    loops[0].symlink_to("..", target_is_directory=True)
    loops[1].symlink_to(tmp_path / "train", target_is_directory=True)
    assert main([str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "2 directory symlink(s) loop back into the tree" in err
    assert all(str(link) in err for link in loops)
    for link in loops:
        link.unlink()
    assert main([str(tmp_path), "--workers", "1"]) == 0
