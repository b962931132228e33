import os

# Without a GPU, the Triton scan's kernels run in Triton's interpreter on CPU tensors. Read when the kernels are
# defined (on import of the module that holds them), so it is set before any test imports it.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mambavision_train.config import register

register()  # the config schemas and model options, for the tests that compose configs themselves

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of train.py / eval.py runs: a private data cache, W&B offline and quiet."""
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, MAMBAVISION_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true",
                OMP_NUM_THREADS="2")


@pytest.fixture(scope="session")
def official():
    """The official mambavision package (test-only reference), its scan routed to mamba_ssm's reference loop."""
    from mambavision_train.ops.selective_scan.mamba_ssm_compat import reference_selective_scan_fn

    ref = reference_selective_scan_fn()  # also lets `import mamba_ssm` succeed without the CUDA extension
    assert ref is not None, "mamba-ssm must be installed for the reference tests (make test installs it)"
    import mambavision.models.mamba_vision as mv

    mv.selective_scan_fn = ref
    return mv
