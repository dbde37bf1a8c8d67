"""Upload through huggingface_hub with only its API object replaced (the network boundary), and
the --dry-run listing."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from click.testing import CliRunner

from mlx_qwen35.cli.convert import main
from mlx_qwen35.weights.convert import convert


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, sees the folder as it is uploaded."""

    calls: list = []
    fail_with: Exception | None = None

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeHfApi.calls.append(("upload_folder", kwargs, files))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHfApi


@pytest.fixture
def source(hf_checkpoint):
    return hf_checkpoint("base")[1]


def test_upload_creates_repo_and_uploads_finished_folder(fake_hub, source, tmp_path):
    out = tmp_path / "q4"
    result = CliRunner().invoke(
        main,
        [
            "--hf-path",
            str(source),
            "--mlx-path",
            str(out),
            "-q",
            "--q-group-size",
            "32",
            "--upload-repo",
            "someone/tiny-qwen35-4bit",
        ],
    )
    assert result.exit_code == 0, result.output
    (create, repo, kwargs), (upload, up_kwargs, files) = fake_hub.calls
    assert (create, repo) == ("create_repo", "someone/tiny-qwen35-4bit")
    assert kwargs == {"repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder" and up_kwargs["repo_id"] == "someone/tiny-qwen35-4bit"
    assert Path(up_kwargs["folder_path"]) == out  # the renamed result, never the temporary dir
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert "https://huggingface.co/someone/tiny-qwen35-4bit" in result.output
    card = (out / "README.md").read_text()
    assert 'load("someone/tiny-qwen35-4bit")' in card


def test_failed_upload_keeps_the_conversion(fake_hub, source, tmp_path):
    fake_hub.fail_with = OSError("connection reset by peer")
    out = tmp_path / "q4"
    result = CliRunner().invoke(
        main, ["--hf-path", str(source), "--mlx-path", str(out), "--upload-repo", "someone/x"]
    )
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.startswith("Error: upload to someone/x failed") and "\n" not in err
    assert "connection reset" in err and f"hf upload someone/x {out}" in err
    assert (out / "config.json").is_file()


def test_upload_without_token_fails_before_converting(monkeypatch, source, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    out = tmp_path / "q4"
    result = CliRunner().invoke(
        main, ["--hf-path", str(source), "--mlx-path", str(out), "--upload-repo", "someone/x"]
    )
    assert result.exit_code == 1 and "needs a Hugging Face token" in result.stderr
    assert not out.exists()


def test_dry_run_lists_files_and_destination(fake_hub, source, tmp_path):
    out = tmp_path / "q4"
    args = [
        "--hf-path",
        str(source),
        "--mlx-path",
        str(out),
        "--recipe",
        "mixed",
        "--q-group-size",
        "32",
        "--upload-repo",
        "someone/tiny-mixed",
        "--dry-run",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not out.exists() and fake_hub.calls == []
    text = result.stdout
    assert "Would upload" in text and "https://huggingface.co/someone/tiny-mixed" in text
    assert f"to {out}, then:" in text
    listed = dict(
        line.split("  ")[1:3]
        for line in text.splitlines()
        if line.startswith("  ") and "  " in line[2:]
    )
    # The real run writes exactly the files the dry run listed.
    real = convert(source, out, recipe="mixed", q_group_size=32, progress=False, upload_repo=None)
    real_names = {name for name, _ in real.files}
    assert set(listed) == real_names
    plan = convert(
        source, tmp_path / "other", recipe="mixed", q_group_size=32, dry_run=True, progress=False
    )
    sizes = dict(plan.files)
    for name, size in real.files:
        if name != "README.md":  # the card names the output, which differs here
            assert sizes[name] == size, name
