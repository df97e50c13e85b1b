"""Models by name: ``ORG/NAME[:QUANT]`` on the Hugging Face Hub (llama.cpp's ``-hf``) and ``ollama:NAME[:TAG]`` in an
ollama store, resolved to the path of a local GGUF file (the first shard of a split model).

The Hub goes through huggingface_hub, so its cache and settings apply as they do to every Hugging Face tool
(``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``, ``HF_TOKEN``, ``HF_ENDPOINT``); it is imported only when a Hub
name is resolved. The file a quant tag picks follows llama.cpp's own ``-hf`` (common/download.cpp,
``find_best_model``), so a name means the same file here as in llama-cli and llama-server.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mote_local.errors import ModelFileError

__all__ = ["OLLAMA_PREFIX", "choose_gguf", "resolve_hf", "resolve_model", "resolve_ollama"]

OLLAMA_PREFIX = "ollama:"
# llama.cpp's -hf default when no tag is given: the first of these present, else the first model file
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")
# GGUF files in a model repository that are not the model (download.cpp, gguf_filename_is_model)
_NOT_MODELS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class _GgufName:
    """What a GGUF file's name says (download.cpp, get_gguf_split_info)."""

    prefix: str  # the path without ".gguf" and without the shard suffix
    tag: str  # the quant tag at its end, upper case ("" when none)
    index: int  # shard number, from 1
    count: int  # shards in all (1: not split)

    @classmethod
    def of(cls, path: str) -> _GgufName | None:
        if not path.endswith(".gguf"):
            return None
        prefix, index, count = path[: -len(".gguf")], 1, 1
        m = _SPLIT.match(prefix)
        if m:
            prefix, index, count = m[1], int(m[2]), int(m[3])
        m = _TAG.search(prefix)
        return cls(prefix, m[1].upper() if m else "", index, count)


def _is_model(path: str) -> bool:
    return path.endswith(".gguf") and not any(word in path.rsplit("/", 1)[-1] for word in _NOT_MODELS)


def choose_gguf(files: list[str], tag: str, repo: str) -> list[str]:
    """The files of the model that ``tag`` picks among a repository's ``files`` (in the Hub's order), first shard
    first, as llama.cpp's -hf picks them: the first model file (the first shard of a split one) whose path holds
    the tag followed by ``.`` or ``-``, case-insensitively; with no tag, Q4_K_M, else Q8_0, else the first model
    file. A ModelFileError lists the tags there when none matches."""
    names = {f: n for f in files if (n := _GgufName.of(f)) is not None}
    firsts = [f for f in files if _is_model(f) and names[f].index == 1]
    chosen = None
    for t in (tag,) if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        chosen = next((f for f in firsts if pattern.search(f)), None)
        if chosen is not None:
            break
    if chosen is None and not tag and firsts:
        chosen = firsts[0]
    if chosen is None:
        if not firsts:
            raise ModelFileError(
                f"{repo} holds no GGUF model file: give a repository of GGUF files (often named …-GGUF)"
            )
        tags = list(dict.fromkeys(names[f].tag or f for f in firsts))
        raise ModelFileError(
            f"{repo} has no GGUF file with the tag {tag}: the tags there are {', '.join(tags)}; give one as {repo}:TAG"
        )
    name = names[chosen]
    if name.count == 1:
        return [chosen]
    shards = sorted(
        (f for f, n in names.items() if n.prefix == name.prefix and n.count == name.count), key=lambda f: names[f].index
    )
    if [names[f].index for f in shards] != list(range(1, name.count + 1)):
        raise ModelFileError(
            f"{repo} lists {len(shards)} of the {name.count} shards of {chosen}: the repository is "
            "incomplete; choose another tag"
        )
    return shards


def _parse_hf(spec: str) -> tuple[str, str]:
    repo, _, tag = spec.partition(":")
    if not _REPO.match(repo) or ":" in tag:
        raise ModelFileError(
            f"{spec!r} is not a Hugging Face model name: give ORG/NAME or ORG/NAME:QUANT "
            "(e.g. unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M)"
        )
    return repo, tag


