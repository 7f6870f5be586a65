"""The oracle-only command line: `lmcoh tasks`, `show`, `exact`; errors; no torch import."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmcoh import cli
from lmcoh.tasks import library

REPO = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_tasks_lists_builtins_and_generators(capsys):
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in library.builtin_tasks():
        assert name in out
    assert "random-tree:T=3,A=2,seed=0,stochastic=0" in out and "gym:FrozenLake-v1" in out
    row = next(line for line in out.splitlines() if line.startswith("mountain_race "))
    assert row.split()[1:4] == ["6", "2", "deterministic"]
    assert set(library.builtin_tasks()) >= {"mountain_race", "stochastic_example", "lottery", "long_ridge",
                                            "expedition", "habit"}


def test_show_prints_model_text(capsys):
    assert cli.main(["show", "mountain_race"]) == 0
    out = capsys.readouterr().out
    assert " [start] You stand at the start of the mountain race. >" in out
    assert " up <eoa>" in out and "horizon 2" in out and "deterministic" in out
    assert "[start] You stand at the start of the mountain race. <success> up <eoa> [ridge]" in out


def test_show_limits_big_tasks(capsys):
    assert cli.main(["show", "random-tree:T=6,A=3,seed=0", "--limit", "5"]) == 0
    assert "1088 more states" in capsys.readouterr().out


def test_exact_json_mountain_race():
    """`lmcoh exact tasks/mountain_race.yaml --steps 4 --json`: the paper's pi_k(up|start)."""
    proc = _run("-m", "lmcoh", "exact", "tasks/mountain_race.yaml", "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["task"] == "mountain_race" and result["deterministic"] is True
    assert result["optimal_success"] == pytest.approx(1.0)
    retrain = result["sequences"]["retrain"]
    assert [e["k"] for e in retrain] == [0, 1, 2, 3, 4]
    ups = [e["policy"]["start"]["up"] for e in retrain]
    assert ups[:4] == pytest.approx([1 / 2, 2 / 5, 8 / 17, 32 / 59], abs=1e-12)
    assert retrain[0]["return"] == "-inf" and retrain[0]["incoherence"] == "inf"
    assert retrain[0]["success"] == pytest.approx(5 / 8) and retrain[1]["success"] == pytest.approx(17 / 20)
    assert set(result["sequences"]) == {"retrain", "temperature", "fold", "fold_ratio", "cumulative", "klrl",
                                         "klrl_success"}


def test_exact_json_without_policies(capsys):
    assert cli.main(["exact", "stochastic_example", "--steps", "2", "--json", "--no-policies"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all("policy" not in e for entries in result["sequences"].values() for e in entries)
    assert result["deterministic"] is False


def test_exact_table(capsys):
    assert cli.main(["exact", "mountain_race", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "pi(up|start)" in out and "fold_ratio" in out
    retrain = out.split("\nretrain\n")[1].split("\n\n")[0].splitlines()
    assert retrain[2].split()[-2:] == ["0.400000", "0.600000"]
    assert retrain[1].split()[1:4] == ["0.625000", "-inf", "inf"]


def test_python_m_lmcoh_and_bad_spec():
    proc = _run("-m", "lmcoh", "exact", "random-tree:T=3,Q=2")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "lmcoh: error: random-tree:T=3,Q=2: unknown parameter 'Q'; known: T, A, seed, stochastic, prior"


@pytest.mark.parametrize("argv", [[], ["exact"], ["exact", "mountain_race", "--steps", "-1"],
                                  ["exact", "mountain_race", "--delta", "0"], ["nonsense"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_task_one_line(capsys):
    assert cli.main(["show", "mountain_rce"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "did you mean 'mountain_race'" in err


def test_oracle_cli_does_not_import_torch():
    assert _run("-c", "import lmcoh.cli, sys; sys.exit('torch' in sys.modules)").returncode == 0
    code = ("import sys, io, contextlib; from lmcoh.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['exact', 'mountain_race', '--json']); main(['show', 'lottery'])\n"
            "sys.exit('torch' in sys.modules)")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr


# ---- language-model commands on foreign models -------------------------------------------------
@pytest.fixture(scope="module")
def foreign(tmp_path_factory, gpt2_tokenizer, llama_tokenizer):
    """Random stand-ins saved as plain Hugging Face directories (no lmcoh.json): {family: path}."""
    from conftest import random_standin

    out = {}
    for family, tok in (("gpt2", gpt2_tokenizer), ("llama", llama_tokenizer)):
        path = tmp_path_factory.mktemp(family)
        lm = random_standin(family, tok, seed=3)
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        out[family] = str(path)
    return out


def test_evaluate_zero_shot_against_the_models_own_prior(foreign, capsys):
    assert cli.main(["evaluate", foreign["llama"], "--task", "mountain_race", "--format", "chat",
                     "--goal-text", "Reach the gold.", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reference"] == "model" and set(out["reference_policy"]) == set(out["policy"])  # foreign: model
    assert out["format"] == "chat" and len(out["tv_to_retrain"]) == 5
    assert cli.main(["evaluate", foreign["gpt2"], "--task", "mountain_race", "--format", "natural",
                     "--reference", "task"]) == 0
    text = capsys.readouterr().out
    assert "natural format" in text and "TV to G^k(p, the task's prior)" in text


def test_sample_writes_the_text_in_its_format(foreign, tmp_path, capsys):
    out = tmp_path / "episodes.jsonl"
    assert cli.main(["sample", foreign["llama"], "--task", "mountain_race", "--format", "natural", "-n", "3",
                     "--goal", "none", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and all(x["text"].startswith("Step 1 (start).") for x in lines)


@pytest.mark.parametrize("argv, message", [
    (["--format", "chat"], "has none; use --format compact or natural"),
    (["--goal", "none", "--goal-text", "Win."], "--goal-text states the success goal"),
    (["--goal-text", "<win>"], "goal text must be one line"),
])
def test_bad_layouts_fail_in_one_line(argv, message, foreign, capsys):
    assert cli.main(["evaluate", foreign["gpt2"], "--task", "mountain_race", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error: ") and message in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", foreign["gpt2"], "--task", "mountain_race", "--format", "prose"])
