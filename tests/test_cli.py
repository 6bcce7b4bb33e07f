"""The edge-slm command, called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_slm.cli import main


def test_generate_json(bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "generate",
            str(bundles["llama"]),
            "Once upon a time",
            "--json",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) <= 5
    assert result["finish_reason"] in {"length", "stop_token"}
    assert result["timings"]["decode_tokens_per_s"] >= 0


def test_chat_streams(bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["chat", str(bundles["qwen2"]), "Hello", "--max-new-tokens", "4", "--seed", "3"]) == 0
    )
    captured = capsys.readouterr()
    assert "[finish:" in captured.err


def test_info_and_errors(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(bundles["gpt2"])]) == 0
    assert json.loads(capsys.readouterr().out)["model_type"] == "gpt2"
    assert main(["info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["generate", str(bundles["gpt2"]), "Hi", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_export_through_the_cli(hf_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    assert main(["export", str(hf_models["llama"]), str(out)]) == 0
    assert (out / "manifest.json").is_file()
    # A non-empty output folder is not overwritten without --overwrite.
    assert main(["export", str(hf_models["llama"]), str(out)]) == 2
