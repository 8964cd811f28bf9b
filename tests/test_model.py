"""Tests of amft_cli.model on tiny models only (no network, a few seconds)."""

import json
import platform
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amft_cli.config import ModelConfig
from amft_cli.encoding import encode_completion, encode_prompt
from amft_cli.model import ModelError, build_tiny_model, count_parameters, load_policy, resolve_device, save_policy

torch.set_num_threads(1)

TEXTS = ["12+3*4=24\n", "7*8=56 \\boxed{56}", "a × b ÷ c → d"]  # ×, ÷ (2 bytes) and → (3) are non-ASCII
HIDDEN, LAYERS, HEADS = 128, 4, 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(ModelConfig(path=str(out)), TEXTS, out, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def _batch(tokenizer):
    return tokenizer(["1+1=", "12*3+4=40 \\boxed{40}\n"], padding=True, return_tensors="pt")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------
# the tiny model


def test_auto_classes_and_load_policy_read_the_same_model(tiny_dir, tokenizer):
    auto_model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    policy, policy_tok = load_policy(ModelConfig(path=str(tiny_dir)), torch.device("cpu"))
    batch = _batch(tokenizer)
    assert torch.equal(batch["input_ids"], _batch(policy_tok)["input_ids"])
    assert torch.equal(_logits(auto_model, batch), _logits(policy, batch))
    # tied embeddings survive the save (safetensors stores the matrix once)
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert policy.config.use_cache and policy.training


def test_same_seed_same_weights_other_seed_differs(tiny_dir, tokenizer, tmp_path):
    again = build_tiny_model(ModelConfig(), TEXTS, tmp_path / "again", seed=0)
    other = build_tiny_model(ModelConfig(), TEXTS, tmp_path / "other", seed=1)
    batch = _batch(tokenizer)
    reference = _logits(AutoModelForCausalLM.from_pretrained(tiny_dir), batch)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(again), batch), reference)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(other), batch), reference)


def test_parameter_count_matches_hand_count(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    h, mlp, vocab = HIDDEN, 3 * HIDDEN, len(tokenizer)
    # q,k,v,o + q,k,v biases (Qwen2) + gate,up,down + 2 RMSNorms, per layer
    per_layer = 4 * h * h + 3 * h + 3 * h * mlp + 2 * h
    expected = LAYERS * per_layer + vocab * h + h  # + tied embedding + final norm
    assert vocab == 4 + 256 + 2 + 2  # specials, bytes, × and ÷, → and its 2-byte prefix
    assert count_parameters(model) == expected
    assert 700_000 <= expected <= 1_000_000


def test_llama_arch_builds_and_loads(tmp_path, tokenizer):
    out = build_tiny_model(ModelConfig(arch="llama"), TEXTS, tmp_path / "llama", seed=0)
    model, tok = load_policy(ModelConfig(path=str(out)), torch.device("cpu"))
    assert model.config.model_type == "llama"
    assert model.model.layers[0].self_attn.q_proj.bias is None  # llama: no attention bias
    text = "3*4=12, x ÷ y\n"
    assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert torch.equal(_logits(model, _batch(tok)), _logits(AutoModelForCausalLM.from_pretrained(out), _batch(tok)))


def test_bad_tiny_shapes_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="model.arch"):
        build_tiny_model(ModelConfig(arch="gpt2"), TEXTS, tmp_path / "a", seed=0)
    with pytest.raises(ModelError, match="model.num_heads"):
        build_tiny_model(ModelConfig(hidden_size=130, num_heads=4), TEXTS, tmp_path / "b", seed=0)


# ---------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text", [
    "3*4=12,5+12=17 \\boxed{17}",
    "  two spaces\n\nnewlines\tand tab ",
    "{\"cards\": [\"J\", \"Q\"], \"formula\": \"(10+2)*2\"}",
    "a × b ÷ c → d",        # characters seen in TEXTS
    "é € 😀 ünseen",         # OOD: falls back to bytes, never <unk>
])
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_ascii_and_seen_characters_are_one_token_each(tokenizer):
    text = "12 + 3*4\n= ×÷→"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text)
    assert len(tokenizer("€", add_special_tokens=False)["input_ids"]) == 3  # unseen: its 3 UTF-8 bytes


