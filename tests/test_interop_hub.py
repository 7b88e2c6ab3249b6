"""The Hub paths with local files only: `import-hf ORG/NAME` through huggingface_hub's real cache lookup
(offline, a cache laid out as the Hub client writes it), and `export-hf --push-to-hub` against a recording
stand-in for the two HfApi calls (the Hub is unreachable here)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer

from smolds import ModelConfig, Transformer
from smolds.interop.cli import main as interop_main
from smolds.pretrained import load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(cache: Path, repo_id: str, files_from: Path) -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(files_from, repo / "snapshots" / COMMIT)
    return repo


def _offline_cli(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "smolds", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_import_hf_by_repo_id_from_the_hub_cache(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    hf.save_pretrained(tmp_path / "files")
    _cached_repo(tmp_path / "hub", "someone/tiny-llama", tmp_path / "files")
    proc = _offline_cli(tmp_path / "hub", "import-hf", "someone/tiny-llama", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    model, _ = load_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    # Not in the cache and offline: one line that names the repo and the way out.
    proc = _offline_cli(tmp_path / "hub", "import-hf", "someone/other", str(tmp_path / "x"))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "could not get someone/other from the Hugging Face Hub" in err[0] and "pass the directory" in err[0]


def test_export_hf_push_to_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, **kw):
        calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    cfg = ModelConfig.from_preset("tiny").replace(num_hidden_layers=2)
    save_pretrained(Transformer(cfg), tmp_path / "ck", byte_tokenizer(), extra={"step": 400})
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf"), "--push-to-hub", "me/tiny-ds",
                         "--private"]) == 0
    assert calls[0] == ("create_repo", "me/tiny-ds", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload_folder", "me/tiny-ds")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(calls[1][2])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "step: 400" in card and "DeepSeekMoE: 8 routed experts" in card
    assert "pushed to https://huggingface.co/me/tiny-ds" in capsys.readouterr().out

    def offline(self, **kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf2"), "--push-to-hub", "me/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not push" in err[0] and "Network is unreachable" in err[0]
    assert (tmp_path / "hf2" / "config.json").is_file()  # the export is kept
    with pytest.raises(SystemExit):
        interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf3"), "--push-to-hub"])
    assert interop_main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf3"), "--push-to-hub", "no-slash"]) == 1
    assert "expected a repo id" in capsys.readouterr().err and not (tmp_path / "hf3").exists()
