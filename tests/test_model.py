import json

import numpy as np
import pytest
import torch
from peft import LoraConfig

from conftest import tiny_gpt2
from lmcoh.tasks.generators import generate
from lmcoh.lm.adapters import add_lora
from lmcoh.lm.builtin import build_tokenizer, new_llama
from lmcoh.lm.loading import META_FILE, LoadedModel, ModelError, check_saved_model, check_task_fits, load_model, save_model
from lmcoh.lm.scoring import action_logprobs
from lmcoh.lm.text import Writer


def one_line_error(call, match):
    with pytest.raises(ModelError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def logits(model, tokenizer, text):
    """The model's logits for ``text``, on the CPU (the model may sit on a GPU)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt").to(device)).logits.cpu()


def test_word_tokenizer_writes_every_chunk(mountain):
    tok = build_tokenizer(mountain)
    w = Writer(mountain)
    ids = tok(w.episode("success", [0, 1], [0, 2]))["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[:3]) == ["<bos>", "[start]", "You"]
    # A prompt and its continuation tokenise apart exactly as together (chunks start with a space).
    head = w.prompt("success", [0], [])
    assert tok.convert_ids_to_tokens(tok(head)["input_ids"][-2:]) == ["race.", "<success>"]
    assert tok(head)["input_ids"] + tok(w.action(0), add_special_tokens=False)["input_ids"] \
        == tok(head + w.action(0))["input_ids"]
    assert tok.pad_token and tok.eos_token and tok.unk_token


def test_new_llama_is_seeded(mountain):
    tok = build_tokenizer(mountain)
    a, b, c = new_llama(tok, seed=0), new_llama(tok, seed=0), new_llama(tok, seed=1)
    assert a.config.vocab_size == len(tok)
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_load_round_trip(mountain, tmp_path, umask_002):
    tok = build_tokenizer(mountain)
    model = new_llama(tok, hidden_size=32, num_heads=2).eval()
    out = save_model(model, tok, tmp_path / "m", {"kind": "test"})
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # the user's umask, not mkdtemp's 0700 and safetensors' 0600: others on the machine can read the model
    assert out.stat().st_mode & 0o777 == 0o775 and (out / "model.safetensors").stat().st_mode & 0o777 == 0o664
    assert json.loads((out / META_FILE).read_text())["kind"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind
    loaded = load_model(str(out), device="cpu")
    assert loaded.meta["kind"] == "test" and loaded.meta["text_format"] == 2
    text = Writer(mountain).prompt("success", [0], [])
    assert torch.allclose(logits(model, tok, text), logits(loaded.model, loaded.tokenizer, text))
    save_model(model, tok, out, {"kind": "again"})  # replacing a model directory is fine
    assert load_model(str(out)).meta["kind"] == "again"


def test_save_refuses_to_replace_other_directories(mountain, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    tok = build_tokenizer(mountain)
    one_line_error(lambda: save_model(new_llama(tok, hidden_size=32, num_heads=2), tok, tmp_path, {}),
                   "refusing to overwrite")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_load_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(lambda: load_model(str(tmp_path / "missing")), "no such model directory")
    (tmp_path / "junk.txt").write_text("x")
    one_line_error(lambda: load_model(str(tmp_path)), "not a model directory")
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(lambda: load_model(str(tmp_path)), r"no model weights \(\*.safetensors\)")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    one_line_error(lambda: load_model(str(tmp_path)), "cannot load model")
    one_line_error(lambda: load_model("some-org/some-model"), "not in the local Hugging Face cache")


def test_pickle_weights_are_refused(mountain, tmp_path):
    """Unpickling can run code: a model or adapter directory holding only .bin weights is refused."""
    tok = build_tokenizer(mountain)
    model = new_llama(tok, hidden_size=32, num_heads=2)
    model.config.save_pretrained(tmp_path / "pickled")  # a checkpoint of the pickle era
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    tok.save_pretrained(tmp_path / "pickled")
    one_line_error(lambda: load_model(str(tmp_path / "pickled")), "refusing to load model weights stored as pickle")
    save_model(model, tok, tmp_path / "base", {})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    torch.save({}, adapter / "adapter_model.bin")
    one_line_error(lambda: load_model(str(tmp_path / "base"), adapter=str(adapter)),
                   "refusing to load adapter weights stored as pickle")


def test_check_saved_model_finds_damage(mountain, tmp_path):
    tok = build_tokenizer(mountain)
    save_model(new_llama(tok, hidden_size=32, num_heads=2), tok, tmp_path / "m", {})
    check_saved_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write
    with pytest.raises(ModelError, match="model.safetensors: damaged"):
        check_saved_model(tmp_path / "m")
    with pytest.raises(ModelError, match="damaged or missing"):
        check_saved_model(tmp_path / "nothing")


def test_adapters_load_on_their_base_only(mountain, tmp_path):
    tok = build_tokenizer(mountain)
    save_model(new_llama(tok, hidden_size=32, num_heads=2, seed=0), tok, tmp_path / "base", {"kind": "prior"})
    save_model(new_llama(tok, hidden_size=32, num_heads=2, seed=1), tok, tmp_path / "other", {})
    base = load_model(str(tmp_path / "base"))
    lora = add_lora(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert 0 < sum(p.numel() for p in lora.parameters() if p.requires_grad) < 0.5 * sum(
        p.numel() for p in lora.parameters())
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter changes the output
    save_model(lora, tok, tmp_path / "adapter", {"kind": "round"})
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    loaded = load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
    assert loaded.meta["kind"] == "prior" and loaded.meta["adapter"]["kind"] == "round"
    text = Writer(mountain).prompt("success", [0], [])
    assert torch.allclose(logits(lora, tok, text), logits(loaded.model, tok, text), atol=1e-5)
    one_line_error(lambda: load_model(str(tmp_path / "other"), adapter=str(tmp_path / "adapter")),
                   "another base model")
    one_line_error(lambda: load_model(str(tmp_path / "base"), adapter=str(tmp_path / "other")),
                   "not a LoRA adapter directory")
    one_line_error(lambda: load_model(str(tmp_path / "adapter")), "pass it as --adapter")


def test_check_task_fits(mountain):
    loaded = LoadedModel(None, build_tokenizer(mountain))
    check_task_fits(loaded, mountain)
    one_line_error(lambda: check_task_fits(loaded, generate("random-tree:T=2,A=2")), "cannot write")


def test_foreign_gpt2_with_bpe_tokenizer(mountain, tmp_path):
    built = tiny_gpt2(mountain)
    built.tokenizer.pad_token = None  # like GPT-2's own tokenizer: no pad token
    built.model.save_pretrained(tmp_path / "gpt2")
    built.tokenizer.save_pretrained(tmp_path / "gpt2")
    loaded = load_model(str(tmp_path / "gpt2"), device="cpu")
    assert loaded.meta == {} and loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    check_task_fits(loaded, mountain)
    chunk = loaded.tokenizer(Writer(mountain).action(1), add_special_tokens=False)["input_ids"]
    assert len(chunk) >= 2  # actions are several BPE tokens
    states = [int(s) for layer in mountain.layers for s in layer.states]
    histories = [([0], [])] + [([0, s], [0]) for s in states[1:]]
    for s, logp in zip(states, action_logprobs(loaded, mountain, histories)):
        assert len(logp) == len(mountain.actions_of(s))
        assert np.exp(logp).sum() == pytest.approx(1.0)


@pytest.mark.slow  # a fresh interpreter: the hub cache location is read when huggingface_hub is imported
def test_hub_id_from_the_local_cache_offline(tmp_path, llama_tokenizer):
    """A hub id resolves through a local cache laid out like the hub's (HF_HUB_OFFLINE=1): the path a
    GPU user's `--base HuggingFaceTB/SmolLM2-135M-Instruct` takes, without a network."""
    import subprocess
    import sys

    from conftest import ROOT, random_standin, recipe_env

    repo = tmp_path / "hub" / "models--lmcoh-test--tiny-chat"
    snapshot = repo / "snapshots" / ("0" * 40)
    lm = random_standin("llama", llama_tokenizer)
    lm.model.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**recipe_env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import sys; from lmcoh.cli import main; task = ['--task', 'mountain_race']\n"
            "found = main(['evaluate', 'lmcoh-test/tiny-chat', *task, '--format', 'chat', '--json'])\n"
            "missing = main(['evaluate', 'lmcoh-test/elsewhere', *task])\n"
            "sys.exit(10 * found + missing)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 2, run.stderr  # found: 0, missing: 2
    assert json.loads(run.stdout)["reference"] == "model"
    assert "lmcoh-test/elsewhere: not a local model directory, and not in the local Hugging Face cache (offline)" \
        in run.stderr
