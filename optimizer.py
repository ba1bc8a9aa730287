"""The optimizer: AdamW, and for bf16 weights a variant that does not lose updates smaller than bf16's spacing.

A bf16 weight has 8 significant bits, so w + dw rounds back to w whenever |dw| < |w| / 512: at lr 1e-6
AdamW's steps (about lr in size) are lost on almost every weight. Three ways to keep them:
    float32 weights            exact; 16 bytes a parameter with AdamW (plus autocast for bf16 speed)
    bf16 + Kahan compensation  w_bf16 + c_bf16 carries about 16 significant bits; 10 bytes a parameter
    bf16 + stochastic rounding E[round(w + dw)] = w + dw; noisier, 8 bytes a parameter
BF16AdamW does the last two (moments kept in bf16 as well); settings.py's presets say which fits where.

Left out: weight decay schedules, 8-bit moments, CPU offload of optimizer state.
"""
import torch


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
