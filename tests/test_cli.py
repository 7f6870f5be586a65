"""The oracle-only command line: `lmcoh tasks`, `show`, `exact`; errors; no torch import."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmcoh import cli
from lmcoh.errors import LmcohError
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
    # kappa(p) is inf (the ridge's chasm); its finite part is the start's KL(uniform || (2/5, 3/5)) = 0.020411
    assert retrain[0].split()[4:6] == ["finite", "part"]
    assert retrain[1].split()[1:5] == ["0.625000", "-inf", "inf", "0.020411"]


def test_exact_json_has_the_finite_part_of_incoherence(capsys):
    assert cli.main(["exact", "mountain_race", "--steps", "1", "--json", "--no_policies"]) == 0
    first = json.loads(capsys.readouterr().out)["sequences"]["retrain"][0]
    assert first["incoherence"] == "inf"
    assert first["incoherence_finite_part"] == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6))


def test_a_random_start_over_deterministic_moves_is_deterministic(capsys):
    """gym:Taxi-v4 starts at random but every move is deterministic: it is labelled so, and its
    optimal success is a probability (the rounding once gave 1.0000000000000002)."""
    assert cli.main(["exact", "gym:Taxi-v4", "--steps", "1", "--json", "--no_policies"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["deterministic"] is True and result["optimal_success"] == 1.0
    assert cli.main(["show", "gym:Taxi-v4", "--limit", "0"]) == 0
    assert "deterministic dynamics, random start" in capsys.readouterr().out


def test_python_m_lmcoh_and_bad_spec():
    proc = _run("-m", "lmcoh", "exact", "random-tree:T=3,Q=2")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "lmcoh: error: random-tree:T=3,Q=2: unknown parameter 'Q'; known: T, A, seed, stochastic, prior"


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND (see lmcoh --help)"),
    (["exact"], "the following arguments are required: --task (see lmcoh exact --help)"),
    (["exact", "mountain_race", "--steps", "-1"], "argument --steps: must be an integer >= 0, got -1 (see lmcoh exact"),
    (["exact", "mountain_race", "--steps", "x"], "argument --steps: must be an integer >= 0, got 'x' (see"),
    (["exact", "mountain_race", "--delta", "0"], "argument --delta: must be a positive number, got 0 (see"),
    (["exact", "mountain_race", "--stesp", "3"], "unknown flag --stesp; did you mean --steps? (see lmcoh exact --help)"),
    (["exact", "mountain_race", "--json", "maybe"], "unexpected argument 'maybe' (see lmcoh exact --help)"),
    (["exact", "mountain_race", "--json=maybe"], "argument --json: expected true or false, got 'maybe'"),
    (["exatc", "mountain_race"], "invalid choice 'exatc' (choose from tasks, show, exact, study, pretrain, evaluate, "
                                 "sample, card); did you mean exact? (see lmcoh --help)"),
    (["evaluate", "m", "--task", "mountain_race", "--format", "prose"], "argument --format: invalid choice 'prose'"),
    (["pretrain", "mountain_race", "--out", "x", "--learning-rate", "fast"], "argument --learning_rate: must be a "
                                                                             "positive number, got 'fast'"),
    (["sample", "m", "--task", "mountain_race", "--output_file", "x.jsonl"], "required: --episodes"),
])
def test_usage_errors_are_one_line_with_the_hint(argv, message, capsys):
    """The README's promise: one line `lmcoh: error: ...` (here: plus where the help is), exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("lmcoh: error: "), err
    assert message in err and err.rstrip().endswith("--help)"), err


