"""Every section of `python -m lmcoh.bench` runs, at a tiny size (the real sizes are for measuring)."""

import json

from lmcoh import bench


def test_exact_section():
    out = bench.bench_exact(depths=(2, 3), steps=1)
    assert [r["states"] for r in out["rows"]] == [1 + 4 + 16, 1 + 4 + 16 + 64]
    assert out["rows"][1]["growth_vs_previous"] > 0


def test_lm_section():
    out = bench.bench_lm(tab_task="random-tree:T=2,A=2", roll_task="random-tree:T=2,A=2", naive_histories=3,
                         episodes=8, naive_episodes=2, pretrain_task=None)
    assert out["tabulate"]["histories"] == 1 + 2 and out["tabulate"]["speedup"] > 0
    assert out["rollout"]["episodes"] == 8 and out["rollout"]["speedup"] > 0


def test_selftrain_section():
    out = bench.bench_selftrain(rounds=1, extra=("--episodes_per_round", "16", "--num_train_epochs", "1"),
                                processes=(1,))
    assert out["episodes_per_round"] == 16 and out["processes"][1]["train_seconds"] > 0


def test_main_writes_json(tmp_path, monkeypatch, capsys):
    def tiny():
        """The exact section at depth 2."""
        return bench.bench_exact(depths=(2,), steps=1)

    monkeypatch.setattr(bench, "SECTIONS", {"exact": tiny})
    assert bench.main(["--exact", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["exact"]["rows"][0]["states"] == 21
    def failing():
        """Not reached: the existing file is refused first."""
        raise AssertionError("measured before the refusal")

    monkeypatch.setattr(bench, "SECTIONS", {"exact": failing})
    assert bench.main(["--exact", "--json", str(tmp_path / "b.json")]) == 2
    assert "b.json already exists" in capsys.readouterr().err
    monkeypatch.setattr(bench, "SECTIONS", {"exact": tiny})
    assert bench.main(["--exact", "--json", str(tmp_path / "b.json"), "--overwrite"]) == 0


def test_base_section():
    out = bench.bench_base(steps=2, episodes=4, epochs=1, batch_size=4)
    assert [r["family"] for r in out["rows"]] == ["gpt2", "llama"]
    assert all(r["pretrain_seconds"] > 0 and 0 <= r["tv_success_to_g"] <= 1 for r in out["rows"])


def test_gguf_section(gpt2_tokenizer, tmp_path):
    from conftest import random_standin
    from lmcoh.lm.standins import save_gguf

    lm = random_standin("gpt2", gpt2_tokenizer)
    out = bench.bench_gguf(str(save_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf")))
    assert out["first_seconds"] > 0 and out["cached_seconds"] > 0 and out["speedup"] > 0
    assert bench.bench_gguf(str(tmp_path / "missing.gguf"))["skipped"]


def test_train_section(tmp_path, llama_tokenizer):
    from conftest import random_standin

    lm = random_standin("llama", llama_tokenizer)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    out = bench.bench_train(model=str(tmp_path / "model"), steps=2, batch_size=2, standin_steps=2, episodes=4,
                            max_steps=2)
    assert out["gemm_gflops"]["fp32"] > 0 and out["gemm_gflops"]["bf16"] > 0
    assert all(r["tokens_per_s"] > 0 and r["gflops"] > 0 for r in out["training"])
    assert [r["model"] for r in out["pretrain"]] == [str(tmp_path / "model"), "stand-in gpt2", "stand-in llama"]
    assert all(r["steps"] <= 2 and 0 <= r["tv_success_to_g"] <= 1 for r in out["pretrain"])