def test_prompt_has_bos_completion_has_eos(tokenizer):
    prompt = encode_prompt(tokenizer, "7*8=", chat_template=False)
    completion = encode_completion(tokenizer, "56")
    assert prompt[0] == tokenizer.bos_token_id and prompt.count(tokenizer.bos_token_id) == 1
    assert len(prompt) == 1 + 4
    assert completion[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in completion
    assert tokenizer.decode(completion[:-1]) == "56"


@pytest.mark.parametrize("prompt,demo", [("7*8=", "56"), ("x ", " y\n"), ("a×", "÷b"), ("12", "34")])
def test_prompt_plus_completion_tokenizes_like_the_joined_text(tokenizer, prompt, demo):
    joined = encode_prompt(tokenizer, prompt, False) + encode_completion(tokenizer, demo)[:-1]
    assert joined == encode_prompt(tokenizer, prompt + demo, False)


def test_chat_template_wraps_prompt_once_with_bos(tokenizer):
    with pytest.raises(ModelError, match="chat template"):
        encode_prompt(tokenizer, "hi", chat_template=True)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}U:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    ids = encode_prompt(tok, "hi", chat_template=True)
    assert ids == [tok.bos_token_id] + tok("U:hi\nA:", add_special_tokens=False)["input_ids"]


def test_chat_prompt_from_the_data_keeps_its_system_message(tokenizer):
    messages = [{"role": "system", "content": "think"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ModelError, match="model.chat_template is false"):
        encode_prompt(tokenizer, messages, chat_template=False)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    ids = encode_prompt(tok, messages, chat_template=True)
    assert ids == [tok.bos_token_id] + tok("s:think\nu:hi\na:", add_special_tokens=False)["input_ids"]


def test_left_padding_of_a_batch(tiny_dir):
    _, tok = load_policy(ModelConfig(path=str(tiny_dir)), torch.device("cpu"), trainable=False)
    batch = tok(["1+1=", "12*3+4="], padding=True, return_tensors="pt")
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert batch["input_ids"][0].tolist()[:3] == [0, 0, 0]
    assert batch["input_ids"][0, 3] == tok.bos_token_id
    assert batch["attention_mask"].tolist() == [[0, 0, 0] + [1] * 5, [1] * 8]


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    out = build_tiny_model(ModelConfig(arch="llama"), TEXTS, tmp_path / "m", seed=0)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["pad_token"]
    config_file.write_text(json.dumps(config))
    model, tok = load_policy(ModelConfig(path=str(out)), torch.device("cpu"))
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id


# ---------------------------------------------------------------------------
# loading errors, devices


def test_unknown_hub_id_fails_fast_without_network(monkeypatch):
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ModelError, match=r"model.path 'amft-tests/no-such-model': not a local folder and not "
                                         r"in the Hugging Face cache.*--set model.path="):
        load_policy(ModelConfig(path="amft-tests/no-such-model"), torch.device("cpu"))
    assert attempts == []  # failed without touching the network


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match=r"not a Hugging Face model folder \(no config.json\)"):
        load_policy(ModelConfig(path=str(tmp_path)), torch.device("cpu"))
    with pytest.raises(ModelError, match="no such folder"):
        load_policy(ModelConfig(path=str(tmp_path / "data" / "tiny" / "model")), torch.device("cpu"))


def test_resolve_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="model.device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda:0")


# ---------------------------------------------------------------------------
# LoRA, frozen models


