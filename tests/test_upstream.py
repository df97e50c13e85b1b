"""The patch series applies to a fresh copy of the pinned sdist, idempotently, and fails helpfully."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("upstream", REPO / "tools" / "upstream.py")
upstream = importlib.util.module_from_spec(spec)
spec.loader.exec_module(upstream)


@pytest.fixture(scope="module")
def fresh_llama_cpp(tmp_path_factory) -> Path:
    """The files the patch series touches, fresh from the pinned sdist."""
    dest = tmp_path_factory.mktemp("fresh")
    _, touched = upstream._series()
    root = upstream.extract(upstream.fetch(), dest, tuple(f"{upstream.LLAMA_CPP_SUBDIR}/{f}" for f in touched))
    return root / upstream.LLAMA_CPP_SUBDIR


def test_patches_apply_to_fresh_pinned_source_and_are_idempotent(fresh_llama_cpp):
    names = [p.name for p in upstream.patch_files()]
    assert names and names == sorted(names)
    assert upstream.apply_patches(fresh_llama_cpp) == names
    assert upstream.apply_patches(fresh_llama_cpp) == []  # second run: all already applied
    graph = (fresh_llama_cpp / "src" / "llama-graph.cpp").read_text()
    assert "mote::steer_logits(*this, logits, il);" in graph


def test_a_patch_that_does_not_apply_says_to_regenerate(fresh_llama_cpp, tmp_path):
    broken = tmp_path / "9999-broken.patch"
    text = upstream.patch_files()[0].read_text()
    broken.write_text(text.replace(' #include "ggml.h"', ' #include "ggml-not-there.h"'))
    with pytest.raises(upstream.UpstreamError, match="regenerate the patch against the pinned"):
        upstream.apply_patches(fresh_llama_cpp, [broken])


def test_patches_touch_only_call_sites():
    # logic lives in native/: the engine's patches stay a few dozen added lines, and so do llama-server's call
    # sites (request fields, slot launch and release, phase, response, lost rpc server)
    added = {
        p.name: sum(1 for line in p.read_text().splitlines() if line.startswith("+") and not line.startswith("+++"))
        for p in upstream.patch_files()
    }
    server = {name: n for name, n in added.items() if "llama-server" in name}
    assert sum(added.values()) - sum(server.values()) <= 40, added
    assert len(server) == 1 and sum(server.values()) <= 70, added


def test_bindings_are_rewritten_to_the_private_package():
    src = (
        "import llama_cpp.llama_cpp as llama_cpp\nfrom llama_cpp.llama_types import *\nimport llama_cpp\n"
        'import llama_cpp.llama\n_lib_base_name = "llama"\n'
    )
    out = upstream.rewrite_bindings_source(src)
    assert "import mote_local_engine.llama_cpp.llama_cpp as llama_cpp" in out
    assert "from mote_local_engine.llama_cpp.llama_types import *" in out
    assert "from mote_local_engine import llama_cpp\n" in out
    assert "import mote_local_engine.llama_cpp.llama; from mote_local_engine import llama_cpp" in out
    assert '_lib_base_name = "mote_llama"' in out
    assert "import llama_cpp" not in out.replace("mote_local_engine.llama_cpp", "").replace(
        "from mote_local_engine import llama_cpp", ""
    )