def _silent_bars() -> type:
    """A tqdm class that shows nothing, for huggingface_hub's downloads with progress=False."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


def resolve_hf(spec: str, *, progress: bool = True) -> Path:
    """The local path of the model ``ORG/NAME[:QUANT]`` on the Hugging Face Hub (the first shard of a split model),
    downloading every file of it that the cache does not hold, with progress bars on stderr when ``progress``.
    With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cache alone answers."""
    repo, tag = _parse_hf(spec)
    try:
        import httpx2
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ModelFileError("models by Hugging Face name need huggingface_hub: pip install huggingface_hub") from None
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    offline = constants.HF_HUB_OFFLINE
    unreachable = None

    def failed(err: Exception, what: str) -> ModelFileError:
        if isinstance(err, hf_errors.GatedRepoError):
            return ModelFileError(
                f"{repo} is gated: accept its terms on its page on the Hub, then set HF_TOKEN to a "
                "token of that account (or run `hf auth login`)"
            )
        if isinstance(err, hf_errors.RepositoryNotFoundError):
            return ModelFileError(
                f"no model {repo} on the Hub ({constants.ENDPOINT}): check the name; a private "
                "model needs HF_TOKEN set to a token that may read it"
            )
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return ModelFileError(
                f"the Hub refused {what} of {repo} (HTTP {status}): authentication required; set "
                "HF_TOKEN to a token that may read it (or run `hf auth login`)"
            )
        if isinstance(err, hf_errors.HfHubHTTPError):
            return ModelFileError(
                f"the Hub ({constants.ENDPOINT}) failed {what} of {repo} (HTTP {status}): try again later"
            )
        return ModelFileError(
            f"cannot reach the Hub ({constants.ENDPOINT}) for {what} of {repo}: {err}; check the "
            "network, or set HF_HUB_OFFLINE=1 to use the cache alone"
        )

    files = None
    if not offline:
        try:
            files = HfApi().list_repo_files(repo)
        except (httpx2.TransportError, hf_errors.OfflineModeIsEnabled) as err:
            unreachable = failed(err, "the file list")
        except hf_errors.HfHubHTTPError as err:
            raise failed(err, "the file list") from None
    if files is None:
        try:
            snapshot = Path(snapshot_download(repo, local_files_only=True))
        except (hf_errors.LocalEntryNotFoundError, FileNotFoundError, OSError):
            if unreachable is not None:
                raise unreachable from None
            raise ModelFileError(
                f"HF_HUB_OFFLINE=1 and {repo} is not in {where}: unset HF_HUB_OFFLINE to download it"
            ) from None
        files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if not p.is_dir())
    local_only = offline or unreachable is not None
    chosen = choose_gguf(files, tag, repo)
    bars = None if progress else _silent_bars()
    paths = []
    for i, name in enumerate(chosen):
        try:
            paths.append(Path(hf_hub_download(repo, name, local_files_only=local_only, tqdm_class=bars)))
        except hf_errors.LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE=1" if offline else "the Hub cannot be reached"
            raise ModelFileError(
                f"{why} and {name} (shard {i + 1} of {len(chosen)} of {repo}) is not in {where}: "
                + ("unset HF_HUB_OFFLINE to download it" if offline else "connect and try again")
            ) from None
        except (httpx2.TransportError, hf_errors.HfHubHTTPError, hf_errors.OfflineModeIsEnabled) as err:
            raise failed(err, f"the download of {name}") from None
    return paths[0]


def ollama_store() -> Path:
    """Where ollama keeps its models: ``$OLLAMA_MODELS``, else ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


# one part of an ollama name ([HOST[:PORT]/][NAMESPACE/]MODEL[:TAG], hf.co/ORG/REPO:TAG among them)
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


def resolve_ollama(name: str) -> Path:
    """The GGUF blob of ollama's model ``NAME[:TAG]`` (``library/NAME``, tag ``latest`` by default; also
    ``NAMESPACE/NAME`` and ``HOST/NAMESPACE/NAME``; with or without the ``ollama:`` prefix), read from its manifest
    in the ollama store."""
    name = name.removeprefix(OLLAMA_PREFIX)
    *where, last = name.split("/")
    model, _, tag = last.partition(":")
    host = where.pop(0) if len(where) == 2 else "registry.ollama.ai"
    ns = where[0] if where else "library"
    parts = [ns, model] + ([tag] if tag else [])
    if len(where) > 1 or not all(_OLLAMA_PART.match(x) for x in parts) or not re.match(r"^[\w.-]+(:\d+)?$", host):
        raise ModelFileError(
            f"{OLLAMA_PREFIX}{name} is not an ollama model name: give ollama:NAME or "
            "ollama:NAME:TAG (e.g. ollama:qwen3:30b-a3b)"
        )
    tag = tag or "latest"
    store = ollama_store()
    manifests = store / "manifests"
    if not manifests.is_dir():
        raise ModelFileError(
            f"no ollama model store at {store} (no manifests folder): pull the model with "
            f"`ollama pull {name}`, or set OLLAMA_MODELS to the store's folder"
        )
    manifest = manifests / host / ns / model / tag
    if not manifest.is_file():
        present = sorted(f"{p.parent.name}:{p.name}" for p in (manifests / host / ns).glob("*/*") if p.is_file())
        there = f"; the store holds {', '.join(present)}" if present else ""
        raise ModelFileError(f"ollama model {model}:{tag} is not in {store}{there}: pull it with `ollama pull {name}`")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == _OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise ModelFileError(
            f"{manifest} is not an ollama manifest with a model layer ({_OLLAMA_MODEL_LAYER}): "
            f"pull the model again with `ollama pull {name}`"
        ) from None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ModelFileError(
            f"{manifest} names the model blob {digest!r}, not a sha256 digest: pull the model "
            f"again with `ollama pull {name}`"
        )
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelFileError(
            f"{blob}, the model blob of ollama's {model}:{tag}, is missing: pull the model again "
            f"with `ollama pull {name}`"
        )
    return blob


def resolve_model(path_or_name: str) -> Path:
    """A model given on the command line: ``ollama:NAME[:TAG]`` is looked up in the ollama store; anything else is
    a path, returned as it is (checking it is the layout reader's job)."""
    if path_or_name.startswith(OLLAMA_PREFIX):
        return resolve_ollama(path_or_name)
    return Path(path_or_name)
