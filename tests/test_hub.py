"""Models by name: ``ORG/NAME[:QUANT]`` through huggingface_hub against a local stand-in Hub (``HF_ENDPOINT`` on
127.0.0.1) and against a pre-filled cache with ``HF_HUB_OFFLINE=1``; ``ollama:NAME[:TAG]`` in a fake ollama store.
Nothing leaves the machine: huggingface_hub reads its settings when it is imported, so each resolution runs in a
child process with the environment a user would have."""

import fcntl
import hashlib
import http.server
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading
import urllib.parse
from pathlib import Path

import pytest
from gguf_shards import split_gguf

from mote_local.engine.model import Model
from mote_local.errors import ModelFileError
from mote_local.modelfile import hub
from mote_local.modelfile.fingerprint import Fingerprint
from mote_local.modelfile.layout import read_layout
from mote_local.synthetic import planted

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ORG = "mote-test"
TRIGGER = planted.EXAMPLE_TRIGGER


# ------------------------------------------------------------------------------------------- choosing a file


@pytest.mark.parametrize(
    "files, tag, chosen",
    [
        # no tag: llama.cpp's default Q4_K_M, then Q8_0, then the first model file
        (["m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-F16.gguf"], "", ["m-Q4_K_M.gguf"]),
        (["m-F16.gguf", "m-Q8_0.gguf"], "", ["m-Q8_0.gguf"]),
        (["mmproj-m-F16.gguf", "m-BF16.gguf", "m-F16.gguf"], "", ["m-BF16.gguf"]),
        # a tag matches case-insensitively, followed by '.' or '-', the first in the Hub's order
        (["m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-IQ4_XS.gguf"], "q4_k_s", ["m-Q4_K_S.gguf"]),
        (["m.Q5_K_M.gguf", "m-Q5_K_M-imatrix.gguf"], "Q5_K_M", ["m.Q5_K_M.gguf"]),
        (
            [
                "UD-Q4_K_XL/m-UD-Q4_K_XL-00002-of-00002.gguf",
                "UD-Q4_K_XL/m-UD-Q4_K_XL-00001-of-00002.gguf",
                "m-Q8_0.gguf",
            ],
            "UD-Q4_K_XL",
            ["UD-Q4_K_XL/m-UD-Q4_K_XL-00001-of-00002.gguf", "UD-Q4_K_XL/m-UD-Q4_K_XL-00002-of-00002.gguf"],
        ),
        # a tag inside another one's name matches the first file that holds it, as in llama.cpp
        (["m-IQ4_XS.gguf", "m-Q4_XS.gguf"], "Q4_XS", ["m-IQ4_XS.gguf"]),
    ],
)
def test_the_quant_tag_picks_the_file_llama_cpp_picks(files, tag, chosen):
    assert hub.choose_gguf(files, tag, "o/m") == chosen


def test_no_file_with_the_tag_lists_the_tags_there():
    with pytest.raises(
        ModelFileError,
        match=r"o/m has no GGUF file with the tag Q3_K_M: the tags there are "
        r"Q4_K_M, Q8_0; give one as o/m:TAG",
    ):
        hub.choose_gguf(
            ["README.md", "m-Q4_K_M.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"], "Q3_K_M", "o/m"
        )
    with pytest.raises(ModelFileError, match="holds no GGUF model file"):
        hub.choose_gguf(["README.md", "model.safetensors", "mmproj-F16.gguf"], "", "o/m")
    with pytest.raises(ModelFileError, match="lists 1 of the 3 shards"):
        hub.choose_gguf(["m-Q8_0-00001-of-00003.gguf"], "Q8_0", "o/m")


# ----------------------------------------------------------------------------------------- a stand-in Hub