def test_exit_statuses(monkeypatch, capsys):
    """0 done, 2 an input error, 130 Ctrl-C, and the status an error class names (one line each)."""
    assert cli.main(["exact", "mountain_race", "--steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["exact", "no_such_task"]) == 2

    class OutOfBudget(LmcohError):
        exit_status = 3

    def raising(error):
        def handler(args):
            raise error
        return handler

    for error, status, line in ((KeyboardInterrupt(), 130, "lmcoh: interrupted"),
                                (OutOfBudget("the check ran out of budget"), 3,
                                 "lmcoh: error: the check ran out of budget")):
        monkeypatch.setattr(cli, "_cmd_tasks", raising(error))
        capsys.readouterr()
        assert cli.main(["tasks"]) == status
        assert capsys.readouterr().err == line + "\n"


def test_version_is_the_packages_one(capsys):
    import lmcoh

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"lmcoh {lmcoh.__version__}\n"
    pyproject = (REPO / "pyproject.toml").read_text()  # the package metadata reads it from lmcoh.__version__
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "lmcoh.__version__"}' in pyproject
    assert "\nversion =" not in pyproject.split("[project]")[1].split("\n[")[0]


# Every spelling that worked before the flags took one language: (old argv, the new one).
OLD_SPELLINGS = [
    (["exact", "mountain_race", "--no-policies", "--json"], ["exact", "--task", "mountain_race", "--no_policies",
                                                            "--json"]),
    (["--memory-limit", "3", "show", "lottery"], ["show", "--task", "lottery", "--memory_limit_gb", "3"]),
    (["study", "--out", "o"], ["study", "--output_dir", "o"]),
    (["pretrain", "mountain_race", "--out", "o", "--episodes", "5", "--epochs", "2", "--batch-size", "8",
      "--learning-rate", "0.1", "--model-size", "small", "--lora-r", "4", "--none-share", "0.2", "--goal-text", "Go.",
      "--quiet"],
     ["pretrain", "--task", "mountain_race", "--output_dir", "o", "--pretrain_episodes", "5", "--pretrain_epochs", "2",
      "--global_batch_size", "8", "--learning_rate", "0.1", "--model_size", "small", "--lora_r", "4",
      "--none_share", "0.2", "--goal_text", "Go.", "--disable_tqdm"]),
    (["evaluate", "m", "--task", "t", "--batch-size", "4", "--mc-episodes", "10", "--max-histories", "5",
      "--goal-text", "Go."],
     ["evaluate", "m", "--task", "t", "--sample_batch_size", "4", "--eval_episodes", "10", "--max_histories", "5",
      "--goal_text", "Go."]),
    (["sample", "m", "--task", "t", "-n", "3", "--out", "e.jsonl", "--batch-size", "2"],
     ["sample", "m", "--task", "t", "--episodes", "3", "--output_file", "e.jsonl", "--sample_batch_size", "2"]),
]


@pytest.mark.parametrize("old, new", OLD_SPELLINGS)
def test_every_old_spelling_keeps_working(old, new):
    parser = cli.build_parser()
    assert vars(parser.parse_args(old)) == vars(parser.parse_args(new))


def test_help_shows_one_spelling_per_flag():
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.option_strings == ["-h", "--help"]:
                continue
            shown, *aliases = action.option_strings
            assert shown.startswith("--") and "-" not in shown[2:], (name, shown)  # underscores, as TRL spells
            for alias in aliases:
                assert f"{alias} " not in text and f"{alias}," not in text, (name, alias)


def test_a_bare_boolean_never_takes_the_next_argument():
    parser = cli.build_parser()
    assert parser.parse_args(["exact", "--json", "mountain_race"]).task == "mountain_race"
    assert parser.parse_args(["exact", "mountain_race", "--json"]).json is True
    assert parser.parse_args(["exact", "mountain_race", "--json", "false"]).json is False
    assert parser.parse_args(["exact", "mountain_race", "--json=no", "--steps", "2"]).json is False


def test_the_cli_and_the_recipes_spell_a_concept_alike():
    """A setting both have is one flag with one meaning: the recipes' field, TRL's name where TRL has it."""
    from lmcoh.runs.arguments import make_parser

    recipe = {o for a in make_parser()._actions for o in a.option_strings}
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    shared = {"pretrain": ["--task", "--output_dir", "--overwrite", "--format", "--goal_text", "--seed",
                           "--learning_rate", "--global_batch_size", "--pretrain_episodes", "--pretrain_epochs",
                           "--lora_r", "--disable_tqdm", "--memory_limit_gb"],
              "evaluate": ["--task", "--prompt", "--format", "--goal_text", "--seed", "--sample_batch_size",
                           "--delta", "--max_histories", "--eval_episodes"],
              "sample": ["--task", "--prompt", "--format", "--goal_text", "--seed", "--sample_batch_size",
                         "--overwrite"],
              "study": ["--output_dir", "--overwrite", "--seed"], "exact": ["--task", "--delta"]}
    for command, flags in shared.items():
        own = {a.option_strings[0] for a in commands[command]._actions if a.option_strings}
        for flag in flags:
            assert flag in own and flag in recipe, (command, flag)


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
    argv = ["sample", foreign["llama"], "--task", "mountain_race", "--format", "natural", "--episodes", "3",
            "--goal", "none", "--output_file", str(out)]
    assert cli.main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and all(x["text"].startswith("Step 1 (start).") for x in lines)
    capsys.readouterr()
    assert cli.main(argv) == 2  # nothing is lost
    assert "already exists" in capsys.readouterr().err and out.read_text().count("\n") == 3
    assert cli.main([*argv[:6], "--episodes", "0", *argv[8:], "--overwrite"]) == 0  # a rate over no episodes
    assert "0 episodes, sampled success rate undefined (no episodes)" in capsys.readouterr().err
    assert out.read_text() == ""


def test_outputs_are_refused_before_any_work(tmp_path, capsys):
    """An existing output, or one under a file, is refused at once: before a model loads or a study runs."""
    (tmp_path / "F").write_text("a file")
    (tmp_path / "e.jsonl").write_text("{}\n")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text("{}")
    (tmp_path / "p.svg").write_text("<svg/>")
    cases = [
        (["sample", "no/such/model", "--task", "mountain_race", "--episodes", "1", "--output_file",
          str(tmp_path / "e.jsonl")], "e.jsonl already exists (3 bytes); pass --overwrite"),
        (["sample", "no/such/model", "--task", "mountain_race", "--episodes", "1", "--output_file",
          str(tmp_path / "F" / "e.jsonl")], f"{tmp_path / 'F'} is a file, not a directory"),
        (["study", "--output_dir", str(tmp_path / "F")], "--output_dir " + str(tmp_path / "F") + " is a file"),
        (["study", "--output_dir", str(tmp_path / "F" / "sub")], "is a file, not a directory"),
        (["study", "--output_dir", str(tmp_path / "study")], "already holds study.json; pass --overwrite"),
        (["show", "mountain_race", "--plot", str(tmp_path / "p.svg")], "p.svg already exists"),
    ]
    for argv, message in cases:
        t0 = time.perf_counter()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lmcoh: error: ") and err.count("\n") == 1 and message in err, (argv, err)
        assert time.perf_counter() - t0 < 2, argv  # the study did not run first
    assert (tmp_path / "e.jsonl").read_text() == "{}\n" and (tmp_path / "p.svg").read_text() == "<svg/>"


@pytest.mark.parametrize("argv, message", [
    (["--format", "chat"], "has none; use --format compact or natural"),
    (["--goal", "none", "--goal-text", "Win."], "--goal_text states the success goal"),
    (["--goal-text", "<win>"], "goal text must be one line"),
])
def test_bad_layouts_fail_in_one_line(argv, message, foreign, capsys):
    assert cli.main(["evaluate", foreign["gpt2"], "--task", "mountain_race", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error: ") and message in err and "\n" not in err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", foreign["gpt2"], "--task", "mountain_race", "--format", "prose"])


def test_a_format_the_model_cannot_write_names_the_ones_it_can(mountain, tmp_path, capsys):
    """The built-in model's word tokenizer has no chat template and no words for the natural format: the
    chat refusal suggests compact only (natural fails too)."""
    from conftest import tiny_llama
    from lmcoh.lm.loading import save_model

    lm = tiny_llama(mountain)
    model = save_model(lm.model, lm.tokenizer, tmp_path / "prior", {})
    for fmt in ("chat", "natural"):
        assert cli.main(["evaluate", str(model), "--task", "mountain_race", "--format", fmt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("; use --format compact") and "\n" not in err, err
