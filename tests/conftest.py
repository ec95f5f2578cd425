"""Session-wide fixtures: tiny random-weight checkpoints, built once, in the real Hugging Face layout."""

import os
from pathlib import Path

import pytest
import torch

import flux1  # noqa: F401  (first: loads the BLAS before anything imports mlx)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_schnell(tmp_path_factory):
    """A tiny FLUX.1-schnell folder (fp32), plus flux1-schnell.safetensors and ae.safetensors beside it."""
    from flux1.fixtures.build import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-schnell"), "tiny", "schnell", "float32", bfl=True)


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory):
    """A tiny FLUX.1-dev folder (fp32, with the guidance embedder), plus its BFL single files."""
    from flux1.fixtures.build import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-dev"), "tiny", "dev", "float32", seed=1, bfl=True)


@pytest.fixture(scope="session", params=["schnell", "dev"])
def tiny_checkpoint(request):
    """Both variants, for tests that must hold for each."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot write in: sysfs for root (who may write anywhere else), else a
    read-only folder."""
    if os.geteuid() == 0:
        return Path("/sys")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


@pytest.fixture(params=["auto", "mlx"])
def compute_path(request):
    """Runs a test on this CPU device's kernels (NumPy/BLAS) and on MLX's own kernels, the ones Metal
    and CUDA users run (FLUX1_COMPUTE=mlx)."""
    from flux1 import backend

    with backend.use(request.param):
        yield request.param


def relative_error(ours, reference) -> float:
    """||ours - reference|| / ||reference||, as numpy float64."""
    import numpy as np

    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
