"""GGUF files as models (lmcoh.lm.gguf): converted once into the cache, damaged files in one line, every
command on a GPT-2 GGUF of our own; and the real SmolLM2-135M-Instruct from the package index."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conftest import random_standin, shared_model
from lmcoh.cli import BUDGET_SPENT, main
from lmcoh.errors import ModelError
from lmcoh.lm import gguf as lm_gguf
from lmcoh.lm.loading import load_model
from lmcoh.lm.scoring import action_logprobs
from lmcoh.lm.standins import save_gguf
from lmcoh.lm.text import Layout


def one_line_error(call, *parts):
    with pytest.raises(ModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(p in message for p in parts), message


def entries(cache: Path) -> list[Path]:
    """The converted models in ``cache`` (not the locks beside them)."""
    return [p for p in (cache / "gguf").iterdir() if not p.name.startswith(".")]


@pytest.fixture(scope="module")
def gpt2_gguf(gpt2_tokenizer, tmp_path_factory) -> str:
    """A random GPT-2 stand-in (byte-level BPE, no chat template) as a Q8_0 GGUF file, alone in its directory."""
    def build(path: Path):
        lm = random_standin("gpt2", gpt2_tokenizer, seed=3)
        path.mkdir()
        save_gguf(lm.model, lm.tokenizer, path / "gpt2-standin.Q8_0.gguf")

    return str(Path(shared_model(tmp_path_factory, "gpt2-gguf", build)) / "gpt2-standin.Q8_0.gguf")


def test_a_gguf_file_is_its_model_converted_once(gpt2_tokenizer, gpt2_gguf, mountain, tmp_path, monkeypatch):
    monkeypatch.setenv("LMCOH_CACHE", str(tmp_path / "cache"))
    original = random_standin("gpt2", gpt2_tokenizer, seed=3)
    loaded = load_model(gpt2_gguf, device="cpu")
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and loaded.model.config.tie_word_embeddings
    assert loaded.tokenizer.chat_template is None and loaded.path == gpt2_gguf
    text = "Return the list of the arguments, and a new one."
    assert loaded.tokenizer(text)["input_ids"] == gpt2_tokenizer(text)["input_ids"]

    # the weights are the file's, dequantised: Q8_0 matrices (GGUF's (out, in) of GPT-2's Conv1D), f32 norms
    block = original.model.transformer.h[1]
    q8 = gguf.GGMLQuantizationType.Q8_0
    want = gguf.dequantize(gguf.quantize(block.attn.c_attn.weight.detach().numpy().T.copy(), q8), q8).T
    got = loaded.model.transformer.h[1].attn.c_attn.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert torch.equal(loaded.model.transformer.h[1].ln_2.weight, block.ln_2.weight)
    histories = [([0], []), ([0, 1], [0]), ([0, 2], [1])]
    for a, b in zip(action_logprobs(loaded, mountain, histories, layout=Layout("natural")),
                    action_logprobs(original, mountain, histories, layout=Layout("natural"))):
        np.testing.assert_allclose(np.exp(a), np.exp(b), atol=0.01)  # Q8_0 rounding only

    # one cache entry, named by the content's hash; later loads (the directory, a renamed copy) read it
    (entry,) = entries(tmp_path / "cache")
    assert entry.name == lm_gguf.content_hash(Path(gpt2_gguf)) and (entry / "model.safetensors").is_file()
    shutil.copy(gpt2_gguf, tmp_path / "renamed.gguf")
    with monkeypatch.context() as patch:
        patch.setattr(lm_gguf, "convert", lambda *args: pytest.fail("converted again"))
        for ref in (gpt2_gguf, str(Path(gpt2_gguf).parent), str(tmp_path / "renamed.gguf")):
            assert torch.equal(load_model(ref, device="cpu").model.transformer.wte.weight,
                               loaded.model.transformer.wte.weight)
    assert len(entries(tmp_path / "cache")) == 1
    # a damaged entry is converted again (a new file: the loaded models' weights map the old one's pages)
    (entry / "model.safetensors").unlink()
    (entry / "model.safetensors").write_bytes(b"\0" * 8)
    assert torch.equal(load_model(gpt2_gguf, device="cpu").model.transformer.wte.weight,
                       loaded.model.transformer.wte.weight)


def test_bad_gguf_files_are_one_line_naming_them(gpt2_gguf, tmp_path, capsys, monkeypatch):
    data = Path(gpt2_gguf).read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[:len(data) // 2])
    (tmp_path / "header.gguf").write_bytes(data[:200])
    (tmp_path / "text.gguf").write_text("not a model\n")
    (tmp_path / "weights.txt").write_text("not a model\n")
    one_line_error(lambda: load_model(str(tmp_path / "truncated.gguf")), "truncated.gguf: truncated GGUF file")
    one_line_error(lambda: load_model(str(tmp_path / "header.gguf")), "header.gguf: cannot read its GGUF header")
    one_line_error(lambda: load_model(str(tmp_path / "text.gguf")), "text.gguf: not a GGUF file")
    one_line_error(lambda: load_model(str(tmp_path / "weights.txt")), "weights.txt: not a GGUF file")
    writer = gguf.GGUFWriter(str(tmp_path / "unknown.gguf"), "nonesuch")  # a sound file of an unknown family
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(lambda: load_model(str(tmp_path / "unknown.gguf")),
                   "unknown.gguf: cannot load this GGUF model with transformers")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gpt2_gguf, two / name)
    one_line_error(lambda: load_model(str(two)), "holds 2 GGUF files")
    with monkeypatch.context() as patch:
        patch.setenv("LMCOH_CACHE", str(tmp_path / "weights.txt"))  # a file: no cache can be made there
        one_line_error(lambda: load_model(gpt2_gguf), "cannot write the cache", "set LMCOH_CACHE")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "truncated.gguf"), "--task", "mountain_race"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmcoh: error: ") and "truncated.gguf" in err and "\n" not in err


def test_every_command_takes_a_gguf_file(gpt2_gguf, tmp_path, capsys):
    """evaluate, sample and show --policy model: on a base model's GGUF; chat, which it has no template
    for, is one line."""
    assert main(["evaluate", gpt2_gguf, "--task", "mountain_race", "--format", "natural", "--reference", "model",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "model" and result["format"] == "natural" and len(result["tv_to_retrain"]) == 5
    assert sum(result["policy"]["start"].values()) == pytest.approx(1.0)
    assert main(["evaluate", gpt2_gguf, "--task", "mountain_race", "--format", "chat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a tokenizer with a chat template" in err and "\n" not in err
    assert main(["sample", str(Path(gpt2_gguf).parent), "--task", "mountain_race", "--format", "natural",
                 "--episodes", "4", "--output_file", str(tmp_path / "episodes.jsonl")]) == 0
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 4
    assert main(["show", "mountain_race", "--policy", f"model:{gpt2_gguf}", "--plot", str(tmp_path / "g.svg")]) == 0
    assert (tmp_path / "g.svg").stat().st_size > 0


@pytest.mark.slow
def test_pretrain_conditions_a_gguf_base(gpt2_gguf, tmp_path, capsys):
    out = tmp_path / "conditioned"
    assert main(["pretrain", "--task", "mountain_race", "--base", gpt2_gguf, "--format", "natural",
                 "--pretrain_episodes", "8", "--max_steps", "2", "--output_dir", str(out),
                 "--disable_tqdm"]) == BUDGET_SPENT  # two steps do not condition it: the closest model is kept
    meta = json.loads((out / "lmcoh.json").read_text())
    assert meta["format"] == "natural" and meta["pretrain"]["base"] == gpt2_gguf
    assert main(["evaluate", str(out), "--task", "mountain_race", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reference"] == "task"


# ---- the real checkpoint ------------------------------------------------------------------------
def test_smollm2_from_the_package_index(smollm2_gguf, smollm2_dir):
    """The GGUF `make smollm2` fetches: a 134.5M-parameter Llama with a 49,152-token vocabulary and
    SmolLM2's chat template (which writes its own system prompt when none is given), that knows Paris."""
    loaded = load_model(smollm2_gguf, device="cpu")  # from the cache the fixture filled
    model, tok = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    source = json.loads((smollm2_dir / "lmcoh.json").read_text())["gguf"]
    assert source["sha256"] == lm_gguf.content_hash(Path(smollm2_gguf)) == smollm2_dir.name
    asked = [{"role": "user", "content": "What is the capital of France?"}]
    assert "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(asked, tokenize=False)
    ids = tok.apply_chat_template(asked, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        reply = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(reply[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == \
        "The capital of France is Paris."


def test_smollm2_zero_shot_coherence_on_the_mountain_race(smollm2_gguf, capsys):
    """`lmcoh evaluate SmolLM2.gguf --task mountain_race --format chat --goal-text ... --reference model`:
    stating the goal makes the model worse at the ridge, the state that decides the race: up with 0.51,
    where its own policy takes up with 0.77 and exact conditioning of that policy, G(p_M), with 1."""
    assert main(["evaluate", smollm2_gguf, "--task", "mountain_race", "--format", "chat", "--goal_text",
                 "Reach the gold.", "--reference", "model", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["policy"]["ridge"]["up"] == pytest.approx(0.5114, abs=2e-3)
    assert result["reference_policy"]["ridge"]["up"] == pytest.approx(0.7724, abs=2e-3)
    assert result["tv_to_retrain"][1] == pytest.approx(0.2411, abs=2e-3)
    assert result["incoherence"] == "inf" and result["exact"]