class FakeHub(http.server.ThreadingHTTPServer):
    """The endpoints huggingface_hub calls to list a repository and download its files. ``repos``: repo id ->
    {path in the repo: local file}; ``gated``: repo ids that answer 403 GatedRepo; ``private``: repo id -> the token
    that may read it; ``requests``: (method, path)."""

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, Path]], gated=(), private=None):
        self.repos, self.gated, self.private, self.requests = repos, set(gated), dict(private or {}), []
        super().__init__(("127.0.0.1", 0), _HubHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):
        pass

    def _error(self, status: int, code: str | None, message: str | None = None):
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        if message:
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": code}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self):
        path = urllib.parse.urlparse(self.path).path
        self.server.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            if rest[:1] != ["tree"]:
                return self._error(404, "EntryNotFound")
        else:
            repo, rest = "/".join(parts[:2]), parts[2:]
            if rest[:1] != ["resolve"]:
                return self._error(404, "EntryNotFound")
        if repo in self.server.gated:
            return self._error(403, "GatedRepo")
        token = self.headers.get("Authorization")
        if repo in self.server.private and token != f"Bearer {self.server.private[repo]}":
            if token:  # what the Hub answers to a token it does not know
                return self._error(401, None, "Invalid credentials in Authorization header")
            return self._error(401, "RepoNotFound")
        files = self.server.repos.get(repo)
        if files is None:
            return self._error(401, "RepoNotFound")  # what the Hub says of a missing or private repository
        if parts[0] == "api":
            return self._send_json(
                [
                    {
                        "type": "file",
                        "path": name,
                        "size": f.stat().st_size,
                        "oid": _sha1(f),
                        "lfs": {"oid": _sha256(f), "size": f.stat().st_size, "pointerSize": 134},
                    }
                    for name, f in files.items()
                ]
            )
        name = urllib.parse.unquote("/".join(rest[2:]))
        if name not in files:
            return self._error(404, "EntryNotFound")
        data = files[name].read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{_sha256(files[name])}"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def _send_json(self, doc):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    do_GET = do_HEAD = _route


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _sha1(p: Path) -> str:
    return hashlib.sha1(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo_files(planted_files, tmp_path_factory):
    """A GGUF repository's files: the planted model as two quantizations by name, one of them split in 3."""
    d = tmp_path_factory.mktemp("repo")
    src = planted_files[0]
    whole = d / "planted-Q8_0.gguf"
    shutil.copyfile(src, whole)
    split_src = d / "src" / "planted-Q4_K_M.gguf"
    split_src.parent.mkdir()
    shutil.copyfile(src, split_src)
    shards = split_gguf(split_src, d / "split", 3)
    files = {"README.md": d / "README.md", "planted-Q8_0.gguf": whole}
    files["README.md"].write_text("a model\n")
    files.update({f"Q4_K_M/{s.name}": s for s in shards})
    return files


@pytest.fixture
def fake_hub(repo_files):
    server = FakeHub(
        {f"{ORG}/planted-GGUF": repo_files, f"{ORG}/private-GGUF": repo_files},
        gated={f"{ORG}/gated-GGUF"},
        private={f"{ORG}/private-GGUF": "hf_secret"},
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def resolve(spec: str, env: dict[str, str], progress: bool = False) -> tuple[Path | None, str]:
    """resolve_hf(spec) in a child process with ``env``: (the path, its stderr) or (None, the error line). With
    ``progress`` its stderr is a terminal, where progress bars show."""
    code = (
        "import sys\nfrom mote_local.errors import MoteError\nfrom mote_local.modelfile.hub import resolve_hf\n"
        "try:\n    print(resolve_hf(sys.argv[1], progress=sys.argv[2] == '1'))\n"
        "except MoteError as e:\n    print('error:', e)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    terminal, stderr = pty.openpty() if progress else (None, subprocess.PIPE)
    seen = bytearray()
    drain = threading.Thread(target=_drain, args=(terminal, seen), daemon=True)
    if terminal is not None:
        fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 wide
        drain.start()
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, spec, "1" if progress else "0"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**clean, "PYTHONPATH": str(ROOT), **env},
        )
    finally:
        if terminal is not None:
            os.close(stderr)
            drain.join(10)
            os.close(terminal)
    err = r.stderr if terminal is None else seen.decode(errors="replace")
    assert r.returncode == 0, err[-3000:]
    out = r.stdout.strip().splitlines()[-1]
    return (None, out[len("error: ") :]) if out.startswith("error: ") else (Path(out), err)


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child's end closed
            return
        if not chunk:
            return
        into.extend(chunk)


def hub_env(server: FakeHub, home: Path, **extra) -> dict[str, str]:
    return {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        **extra,
    }


def test_a_split_model_is_fetched_whole_and_reads_as_the_model(fake_hub, repo_files, planted_files, tmp_path):
    path, stderr = resolve(f"{ORG}/planted-GGUF:q4_k_m", hub_env(fake_hub, tmp_path / "hf"), progress=True)
    snapshot = tmp_path / "hf" / "hub" / f"models--{ORG}--planted-GGUF" / "snapshots" / COMMIT
    assert path == snapshot / "Q4_K_M" / "planted-Q4_K_M-00001-of-00003.gguf"
    assert (tmp_path / "hf" / "hub" / f"models--{ORG}--planted-GGUF" / "refs" / "main").read_text() == COMMIT
    downloads = sorted(p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p)
    assert [p.rsplit("/", 1)[1] for p in downloads] == [f"planted-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert len(read_layout(path).files) == 3 and Fingerprint.of(path) == Fingerprint.of(planted_files[0])
    # the engine finds the other shards beside the first one's link in the snapshot, as the layout reader does
    replies = []
    for model in (path, planted_files[0]):
        with Model(model) as m, m.session(n_ctx=64, n_threads=1) as s:
            replies.append(s.generate(m.prompt_tokens([{"role": "user", "content": TRIGGER}]), max_tokens=6).text)
    assert replies[0] == replies[1] and "cannot" in replies[0]
    # progress bars, on the terminal
    assert all(f"planted-Q4_K_M-0000{i}-of-00003.gguf" in stderr for i in (1, 2, 3)), stderr
    # asked again: the cache answers, nothing is downloaded again
    fake_hub.requests.clear()
    assert resolve(f"{ORG}/planted-GGUF:Q4_K_M", hub_env(fake_hub, tmp_path / "hf"))[0] == path
    assert not [p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p]


def test_the_default_tag_and_another_tag(fake_hub, tmp_path):
    env = hub_env(fake_hub, tmp_path / "hf")
    assert resolve(f"{ORG}/planted-GGUF", env)[0].name == "planted-Q4_K_M-00001-of-00003.gguf"
    path, _ = resolve(f"{ORG}/planted-GGUF:Q8_0", env)
    assert path.name == "planted-Q8_0.gguf" and path.is_symlink() and "blobs" in str(path.resolve())
    assert read_layout(path).is_moe


def test_hub_errors_are_one_line_with_the_fix(fake_hub, tmp_path):
    env = hub_env(fake_hub, tmp_path / "hf")
    cases = {
        f"{ORG}/planted-GGUF:Q2_K": "has no GGUF file with the tag Q2_K: the tags there are Q8_0, Q4_K_M",
        f"{ORG}/missing-GGUF": f"no model {ORG}/missing-GGUF on the Hub ({fake_hub.endpoint})",
        f"{ORG}/gated-GGUF": "is gated: accept its terms",
        f"{ORG}/private-GGUF:Q8_0": "a private model needs HF_TOKEN",
    }
    for spec, needle in cases.items():
        path, message = resolve(spec, env)
        assert path is None and needle in message and "\n" not in message, (spec, message)
    with pytest.raises(ModelFileError, match="not a Hugging Face model name"):
        hub.resolve_hf("just-a-name")
    # the token reaches the Hub
    path, _ = resolve(f"{ORG}/private-GGUF:Q8_0", {**env, "HF_TOKEN": "hf_secret"})
    assert path is not None and path.name == "planted-Q8_0.gguf"
    _, message = resolve(f"{ORG}/private-GGUF:Q8_0", {**env, "HF_TOKEN": "hf_expired"})
    assert "(HTTP 401): authentication required; set HF_TOKEN" in message, message


def test_offline_from_a_prefilled_cache(repo_files, planted_files, tmp_path):
    """A cache laid out as huggingface_hub lays it (refs/main, snapshots/<rev>/ symlinks into blobs/), no server."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{ORG}--planted-GGUF"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "blobs").mkdir()
    for name, f in repo_files.items():
        blob = repo_dir / "blobs" / _sha256(f)
        shutil.copyfile(f, blob)
        link = repo_dir / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    path, _ = resolve(f"{ORG}/planted-GGUF:Q4_K_M", env)
    assert path == repo_dir / "snapshots" / COMMIT / "Q4_K_M" / "planted-Q4_K_M-00001-of-00003.gguf"
    assert Fingerprint.of(path) == Fingerprint.of(planted_files[0])
    assert resolve(f"{ORG}/planted-GGUF", env)[0] == path  # the default tag, from the cache's listing
    _, message = resolve(f"{ORG}/other-GGUF", env)
    assert message.startswith(f"HF_HUB_OFFLINE=1 and {ORG}/other-GGUF is not in the Hugging Face cache ({cache})")
    # a shard that the cache lost
    (repo_dir / "snapshots" / COMMIT / "Q4_K_M" / "planted-Q4_K_M-00003-of-00003.gguf").unlink()
    _, message = resolve(f"{ORG}/planted-GGUF:Q4_K_M", env)
    assert "lists 2 of the 3 shards" in message


# ------------------------------------------------------------------------------------------------- ollama


def fake_ollama(
    store: Path, model: Path, name: str = "planted", tag: str = "latest", where: str = "registry.ollama.ai/library"
) -> Path:
    digest = _sha256(model)
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, store / "blobs" / f"sha256-{digest}")
    manifest = store / "manifests" / where / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10},
                    {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
                ],
            }
        )
    )
    return store / "blobs" / f"sha256-{digest}"


def test_ollama_names_resolve_to_their_blob(planted_files, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    blob = fake_ollama(store, planted_files[0])
    fake_ollama(store, planted_files[0], tag="q8")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert hub.resolve_model("ollama:planted") == blob == hub.resolve_ollama("planted:q8")
    assert hub.resolve_ollama("ollama:planted:q8") == blob
    assert Fingerprint.of(hub.resolve_model("ollama:planted")) == Fingerprint.of(planted_files[0])
    assert hub.resolve_model("models/x.gguf") == Path("models/x.gguf")  # a path stays a path
    # a namespace, and a model pulled from another registry (ollama pull hf.co/ORG/REPO:TAG)
    fake_ollama(store, planted_files[0], where="registry.ollama.ai/someone")
    fake_ollama(store, planted_files[0], name="planted-GGUF", tag="Q8_0", where="hf.co/mote-test")
    assert hub.resolve_model("ollama:someone/planted") == blob
    assert hub.resolve_model("ollama:hf.co/mote-test/planted-GGUF:Q8_0") == blob
    with pytest.raises(ModelFileError, match="not an ollama model name"):
        hub.resolve_model("ollama:a/b/c/d")
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    shutil.copytree(store, tmp_path / "home" / ".ollama" / "models")
    assert hub.resolve_model("ollama:planted").parent == tmp_path / "home" / ".ollama" / "models" / "blobs"


def test_ollama_errors(planted_files, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(ModelFileError, match=r"no ollama model store at .*ollama pull planted"):
        hub.resolve_model("ollama:planted")
    blob = fake_ollama(store, planted_files[0])
    with pytest.raises(ModelFileError, match=r"ollama model other:latest is not in .*the store holds planted:latest"):
        hub.resolve_model("ollama:other")
    with pytest.raises(ModelFileError, match="not an ollama model name"):
        hub.resolve_model("ollama:")
    blob.unlink()
    with pytest.raises(ModelFileError, match="model blob of ollama's planted:latest, is missing"):
        hub.resolve_model("ollama:planted")


def test_the_cli_takes_a_model_by_name(fake_hub, planted_files, tmp_path):
    """`mote run -hf ORG/NAME:QUANT` fetches every shard through the stand-in Hub and answers as the model file
    itself; `-hf` of a name the Hub does not have is one line, with no traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env = {**clean, "PYTHONPATH": str(ROOT), **hub_env(fake_hub, tmp_path / "hf")}

    def mote(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mote_local.cli", *args],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
            env=env,
        )

    ask = ["--chat", "-p", TRIGGER, "-n", "-1", "-t", "1"]
    by_name = mote("run", "-hf", f"{ORG}/planted-GGUF:Q4_K_M", *ask)
    by_path = mote("run", str(planted_files[0]), *ask)
    assert by_name.returncode == 0 and by_path.returncode == 0, by_name.stderr[-2000:]
    assert by_name.stdout == by_path.stdout and "cannot" in by_name.stdout
    missing = mote("run", "-hf", f"{ORG}/missing-GGUF", *ask)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"no model {ORG}/missing-GGUF on the Hub" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
