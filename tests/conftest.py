import shutil

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """A folder shared by one test module and removed when the module ends. Training runs write
    checkpoints of 100-200 MB each; left to the end of the session they add up to gigabytes."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
