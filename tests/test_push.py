"""`python -m training.push`: the Hub repository layout, written to a local folder or uploaded through a mocked
Hub API (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_models.registry import get_spec
from training import push
from training.common import UsageError
from training.tokenization import train_bpe_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shakespeare_file):
    folder = tmp_path_factory.mktemp("checkpoint")
    spec = get_spec("llama")
    texts = shakespeare_file.read_text(encoding="utf-8").split("\n\n")[:300]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    model = spec.model_class(spec.make_config({"vocab_size": 300}, tiny=True))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text('# card\n\n```python\nAutoModelForCausalLM.from_pretrained("llama")\n```\n')
    (folder / "all_results.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    return folder


def test_local_dir_holds_the_repository_layout(checkpoint, tmp_path):
    destination = push.main(["--checkpoint", str(checkpoint), "--local_dir", str(tmp_path / "repo")])
    repo = Path(destination)
    names = {path.name for path in repo.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "all_results.json"} <= names
    assert "optimizer.pt" not in names
    model = AutoModelForCausalLM.from_pretrained(repo)
    original = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert len(AutoTokenizer.from_pretrained(repo)) == 300


class FakeHubApi:
    """Records what would be sent to the Hub and snapshots the uploaded folder."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        FakeHubApi.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message):
        FakeHubApi.calls.append(("upload_folder", {"repo_id": repo_id, "commit_message": commit_message}))
        FakeHubApi.uploaded = {path.name: path.read_bytes() for path in Path(folder_path).iterdir()}


def test_push_to_the_hub_uploads_the_same_layout(checkpoint, monkeypatch):
    monkeypatch.setattr(push, "HfApi", FakeHubApi)
    url = push.main(["--checkpoint", str(checkpoint), "--repo_id", "someone/tiny-llama", "--private", "true"])
    assert url == "https://huggingface.co/someone/tiny-llama"
    assert [name for name, _ in FakeHubApi.calls] == ["create_repo", "upload_folder"]
    assert FakeHubApi.calls[0][1] == {"repo_id": "someone/tiny-llama", "private": True, "exist_ok": True}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(FakeHubApi.uploaded)
    assert b'from_pretrained("someone/tiny-llama")' in FakeHubApi.uploaded["README.md"]


def test_push_errors(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--repo_id"):
        push.main(["--checkpoint", str(checkpoint)])
    with pytest.raises(UsageError, match="not found"):
        push.main(["--checkpoint", str(tmp_path / "missing"), "--local_dir", str(tmp_path / "repo")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no weights"):
        push.main(["--checkpoint", str(tmp_path / "empty"), "--local_dir", str(tmp_path / "repo")])
    assert not (tmp_path / "repo").exists()
