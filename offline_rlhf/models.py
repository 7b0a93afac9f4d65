"""Model loading (policy, reward, reference), fingerprints and tiny models built from config.

Loading rules, whoever calls: local directories only (no hub), weights from safetensors
only (``use_safetensors=True``: a directory with only ``.bin`` pickles is refused),
``trust_remote_code`` off unless the caller asks. Optional bitsandbytes 4-bit (NF4) or
8-bit base weights and a LoRA adapter (peft) on top. bitsandbytes runs on CPU too,
so the quantized path is exercised by the CPU test suite.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, located

if TYPE_CHECKING:
    import torch

FINGERPRINT_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "adapter_config.json", "state.json")   # state: a training checkpoint's
# torch dtype names; torch itself is imported where a model loads, so that the path
# checks (and the CLI's early check of model paths) run without importing it
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


@dataclass
class LoraSpec:
    """LoRA adapter settings (see peft.LoraConfig)."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] = field(default_factory=list)


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# The weights files transformers and peft load from a directory (safetensors only).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
def free_memory() -> None:
    """Hand memory back between phases (a reference pass, a finished training run, a
    generation stage): collect Python garbage and, on CUDA, release the caching
    allocator's unused blocks so the next phase (or another process) can have them."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    """Refuse anything but a local directory with config.json and safetensors weights
    under the names that are loaded (another ``*.safetensors`` beside pickles is not)."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: {what} directory not found (only local directories are "
                         "loaded; download models ahead of the job)")
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise InputError(f"{path}: no config.json: not a transformers {what} directory")
    if not any((p / name).exists() for name in WEIGHTS_FILES):
        pickles = sorted(x.name for x in list(p.glob("*.bin")) + list(p.glob("*.pt")))
        if pickles:
            raise InputError(f"{path}: only pickle weights ({', '.join(pickles)}) for the {what}; "
                             "convert them to safetensors (pickles can run code and are never loaded)")
        others = sorted(x.name for x in p.glob("*.safetensors"))
        raise InputError(f"{path}: no {' or '.join(WEIGHTS_FILES[:2])} for the {what}"
                         + (f" (found only {', '.join(others)})" if others else ""))
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_dir(path: str | os.PathLike, what: str = "tokenizer") -> Path:
    """Refuse anything but a local directory with tokenizer files (no hub look-up)."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{path}: {what} directory not found (only local directories are "
                         "loaded; download models ahead of the job)")
    if not any((p / name).exists() for name in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): not a "
                         f"transformers {what} directory")
    return p


@contextlib.contextmanager
def refusing_remote_code(path):
    """transformers' refusal to run a model directory's own code, as one line."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise InputError(f"{path}: this model needs its own Python code to load (auto_map in "
                         "its config); refused: pass --trust-remote-code only for a directory "
                         "you trust") from None


def load_config(path, trust_remote_code: bool = False):
    """A model directory's transformers config (refusing custom code unless trusted)."""
    from transformers import AutoConfig
    with refusing_remote_code(path):
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def apply_chat_template(tokenizer, messages: list[dict], where: tuple = (), **kw) -> str:
    """Render chat messages with the tokenizer's template (text, not ids). A template
    that the sandbox refuses or that fails is one line; ``where`` is (file, row, column)."""
    from jinja2.exceptions import TemplateError
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except TemplateError as e:
        raise InputError(located(
            f"the chat template of {tokenizer.name_or_path} was refused ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0]}); fix chat_template.jinja or "
            "tokenizer_config.json", *where)) from None


# --------------------------------------------------------------------------- fingerprints

def _cache_file() -> Path:
    root = os.environ.get("OFFLINE_RLHF_CACHE") or Path.home() / ".cache" / "offline-rlhf"
    return Path(root) / "file-sha256.json"


def _file_sha256(path: Path, cache: dict) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        cache[key] = h.hexdigest()
    return cache[key]


def adapter_base(path: str | os.PathLike) -> Path | None:
    """The base model directory of a LoRA adapter directory (peft's ``adapter_config.json``
    ``base_model_name_or_path``); None for an ordinary model directory."""
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.exists() or (Path(path) / "config.json").exists():
        return None
    base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise InputError(f"{cfg_file}: base_model_name_or_path {base!r} is not a local model "
                         "directory (adapters load on top of a local base model only)")
    return Path(base)


