"""The edge-slm command, called in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_slm.cli.main import main


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
    assert main(["info", str(bundles["gpt2"]), "--json"]) == 0
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


def test_generate_with_the_kiosk_options(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import edge_slm

    bundle = str(bundles["llama"])
    cache = edge_slm.load(bundle).save_prefix_cache(tmp_path / "p.npz", "You are a kiosk.")
    args = ["generate", bundle, "You are a kiosk. Hello", "--json", "--temperature", "0"]
    args += ["--max-new-tokens", "6", "--logprobs", "2", "--prefix-cache", str(cache)]
    args += ["--logit-bias", "5=-inf", "--stop-token-id", "7", "--stop", "zzz"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["timings"]["reused_prompt_tokens"] > 0
    assert len(result["logprobs"]) == len(result["token_ids"])
    assert 5 not in result["token_ids"]
    assert main(["generate", bundle, "Hi", "--logit-bias", "five"]) == 2
    assert "ID=BIAS" in capsys.readouterr().err


def test_choose_prints_one_probability_per_option(
    bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["chat", str(bundles["qwen2"]), "Where is platform 4?"]
    assert main([*args, "--choose", "tickets", "--choose", "directions"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["option"] for line in lines] == ["tickets", "directions"]
    assert abs(sum(line["probability"] for line in lines) - 1) < 1e-6


def test_perplexity_command(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_slm.generation.perplexity import bundle_perplexity

    text = tmp_path / "t.txt"
    text.write_text("Paris is the capital of France. Once upon a time there lived a fox. " * 6)
    assert main(["perplexity", str(bundles["llama"]), str(text), "--window", "32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = bundle_perplexity(bundles["llama"], text, window=32)
    assert printed["perplexity"] == pytest.approx(direct.perplexity)
    assert printed["tokens"] == direct.tokens > 0
    assert main(["perplexity", str(bundles["llama"]), str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
