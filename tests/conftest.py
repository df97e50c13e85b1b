import os
import resource
import shutil
import tempfile
from pathlib import Path

import pytest

from mote_local.engine.model import Model
from mote_local.synthetic import planted, real_vocab, tiny

# Every test runs under bounds: an address-space limit for the test process (and the commands it starts), so an
# unbounded allocation fails as MemoryError instead of taking the machine; a per-test timeout (pytest-timeout,
# `timeout` in pyproject.toml).
MEMORY_LIMIT_BYTES = 12 * 2**30

# the fixtures of the live llama-server tests (tests/serve_live.py)
pytest_plugins = ["serve_live"]


def pytest_configure(config):
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft > MEMORY_LIMIT_BYTES:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, hard))
    # tests never write into the user's cache; the sdist the engine was built from stays reachable
    if not os.environ.get("MOTE_LLAMA_SDIST"):
        try:
            os.environ["MOTE_LLAMA_SDIST"] = str(real_vocab.sdist_path())
        except real_vocab.SdistMissing:
            pass
    os.environ["MOTE_CACHE_DIR"] = tempfile.mkdtemp(prefix="mote-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["MOTE_CACHE_DIR"], ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption(
        "--n-gpu-layers",
        type=int,
        default=0,
        help="offload this many layers in the models the engine tests load (a GPU build's check)",
    )


@pytest.fixture(scope="session")
def model_options(request) -> dict:
    """Options every engine test passes to Model: the GPU offload asked for on the command line."""
    return {"n_gpu_layers": request.config.getoption("--n-gpu-layers")}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The models folder of a session cache directory (MOTE_CACHE_DIR=model_dir.parent reuses its models)."""
    path = tmp_path_factory.mktemp("cache") / "models"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def tiny_path(model_dir):
    """tiny_path(arch, **overrides) -> path of a generated tiny model (cached for the session)."""

    def make(arch: str, **overrides) -> Path:
        return tiny.tiny_model(arch, cache_dir=model_dir, **overrides)

    return make


@pytest.fixture(scope="session")
def planted_files(model_dir):
    """(path, truth) of the planted-behaviour model, written once per session."""
    return planted.planted_model(cache_dir=model_dir)


@pytest.fixture(scope="session")
def truth(planted_files) -> planted.PlantedTruth:
    return planted_files[1]


_models: dict[str, Model] = {}


@pytest.fixture(scope="session")
def load(tiny_path, model_options):
    """load(arch) -> a Model shared by the tests of the session."""

    def get(arch: str) -> Model:
        if arch not in _models:
            _models[arch] = Model(tiny_path(arch), **model_options)
        return _models[arch]

    yield get
    for m in _models.values():
        m.close()
    _models.clear()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Super-expert checks cache their measurements: a test that uses this starts with none, outside the user's
    cache."""
    monkeypatch.setenv("MOTE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def zeroed_expert_copy():
    """zeroed_expert_copy(src, dst, layer, expert) -> dst, a copy of an F32 model with one expert's output zeroed."""
    return _copy_with_zeroed_expert_output


def _copy_with_zeroed_expert_output(src: Path, dst: Path, layer: int, expert: int) -> Path:
    """A copy of an F32 model in which one expert's down projection (and its bias) is zero."""
    import gguf

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    names = {f"blk.{layer}.ffn_down_exps.weight", f"blk.{layer}.ffn_down_exps.bias"}
    tensors = [t for t in reader.tensors if t.name in names]
    assert tensors and all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors)
    for t in tensors:
        t.data[expert] = 0.0
    reader.data.flush()
    return dst