def fingerprint(path: str | os.PathLike) -> str:
    """Content fingerprint of a model directory: sha256 over its weights, config and
    tokenizer files (names and contents), and for a LoRA adapter directory over its base
    model's fingerprint too. Independent of path and timestamps; file hashes are cached
    by (path, size, mtime) so large models are hashed once."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) + [p / n for n in FINGERPRINT_FILES if (p / n).exists()]
    base = adapter_base(p)
    base_fp = fingerprint(base) if base is not None else None
    if not files:
        raise InputError(f"{path}: nothing to fingerprint (no safetensors or config files)")
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    size = len(cache)
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode() + b"\0" + _file_sha256(f, cache).encode() + b"\n")
    if base_fp is not None:
        h.update(b"base\0" + base_fp.encode() + b"\n")
    if len(cache) != size:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # the cache is an optimisation only
    return h.hexdigest()


# --------------------------------------------------------------------------- loading

def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False,
                   padding_side: str = "left"):
    """The tokenizer of a local model directory (pad token = eos when it has none); warns
    once when the model config names a BOS token that the tokenizer does not add."""
    check_tokenizer_dir(path)
    from transformers import AutoTokenizer
    with refusing_remote_code(path):
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(f"{path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    _check_bos(path, tok)
    return tok


def _check_bos(path, tok) -> None:
    """A model trained with a BOS token but fed prompts without one can lose most of its
    accuracy, silently: say so (once per model directory)."""
    try:
        bos = json.loads((Path(path) / "config.json").read_text()).get("bos_token_id")
    except (OSError, ValueError):
        return
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    # a tokenizer without any BOS token (Qwen-style) is taken as deliberate
    if bos is None or tok.bos_token is None or bos in tok("x")["input_ids"][:1]:
        return
    from .console import warn_once
    warn_once(f"{path}: the model config names a BOS token (id {bos}) but the tokenizer does "
              "not add it: prompts are fed without it. If the model was trained with a BOS "
              "at the start, put it in the prompt text or fix the tokenizer's post-processor.")


def quantization_config(bits: int | None, compute_dtype=None):
    """A transformers ``BitsAndBytesConfig`` for 4-bit NF4 or 8-bit base weights."""
    if bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype or torch.float32)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InputError(f"quantization bits must be 4 or 8, not {bits}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype that ``dtype`` means on ``device`` (auto: bf16 on CUDA, else fp32)."""
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    import torch
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() \
            else torch.float32
    return getattr(torch, DTYPES[dtype])


def _load(auto_cls, path, *, dtype: str = "auto", bits: int | None = None,
          lora: LoraSpec | None = None, trust_remote_code: bool = False,
          device: str | None = None, train: bool = False, what: str = "model"):
    check_model_dir(path, what)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    qc = quantization_config(bits, torch_dtype)
    if qc is not None:
        kwargs.update(quantization_config=qc, device_map={"": device})
    with refusing_remote_code(path):
        model = auto_cls.from_pretrained(str(path), **kwargs)
    if qc is None:
        model.to(device)
    if lora is not None:
        model = apply_lora(model, lora, quantized=qc is not None, train=train)
    model.train(train)
    return model


def apply_lora(model, spec: LoraSpec, quantized: bool = False, train: bool = True):
    import peft
    if quantized and train:
        # activation checkpointing is switched on by the trainer (with the current API)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    task = "SEQ_CLS" if getattr(model.config, "num_labels", None) == 1 and \
        "SequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    cfg = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                          target_modules=spec.target_modules, task_type=task,
                          modules_to_save=spec.modules_to_save or None)
    with quiet_peft():
        return peft.get_peft_model(model, cfg)


@contextlib.contextmanager
def quiet_peft():
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` whenever it
    wraps a model, which warns on every LoRA run; the property is theirs, not ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def is_adapter_model(model) -> bool:
    """A peft model (LoRA / QLoRA), whose base weights are reachable with the adapter off."""
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def base_model(model):
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_adapter_model(model) else model


@contextlib.contextmanager
def adapter_disabled(model):
    """Run ``model`` as its base: a peft model with its adapter switched off (for QLoRA, the
    quantized base: the reference TRL uses too); any other model as it is."""
    if is_adapter_model(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


@contextlib.contextmanager
def frozen_forward(model):
    """Eval mode (no dropout) for a forward pass of a model that is, or will be, trained.

    bitsandbytes (0.50, on CPUs with AVX512-BF16) repacks a 4-bit layer's weights for
    inference on its first eval-mode CPU forward, for good, and the repacked layout has no
    backward pass: gradients through the frozen base would be lost silently afterwards.
    The 4-bit layers therefore stay in training mode, which changes nothing else in their
    forward (they have no dropout); so the pass computes exactly what training computes."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.train()
    try:
        yield model
    finally:
        model.train(was_training)


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant checkpoints), with the
    inputs' gradients switched on so that a frozen base passes gradients to LoRA weights.
    transformers 5 renamed ``gradient_checkpointing_enable`` (deprecated, warns) to
    ``activation_checkpointing_enable``; the old name is used only where the new is absent."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # also enables the inputs' gradients
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False


def load_policy(path, **kw):
    """The policy as a causal LM (optionally quantized, optionally with LoRA)."""
    from transformers import AutoModelForCausalLM
    return _load(AutoModelForCausalLM, path, what="policy", **kw)


def load_reference(path, **kw):
    """The reference model: a frozen causal LM in eval mode (``bits=4|8`` loads it
    quantized, like a QLoRA policy's base)."""
    model = load_policy(path, train=False, **kw)
    model.requires_grad_(False)
    return model


def check_reward_model(path, trust_remote_code: bool = False) -> None:
    """Refuse a reward-model directory that cannot give one scalar per sequence."""
    check_model_dir(path, "reward model")
    cfg = load_config(path, trust_remote_code)
    if cfg.num_labels != 1:
        raise InputError(f"{path}: reward model has {cfg.num_labels} labels; a scalar reward "
                         "model needs exactly one (config.json num_labels / id2label)")


def load_reward_model(path, **kw):
    """A sequence-classification reward model with exactly one label."""
    from transformers import AutoModelForSequenceClassification
    check_reward_model(path, kw.get("trust_remote_code", False))
    model = _load(AutoModelForSequenceClassification, path, what="reward model", **kw)
    if model.config.pad_token_id is None:
        raise InputError(f"{path}: reward model config has no pad_token_id, so the last "
                         "non-pad token cannot be found")
    return model