def test_lora_trains_only_adapters_and_round_trips(tiny_dir, tokenizer, tmp_path):
    rank = 4
    model, tok = load_policy(ModelConfig(path=str(tiny_dir), lora_rank=rank), torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    h, mlp = HIDDEN, 3 * HIDDEN
    # r·(in+out) per adapted linear: q,k,v,o (h→h), gate,up (h→mlp), down (mlp→h)
    per_layer = rank * (4 * 2 * h + 3 * (h + mlp))
    assert sum(p.numel() for p in trainable.values()) == LAYERS * per_layer

    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, p in trainable.items():
            if "lora_B" in name:
                p.add_(0.05)
    model.eval()
    batch = _batch(tokenizer)
    adapted = _logits(model, batch)
    assert not torch.allclose(adapted, _logits(AutoModelForCausalLM.from_pretrained(tiny_dir), batch))

    save_policy(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    reloaded, _ = load_policy(ModelConfig(path=str(tmp_path / "ckpt")), torch.device("cpu"), trainable=False)
    assert torch.allclose(_logits(reloaded, batch), adapted, atol=1e-6)
    assert not any(p.requires_grad for p in reloaded.parameters()) and not reloaded.training


def test_save_policy_of_full_model_reloads_identically(tiny_dir, tokenizer, tmp_path):
    model, tok = load_policy(ModelConfig(path=str(tiny_dir)), torch.device("cpu"))
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    save_policy(model, tok, tmp_path / "full")
    copy = tmp_path / "moved"
    shutil.move(tmp_path / "full", copy)  # a checkpoint folder is self-contained
    reloaded, _ = load_policy(ModelConfig(path=str(copy)), torch.device("cpu"))
    assert torch.equal(_logits(reloaded, _batch(tokenizer)), _logits(model, _batch(tokenizer)))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    # process-wide allocator setting: measured in a fresh interpreter, before and after the switch
    code = """
import resource
from amft_cli.model import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        block = bytearray(8 << 20)  # 8 MiB, zero-filled, freed at once: served by mmap by default
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
plain = faults()
keep_freed_memory()
faults()  # the first block after the switch faults its pages in once
print(plain, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    plain, kept = map(int, out.split())
    assert plain > 1000 and kept < 50


def test_attention_knob_picks_the_kernel_and_the_kernels_agree(tiny_dir):
    """model.attention reaches the model; eager and sdpa give the same logits on a left-padded
    batch and the same rollouts through the KV-cache sampler (the tiny presets run eager)."""
    from amft_cli.rollout import generate, row_uniforms

    loaded = {a: load_policy(ModelConfig(path=str(tiny_dir), attention=a), torch.device("cpu"), trainable=False)
              for a in ("eager", "sdpa")}
    assert {a: m.config._attn_implementation for a, (m, _) in loaded.items()} == {"eager": "eager", "sdpa": "sdpa"}
    tokenizer = loaded["eager"][1]
    batch = _batch(tokenizer)
    real = batch["attention_mask"].bool()
    eager, sdpa = (_logits(loaded[a][0], batch)[real] for a in ("eager", "sdpa"))
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-4)
    prompts = [encode_prompt(tokenizer, p, False) for p in ("1+1=", "12*3+4=")]
    out = {a: generate(m, tok, prompts, 3, max_new_tokens=6, uniforms=row_uniforms(0, 0, 6, 6))
           for a, (m, tok) in loaded.items()}
    assert out["eager"].completion_ids == out["sdpa"].completion_ids
    for e, s in zip(out["eager"].sampler_logprobs, out["sdpa"].sampler_logprobs):
        assert e == pytest.approx(s, abs=1e-4)


def test_bad_or_missing_attention_kernel_is_a_one_line_error(tiny_dir):
    from amft_cli.config import Config, ConfigError, validate

    cfg = Config()
    cfg.model.attention = "flash"
    with pytest.raises(ConfigError, match="model.attention: expected auto, sdpa, eager, flash_attention_2"):
        validate(cfg)
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ModelError, match=r"model.attention 'flash_attention_2': .*FlashAttention2"):
            load_policy(ModelConfig(path=str(tiny_dir), attention="flash_attention_2"), torch.device("cpu"))
