"""`import pipelines` works without DALI or FFCV; asking for them says what to install.

Absence is simulated in a child process by a ``sys.meta_path`` finder that makes every
``nvidia.dali`` and ``ffcv`` import fail, as on a machine without those packages.
"""
import json
import subprocess
import sys

import pytest

from tests.unprivileged import REPO

CHILD = """
import importlib.abc, json, sys
from tests.imagefiles import write_coded_tree

BLOCKED = ("nvidia.dali", "ffcv")

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
out = {}
import pipelines, pipelines.check, pipelines.demo, pipelines.folder
out["imported_libraries"] = sorted(m for m in sys.modules if m.split(".")[0] in ("ffcv", "nvidia"))
root = sys.argv[1]
write_coded_tree(root, classes=2, per_class=2)
for backend in ("dali", "ffcv"):
    try:
        pipelines.make_loader(backend, root, train=True, batch_size=2, resolution=32)
        out[backend] = None
    except pipelines.MissingBackendError as e:
        out[backend] = str(e)
loader = pipelines.make_loader("folder", root, train=False, batch_size=4, resolution=32, num_workers=0)
images, labels = next(iter(loader))
out["folder"] = [type(loader).__name__, list(images.shape), labels.tolist()]
try:
    pipelines.require("tfrecord")
except ValueError as e:
    out["unknown"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def without_dali_and_ffcv(tmp_path_factory):
    """What the child process saw with DALI and FFCV made impossible to import."""
    root = tmp_path_factory.mktemp("tree")
    result = subprocess.run([sys.executable, "-c", CHILD, str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_import_pipelines_needs_neither_library(without_dali_and_ffcv):
    """pipelines and its torchvision-only modules import without touching DALI or FFCV."""
    assert without_dali_and_ffcv["imported_libraries"] == []


@pytest.mark.parametrize("backend,install", [("dali", "pip install nvidia-dali-cuda120"),
                                             ("ffcv", "pip install ffcv")])
def test_missing_backend_error_says_what_to_install(without_dali_and_ffcv, backend, install):
    """Asking for an absent backend raises MissingBackendError naming the library and the install."""
    message = without_dali_and_ffcv[backend]
    assert message is not None and f"the {backend!r} loader needs" in message and install in message


def test_folder_backend_still_works(without_dali_and_ffcv):
    """The torchvision fallback builds and yields batches when DALI and FFCV are absent."""
    assert without_dali_and_ffcv["folder"] == ["FolderLoader", [4, 3, 32, 32], [0, 0, 1, 1]]


def test_unknown_backend_is_named(without_dali_and_ffcv):
    """An unknown backend name is a ValueError listing the known ones."""
    assert without_dali_and_ffcv["unknown"] == ("unknown loader backend 'tfrecord'; "
                                                "choose from ['dali', 'ffcv', 'folder']")
