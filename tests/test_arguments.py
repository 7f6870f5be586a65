"""The recipes' settings: every field of every dataclass a recipe parses is honoured or refused in
one line before any work (the field walk), never a traceback; and the flag language."""

import dataclasses
import functools
import subprocess
import sys

import pytest
from trl import GRPOConfig

from conftest import ROOT, recipe_args, recipe_env, tiny_llama
from lmcoh.errors import LmcohError
from lmcoh.tasks import budget
from lmcoh.tasks.library import load_task

# Plausible non-default values for the fields whose type says too little (strings, lists,
# mappings): each entry is a list of cases, each case the flags it sets. Every other field is
# walked automatically: booleans flipped, numbers changed, every choice of a choice field.
PLAUSIBLE = {
    "task": [["--task", "lottery"]],
    "goal_text": [["--goal_text", "Win the lottery."]],
    "klrl_k": [["--klrl_k", "2", "3"]],
    "selftrain_dir": [["--selftrain_dir", "outputs/self_train/lottery"]],  # none there: refused
    "output_dir": [],  # each case writes to its own output_dir anyway
    "lr_scheduler_kwargs": [["--lr_scheduler_type", "cosine_with_restarts", "--lr_scheduler_kwargs", '{"num_cycles": 2}'],
                            ["--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}'],
                            ["--lr_scheduler_type", "warmup_stable_decay", "--lr_scheduler_kwargs",
                             '{"num_decay_steps": 2}']],
    "optim_args": [["--optim", "adamw_torch", "--optim_args", "foreach=False"]],
    "optim_target_modules": [["--optim", "galore_adamw", "--optim_target_modules", "attn"]],
    "activation_checkpointing_kwargs": [["--activation_checkpointing", "true", "--activation_checkpointing_kwargs",
                                         '{"use_reentrant": false}']],
    "gradient_checkpointing_kwargs": [["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs",
                                       '{"use_reentrant": false}']],
    "torch_compile_backend": [["--torch_compile_backend", "inductor"]],
    "torch_compile_mode": [["--torch_compile_mode", "reduce-overhead"]],
    "liger_kernel_config": [["--use_liger_kernel", "true", "--liger_kernel_config", '{"rope": true}']],
    "report_to": [["--report_to", "tensorboard"], ["--report_to", "all"], ["--report_to", "wandb"]],
    "run_name": [["--run_name", "first_try"]],
    "project": [["--project", "lmcoh"]],
    "trackio_space_id": [["--trackio_space_id", "me/trackio"]],
    "trackio_bucket_id": [["--trackio_bucket_id", "me/bucket"]],
    "trackio_static_space_id": [["--trackio_static_space_id", "me/static"]],
    "include_for_metrics": [["--include_for_metrics", "inputs"]],
    "hub_token": [["--hub_token", "hf_not_a_token"]],
    "hub_model_id": [["--hub_model_id", "me/policy"]],
    "hub_revision": [["--hub_revision", "dev"]],
    "metric_for_best_model": [["--metric_for_best_model", "loss"]],
    "accelerator_config": [["--accelerator_config", '{"split_batches": true}']],
    "parallelism_config": [["--parallelism_config", "dp_shard_size=2"]],
    "label_names": [["--label_names", "labels"]],
    "dataloader_prefetch_factor": [["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "4"]],
    "dataloader_persistent_workers": [["--dataloader_persistent_workers", "true"],
                                      ["--dataloader_num_workers", "2", "--dataloader_persistent_workers", "yes"]],
    "dataloader_multiprocessing_context": [["--dataloader_multiprocessing_context", "fork"],
                                           ["--dataloader_num_workers", "2", "--dataloader_multiprocessing_context",
                                            "spawn"]],
    "length_column_name": [["--train_sampling_strategy", "group_by_length", "--length_column_name", "size"]],
    "fsdp": [["--fsdp", "full_shard"]],
    "fsdp_config": [["--fsdp_config", '{"fsdp_version": 2}']],
    "deepspeed": [["--deepspeed", "recipes/accelerate_configs/deepspeed_zero2.yaml"]],
    "debug": [["--debug", "underflow_overflow"]],
    "resume_from_checkpoint": [["--resume_from_checkpoint", "outputs/checkpoint-10"]],
    "model_init_kwargs": [["--model_init_kwargs", '{"low_cpu_mem_usage": true}'],
                          ["--model_init_kwargs", '{"trust_remote_code": true}']],
    "chat_template_path": [["--chat_template_path", "template.jinja"]],
    "dataset_text_field": [["--dataset_text_field", "transcript"]],
    "dataset_kwargs": [["--dataset_kwargs", '{"skip_prepare_dataset": true}']],
    "eos_token": [["--eos_token", "<eoa>"]],
    "pad_to_multiple_of": [["--pad_to_multiple_of", "8"]],
    "pad_token": [["--pad_token", "<pad>"]],
    "model_name_or_path": [["--model_name_or_path", "{model}"]],
    "model_revision": [["--model_revision", "v1"]],
    "attn_implementation": [["--attn_implementation", "eager"], ["--attn_implementation", "sdpa"]],
    "lora_target_modules": [["--lora_target_modules", "q_proj", "v_proj"]],
    "lora_target_parameters": [["--lora_target_parameters", "mlp.down_proj.weight"]],
    "lora_modules_to_save": [["--lora_modules_to_save", "lm_head"]],
    "lora_task_type": [["--lora_task_type", "SEQ_CLS"]],
    "bnb_4bit_quant_storage": [["--load_in_4bit", "true", "--bnb_4bit_quant_storage", "uint8"]],
    # GRPOConfig's (recipes/kl_rl.py)
    "generation_kwargs": [["--generation_kwargs", '{"do_sample": true}']],
    "chat_template_kwargs": [["--chat_template_kwargs", '{"enable_thinking": false}']],
    "cache_implementation": [["--cache_implementation", "static"]],
    "vllm_mode": [["--vllm_mode", "server"]],
    "vllm_model_impl": [["--vllm_model_impl", "transformers"]],
    "vllm_structured_outputs_regex": [["--vllm_structured_outputs_regex", "up|down"]],
    "vllm_server_base_url": [["--vllm_server_base_url", "http://localhost:8000"]],
    "vllm_server_host": [["--vllm_server_host", "127.0.0.1"]],
    "vllm_importance_sampling_mode": [["--vllm_importance_sampling_mode", "token_truncate"]],
    "importance_sampling_level": [["--importance_sampling_level", "token"]],
    "multi_objective_aggregation": [["--multi_objective_aggregation", "normalize_then_sum"]],
    "scale_rewards": [["--scale_rewards", "group"], ["--scale_rewards", "batch"]],
    "log_completions_hub_repo": [["--log_completions_hub_repo", "me/completions"]],
    "transformers_continuous_batching_config": [["--transformers_continuous_batching_config", '{"max_batch_tokens": 64}']],
}

GRPO_PLAUSIBLE = {"loss_type": [["--loss_type", "dr_grpo"], ["--loss_type", "grpo"], ["--loss_type", "dapo"]]}


def _option(parser, name: str):
    """The action of flag ``--name`` (not the ``--no_name`` complement HfArgumentParser adds)."""
    return next(a for a in parser._actions if f"--{name}" in a.option_strings)


def walk(parser) -> list[tuple[str, list[str]]]:
    """``(field, flags)`` cases: every field of the parser's dataclasses set to plausible
    non-default values (`PLAUSIBLE`, else booleans flipped, numbers changed, every other choice)."""
    cases = []
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            plausible = {**PLAUSIBLE, **(GRPO_PLAUSIBLE if issubclass(dtype, GRPOConfig) else {})}
            if f.name in plausible:
                cases += [(f.name, argv) for argv in plausible[f.name]]
                continue
            action = _option(parser, f.name)
            flag, kind = f"--{f.name}", getattr(action.type, "__name__", "")
            if action.choices:
                cases += [(f.name, [flag, str(c)]) for c in action.choices if c != action.default]
            elif kind == "string_to_bool":
                cases.append((f.name, [flag, "false" if action.default else "true"]))
            elif kind == "int":
                cases.append((f.name, [flag, str(2 * action.default if (action.default or 0) > 0 else 3)]))
            elif kind == "float":
                cases.append((f.name, [flag, str(action.default / 2 if action.default else 0.5)]))
            else:
                raise AssertionError(f"field {f.name} ({f.type}): add its plausible values to PLAUSIBLE")
    return cases


def self_train_check(args) -> None:
    """What recipes/self_train.py checks before any work: its run object's constructor."""
    from lmcoh.runs.selftrain import SelfTraining

    SelfTraining(*args)


def comparison_check(args) -> None:
    """What recipes/temperature_vs_retraining.py checks before any work."""
    from lmcoh.runs.temperature import check_comparison
    from lmcoh.tasks.library import load_task  # looked up now: the walk reads each task file once

    check_comparison(args[0], args[1].output_dir, load_task(args[0].task))
    self_train_check(args)


def _parser(script_type: str):
    from lmcoh.runs import arguments

    return arguments.make_parser(getattr(arguments, script_type))


def kl_rl_check(args) -> None:
    """What recipes/kl_rl.py checks before any work: its run object's constructor."""
    from lmcoh.runs.klrl import KLRL

    KLRL(*args)


def _klrl_parser():
    from lmcoh.runs.klrl import make_klrl_parser

    return make_klrl_parser()


# Each recipe's parser and the checks it runs before any work: a recipe joins the walk with one line.
# The third entry: the recipe's own verdicts where they differ from `REFUSED` (None: honoured).
KL_RL_VERDICTS = {
    # KL-RL (lmcoh.runs.klrl.check_grpo): what would make GRPOTrainer's update no REINFORCE gradient of J_beta
    ("scale_rewards", "*"): "dividing advantages by the rewards' std", ("loss_type", "grpo"): "one over its length",
    ("loss_type", "dapo"): "one over its length", ("multi_objective_aggregation", "*"): "divides by the rewards' std",
    ("num_iterations", "*"): "more than one update per batch", ("steps_per_generation", "*"): "off-policy",
    ("temperature", "*"): "sampled from the policy itself",
    ("top_p", "*"): "the whole renormalised policy", ("top_k", "*"): "the whole renormalised policy",
    ("min_p", "*"): "the whole renormalised policy", ("repetition_penalty", "*"): "sampled from the policy itself",
    ("use_vllm", "*"): "sampled by lmcoh's rollouts", ("mask_truncated_completions", "*"): "not an end token",
    ("top_entropy_quantile", "*"): "drops actions from the loss", ("entropy_coef", "*"): "changes the objective",
    ("use_adaptive_entropy", "*"): "changes the objective", ("off_policy_mask_threshold", "*"): "drops episodes",
    ("delta", "*"): "clips the ratio", ("weight_decay", "*"): "pulls the policy towards p",
    ("sync_ref_model", "*"): "must stay the model the run starts from", ("disable_dropout", "*"): "without dropout",
    ("reward_weights", "*"): "one reward",
    **{(name, "*"): "GRPO's own generation never runs" for name in (
        "generation_kwargs", "chat_template_kwargs", "cache_implementation", "num_generations_eval",
        "ds3_gather_for_generation", "max_tool_calling_iterations", "use_transformers_paged",
        "use_transformers_continuous_batching", "transformers_continuous_batching_config", "vllm_mode",
        "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
        "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port",
        "vllm_gpu_memory_utilization", "vllm_max_model_length", "vllm_tensor_parallel_size",
        "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_clip_min", "vllm_importance_sampling_cap")},
    ("save_strategy", "*"): None,  # the run sets it (KLRL_OVERRIDES)
    ("auto_find_batch_size", "true"): "not supported by GRPO", ("eval_strategy", "*"): "eval",
    ("load_best_model_at_end", "true"): "requires the save and eval strategy to match",
    ("num_generations", "*"): "must be divisible", ("generation_batch_size", "*"): "must be divisible",
    ("log_completions_hub_repo", "*"): "log_completions_hub_repo", ("use_peft", "false"): "use_peft is required",
}
RECIPES = {"self_train": (lambda: _parser("SelfTrainArguments"), self_train_check, {}),
           "temperature_vs_retraining": (lambda: _parser("TemperatureArguments"), comparison_check, {}),
           "kl_rl": (_klrl_parser, kl_rl_check, KL_RL_VERDICTS)}


# The settings no run can honour, and the reason each refusal gives (lmcoh.runs.arguments.REFUSED, the
# checks beside it, TRL's and transformers' own); value "*": any value of the field. Besides these, only
# what this machine lacks (a package, a GPU) may be refused; every other case of the walk is honoured.
REFUSED = {
    ("lr_scheduler_type", "reduce_lr_on_plateau"): "requires an eval strategy",
    ("lr_scheduler_type", "greedy"): "requires an eval strategy",
    ("lr_scheduler_type", "cosine_with_min_lr"): "min_lr", ("lr_scheduler_type", "cosine_warmup_with_min_lr"): "min_lr",
    ("lr_scheduler_type", "warmup_stable_decay"): "num_decay_steps",
    ("ddp_backend", "*"): "is for a launch of several processes",
    ("selftrain_dir", "outputs/self_train/lottery"): "holds no complete self-training round",
    ("dataloader_persistent_workers", "true"): "needs worker processes",
    ("dataloader_multiprocessing_context", "fork"): "needs worker processes",
    ("fsdp", "full_shard"): "shards a model over the processes of a launch",
    ("dataset_text_field", "transcript"): "tokenised already", ("eos_token", "<eoa>"): "tokenised already",
    ("dataset_kwargs", '{"skip_prepare_dataset": true}'): "tokenised already", ("parallelism_config", "*"): "invalid Parallelism",
    ("eval_strategy", "steps"): "the Trainer has no eval dataset", ("eval_strategy", "epoch"): "no eval dataset",
    ("eval_on_start", "true"): "no eval dataset", ("do_eval", "true"): "evaluated exactly",
    ("do_predict", "true"): "there is no test set", ("packing", "true"): "packing would cut and merge them",
    ("push_to_hub", "true"): "never contacts a model hub", ("trust_remote_code", "true"): "never runs a model's own code",
    ("resume_from_checkpoint", "outputs/checkpoint-10"): "a run resumes by itself",
    ("save_strategy", "steps"): "each round saves its own model", ("save_strategy", "epoch"): "saves its own model",
    ("save_strategy", "best"): "saves its own model", ("assistant_only_loss", "true"): "falls on the actions' tokens only",
    ("chat_template_path", "template.jinja"): "the model's own chat template",
    ("lora_task_type", "SEQ_CLS"): "a policy is a causal language model",
    ("model_init_kwargs", '{"trust_remote_code": true}'): "never runs a model's own code",
    ("report_to", "wandb"): "needs its package installed",
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_setting_is_honoured_or_refused_in_one_line(recipe, tmp_path, monkeypatch, mountain):
    """The field walk: every field of the recipe's dataclasses (SelfTrainArguments, TRL's SFTConfig and
    ModelConfig, as lmcoh redeclares them) set to plausible non-default values; each case is accepted by
    the checks the recipe runs before any work, or refused there in one line (never a traceback)."""
    from lmcoh.lm.loading import save_model
    from lmcoh.runs.arguments import parse

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(budget.ENV, str(budget.limit_bytes() / 2 ** 30))  # memory_limit_gb sets it: undone after
    for module in ("lmcoh.runs.run", "lmcoh.tasks.library"):  # the same task file, read once
        monkeypatch.setattr(f"{module}.load_task", functools.lru_cache(load_task))
    make, check, own = RECIPES[recipe]
    parser = make()
    lm = tiny_llama(mountain)
    model = save_model(lm.model, lm.tokenizer, tmp_path / "model", {})
    verdicts = {}
    for i, (name, argv) in enumerate(walk(parser)):
        argv = [a.replace("{model}", str(model)) for a in argv]
        try:
            check(parse(parser, ["--task", "mountain_race", *argv, "--output_dir", str(tmp_path / f"run{i}")]))
            verdicts[name, argv[-1]] = "honoured"
        except LmcohError as err:
            assert "\n" not in str(err) and str(err), (name, argv)
            verdicts[name, argv[-1]] = str(err)
    for case, verdict in verdicts.items():
        why = _expected(own, case)
        if why is not None:
            assert why in verdict, (case, verdict)
        else:
            assert verdict == "honoured" or _lacking(verdict), (case, verdict)
    fields = {f.name for d in parser.dataclass_types for f in dataclasses.fields(d)}
    assert [case for table in (REFUSED, own) for case in table if case[1] != "*" and case not in verdicts
            and case[0] in fields and case[0] != "selftrain_dir" and _expected(own, case) == table[case]] == []


def _expected(own: dict, case: tuple[str, str]) -> str | None:
    """What refusal of ``case`` must say (None: it is honoured): the recipe's ``own`` verdict first."""
    for table in (own, REFUSED):
        for key in (case, (case[0], "*")):
            if key in table:
                return table[key]
    return None


def _lacking(message: str) -> bool:
    """Whether a refusal names something this machine lacks: a package, a GPU."""
    return any(word in message for word in ("install", "GPU", "failed to import", "distribution was not found"))


def test_a_recipe_ends_in_one_line_with_its_exit_status(capsys, monkeypatch):
    """run_recipe: an input error is one line and status 2 (or the error's own), Ctrl-C one line and 130."""
    from lmcoh.runs.arguments import make_parser, run_recipe

    class OutOfBudget(LmcohError):
        exit_status = 3

    monkeypatch.setattr(sys, "argv", ["self_train.py", "--rounds", "1"])
    for error, status, line in ((LmcohError("round 1: no episodes"), 2, "self_train: error: round 1: no episodes"),
                                (OutOfBudget("out of budget"), 3, "self_train: error: out of budget"),
                                (KeyboardInterrupt(), 130,
                                 "self_train: interrupted; run the same command again to resume")):
        def main(script_args, training_args, model_args):
            assert script_args.rounds == 1
            raise error

        with pytest.raises(SystemExit) as info:
            run_recipe("self_train", main, make_parser())
        assert info.value.code == status and capsys.readouterr().err == line + "\n"


def test_recipe_help_shows_one_spelling_per_flag():
    from lmcoh.runs.arguments import make_parser

    text = make_parser().format_help()
    assert "--learning_rate LEARNING_RATE" in text and "--learning-rate" not in text
    assert "--output_dir OUTPUT_DIR" in text and "--output-dir" not in text


@pytest.mark.slow
def test_ctrl_c_on_a_recipe_is_one_line_and_the_run_resumes(tmp_path):
    """SIGINT while the recipe pretrains its prior: status 130, one line, and the same command resumes."""
    import signal

    from lmcoh import faults

    argv = [sys.executable, str(ROOT / "recipes" / "self_train.py"), "--task", "mountain_race", "--rounds", "0",
            "--pretrain_episodes", "64", "--pretrain_epochs", "1", "--disable_tqdm", "true",
            "--output_dir", str(tmp_path / "run")]
    # Ctrl-C at the end of the pretraining's first step (one sent from outside could come after it ends)
    # SIGINT as a terminal delivers it, even when this suite runs in the background (which ignores it)
    stopped = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**recipe_env(), faults.ENV: "train:1@SIGINT"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert stopped.returncode == 130 and stopped.stdout.startswith("pretraining the built-in prior")
    assert stopped.stderr.strip() == "self_train: interrupted; run the same command again to resume"
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=recipe_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "rounds" / "0" / "metrics.json").is_file()


def test_a_run_directory_is_refused_under_a_file_and_replaced_only_if_it_is_a_run(tmp_path):
    from accelerate import PartialState

    from lmcoh.runs.directory import RunDirectory, resolved_config
    from lmcoh.runs.selftrain import SelfTraining

    (tmp_path / "F").write_text("a file")
    with pytest.raises(LmcohError, match=f"output_dir {tmp_path / 'F' / 'sub'}: {tmp_path / 'F'} is a file, not a"):
        SelfTraining(*recipe_args("--output_dir", tmp_path / "F" / "sub"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("keep me")
    config = resolved_config(*recipe_args("--output_dir", notes, "--overwrite"))
    with pytest.raises(LmcohError, match="holds no self-training run; choose another --output_dir "
                                         r"\(--overwrite replaces only an earlier run\)"):
        with RunDirectory(notes).opened(PartialState(cpu=True), config, overwrite=True):
            pass
    assert (notes / "keep.txt").read_text() == "keep me"
