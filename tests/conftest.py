import pytest

from tests.helpers import write_slice


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory):
    """A data folder of 640 train (576/64 train/val) and 256 test images."""
    return write_slice(tmp_path_factory.mktemp("cifar_slice"), n_train=640, n_test=256)
