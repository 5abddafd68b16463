import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny ops: threads only add spin-waiting, worse on a shared CPU


@pytest.fixture(scope="session")
def sadm_cache(tmp_path_factory):
    """A private cache (digits folder, digit classifier) shared by the tests of one session."""
    path = tmp_path_factory.mktemp("sadm_cache")
    os.environ["SADM_CACHE"] = str(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); see scripts/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
