"""The policy and its tokenizer: load and save (hub id or local folder), LoRA,
dtype/device, and the tiny from-scratch model of the CPU presets.

The tiny model is saved in plain Hugging Face format, so `AutoModelForCausalLM`
and `AutoTokenizer` (and vLLM) load it exactly like a 7B hub model. Its
tokenizer is character level, built so that every loader reads it the same way:

- It is written as a byte-level BPE, the format of the Qwen2 tokenizer. This
  is not a style choice: transformers 5 always loads a `model_type: qwen2`
  folder with `Qwen2Tokenizer`, which rebuilds a byte-level pre-tokenizer and
  decoder around the saved vocabulary and merges, so any other format (e.g. a
  plain character vocabulary) would lose spaces on reload.
- The vocabulary holds all 256 bytes (so any text, OOD included, tokenizes
  with no <unk>) plus one token per non-ASCII character seen in `texts`
  (merges only ever join the bytes of one character). Hence every ASCII
  character and every character of the training texts is exactly one token,
  and `encode(a) + encode(b) == encode(a + b)`: a demonstration appended to a
  prompt tokenizes the same as the two tokenized apart.
- <bos> is prepended by the tokenizer's post-processor (saved in
  tokenizer.json), so the first character of a prompt is predicted with
  context; `encoding.encode_prompt` also adds it for hub tokenizers that have a bos.

The tiny MLP is 3 × hidden wide, not the usual 4 ×: that is the ~0.86M-parameter
model of DESIGN §5 at hidden 128 and 4 layers (0.89M here, the 256-byte
vocabulary included); 4 × hidden would give ~1.08M.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import warnings
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from amft_cli.config import ModelConfig
from amft_cli.fsio import user_io

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in the tiny vocabulary
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_MAX_POSITIONS = 512
# Qwen2Tokenizer's pre-tokenizer regex; with no cross-character merges it only
# decides where words split, which cannot change the tokens, but matching it
# keeps tokenizer.json identical to what Qwen2Tokenizer rebuilds.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


class ModelError(ValueError):
    """A model path/device the user got wrong; printed as one line."""


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; otherwise any torch device string."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"model.device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device {spec!r}: no CUDA device available here (use cpu or auto)")
    return device


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS (CPU training).

    A training step frees and re-allocates the same activation buffers every
    step. By default glibc serves blocks from 128 KiB up with fresh mmap pages and
    trims its heap, so every step page-faults its memory in again: measured ~5 %
    of a tiny-math GRPO step's CPU time (all of its system time), more wall time
    on a loaded host. Blocks up to 32 MiB now come from a heap that is never
    trimmed; the process keeps its peak footprint. A no-op where libc is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling for this threshold on 64-bit


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied input/output embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# the tiny from-scratch model


def _byte_level(text: str) -> str:
    """`text` in the byte-level alphabet (each UTF-8 byte as one printable char)."""
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return "".join(piece for piece, _ in splitter.pre_tokenize_str(text))


def _char_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over all bytes plus every character of `texts`."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for ch in sorted(set("".join(texts))):
        pieces = _byte_level(ch)
        for end in range(2, len(pieces) + 1):  # ASCII is one byte: nothing to merge
            left, right, joined = pieces[:end - 1], pieces[end - 1], pieces[:end]
            if joined not in vocab:
                vocab[joined] = len(vocab)
                merges.append((left, right))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()  # joins with no separator: " " and "\n" round-trip
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
        add_bos_token=True, clean_up_tokenization_spaces=False, model_max_length=TINY_MAX_POSITIONS,
        padding_side="left")


def _tiny_config(mcfg: ModelConfig, tokenizer: PreTrainedTokenizerFast):
    if mcfg.arch not in ("qwen2", "llama"):
        raise ModelError(f"model.arch {mcfg.arch!r}: expected qwen2 or llama")
    if mcfg.hidden_size % mcfg.num_heads:
        raise ModelError(f"model.hidden_size {mcfg.hidden_size}: must be divisible by model.num_heads "
                         f"({mcfg.num_heads})")
    config_class = Qwen2Config if mcfg.arch == "qwen2" else LlamaConfig
    return config_class(
        vocab_size=len(tokenizer), hidden_size=mcfg.hidden_size, intermediate_size=3 * mcfg.hidden_size,
        num_hidden_layers=mcfg.num_layers, num_attention_heads=mcfg.num_heads,
        num_key_value_heads=mcfg.num_heads, max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_tiny_model(mcfg: ModelConfig, texts: Iterable[str], out_dir: Path, seed: int) -> Path:
    """Build, initialise (seeded) and save the tiny model + tokenizer to `out_dir`.

    Uses mcfg.arch, hidden_size, num_layers and num_heads; `texts` decide which
    non-ASCII characters get their own token. Returns `out_dir`.
    """
    tokenizer = _char_tokenizer(list(texts))
    config = _tiny_config(mcfg, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------
# loading and saving


def _looks_like_hub_id(path: str) -> bool:
    """'name' or 'org/name'; anything with more parts or a path prefix is a local path."""
    return not path.startswith((".", "/", "~")) and path.count("/") <= 1 and "\\" not in path


def _resolve_folder(path: str, local_copy: str = "") -> Path:
    """The local folder holding model.path: the folder itself, else (a hub id) the model
    `amft prepare` put in model.local_copy, else its HF cache snapshot.

    Never touches the network (local_files_only), so a missing model fails at once.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        if not _looks_like_hub_id(path):
            raise ModelError(f"model.path {path!r}: no such folder (tiny presets: run `amft prepare` first)")
        if local_copy and (Path(local_copy) / "config.json").is_file():
            return Path(local_copy)
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(path, local_files_only=True))
        except (OSError, ValueError):
            raise ModelError(
                f"model.path {path!r}: not a local folder and not in the Hugging Face cache"
                + (f" or {local_copy}/ (`amft prepare` with this preset puts it there)" if local_copy else
                   "; the model hub is unreachable from here — download it where you have network and pass "
                   "--set model.path=/path/to/folder")) from None
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ModelError(f"model.path {path!r}: not a Hugging Face model folder (no config.json)")
    with user_io(folder, "reading the model's weights"):
        check_weights(folder)
    return folder


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_weights(folder: Path) -> None:
    """The weight files of a model folder are there and complete. A full disk or a copy cut
    short damages a folder; transformers would then fail with an OSError or a SafetensorError."""
    names = WEIGHTS if (folder / "config.json").is_file() else ADAPTER_WEIGHTS
    found = [folder / name for name in names if (folder / name).is_file()]
    if not found:
        raise ModelError(f"{folder / names[0]}: missing (the folder has no weights): a damaged checkpoint or an "
                         "incomplete copy; use another checkpoint or model folder")
    files = found[:1]
    if files[0].name.endswith(".index.json"):
        try:
            files = [folder / shard for shard in sorted(set(json.loads(files[0].read_text())["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{files[0]}: not a valid weight index (no weight_map)") from None
    for file in files:
        if not file.is_file():
            raise ModelError(f"{file}: missing (listed in the weight index)")
        if file.suffix == ".safetensors":
            _check_safetensors(file)


def _check_safetensors(path: Path) -> None:
    """The file is as long as its header says: 8-byte header length, JSON header, tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:
            raise ModelError(f"{path}: not a safetensors file (its header is not JSON)") from None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + length + max(ends, default=0)
    if header is None or size < expected:
        described = f"the header describes {expected}" if header is not None else "its header is cut off"
        raise ModelError(f"{path}: truncated ({size} bytes, {described}): a damaged checkpoint or an "
                         "incomplete copy; use another checkpoint or model folder")


def _from_pretrained(path: str, mcfg: ModelConfig, device: torch.device):
    """The plain causal LM of model.path `path`, with name_or_path as the user wrote it
    (a LoRA adapter saved later records it as its base, not a cache snapshot)."""
    folder = _resolve_folder(path, mcfg.local_copy)
    kernel = {} if mcfg.attention == "auto" else {"attn_implementation": mcfg.attention}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[mcfg.dtype], device_map=device,
                                                     local_files_only=True, **kernel)
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package
        raise ModelError(f"model.attention {mcfg.attention!r}: {str(e).splitlines()[0]}") from None
    # a hub id stays a hub id, unless the weights came from local_copy (maybe a converted GGUF)
    in_cache = not Path(path).expanduser().is_dir() and folder != Path(mcfg.local_copy)
    model.name_or_path = path if in_cache else str(folder.expanduser().resolve())
    return model


def _load_weights(folder: Path, mcfg: ModelConfig, device: torch.device, trainable: bool):
    """The model in `folder`; a LoRA adapter folder loads its base model first."""
    if (folder / "config.json").is_file():
        model = _from_pretrained(mcfg.path, mcfg, device)
        return _add_lora(model, mcfg) if mcfg.lora_rank > 0 and trainable else model
    from peft import PeftModel
    base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = _from_pretrained(base_path, mcfg, device)
    with _quiet_peft():
        return PeftModel.from_pretrained(base, folder, is_trainable=trainable)


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 still asks transformers 5 a deprecated question on every wrap."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def _add_lora(model, mcfg: ModelConfig):
    """Wrap with fresh LoRA adapters on every linear layer of attention and MLP."""
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # all-linear skips lm_head
    with _quiet_peft():
        return get_peft_model(model, lora)


def load_policy(mcfg: ModelConfig, device: torch.device | None = None, trainable: bool = True):
    """(model, tokenizer) from mcfg.path: a local folder, a cached hub id, or a LoRA adapter
    folder written by `save_policy`.

    The tokenizer pads on the left (batched generation) and always has a pad
    token (eos when the model defines none). With mcfg.lora_rank > 0 and
    trainable, a plain model gets fresh LoRA adapters and only those train. trainable=True returns
    the model in train mode, trainable=False frozen in eval mode (evaluation,
    references).
    """
    device = device if device is not None else resolve_device(mcfg.device)
    if mcfg.dtype not in DTYPES:
        raise ModelError(f"model.dtype {mcfg.dtype!r}: expected {', '.join(DTYPES)}")
    folder = _resolve_folder(mcfg.path, mcfg.local_copy)
    model = _load_weights(folder, mcfg, device, trainable)

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"model.path {mcfg.path!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    if mcfg.chat_template:
        _stop_at_end_of_turn(model, tokenizer)

    if not trainable:
        model.requires_grad_(False)
        model.eval()
        return model, tokenizer
    if mcfg.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Non-reentrant checkpointing also works when only LoRA weights need grads.
        base.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    return model, tokenizer


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (ChatML: <|im_end|>), or None."""
    marker = "AMFT-REPLY-MARKER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    ids = tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"] if marker in text else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """Add the chat template's end-of-turn token to the generation config's eos ids (the sampler
    stops on each): a base model's eos (e.g. Qwen2.5-Math's <|endoftext|>) is not the turn's end."""
    if not tokenizer.chat_template:
        return
    end = end_of_turn_id(tokenizer)
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if end is not None and end not in eos:
        model.generation_config.eos_token_id = eos + [end]


def save_policy(model, tokenizer, out_dir: Path) -> None:
    """Save weights (safetensors) and tokenizer so `load_policy` can read `out_dir`.

    A peft (LoRA) model saves only its adapter (adapter_config.json names the
    base model); `load_policy` loads the base and applies it. To get one plain
    model folder instead, merge where the base is available:
        merged = model.merge_and_unload(); merged.save_pretrained(dir); tokenizer.save_pretrained(dir)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
