"""Ghost clipping for sample-level DP-SGD (grad-sample mode "ghost"): the sum over a batch of each image's
clipped gradient, without ever holding one weight gradient per image for the large layers.

Why fedrad has its own: opacus 1.6's ghost clipping refuses a layer used twice per step, and fedrad's
per-sample objectives (SimSiam, BYOL) run every layer once per view. Here all calls of a layer in one step
are one layer: image i's weight gradient is sum_c g_ic a_ic^T over the calls c (g: the output gradient,
a: the input, per position), so its squared norm is sum_{t,s} (a_t . a_s)(g_t . g_s) over the positions of
all calls (the Gram form), or the explicit per-image gradient where that is cheaper (opacus's choice:
positions^2 against d_in * d_out). GroupNorm's per-image gradients are C floats and are computed explicitly.

Clipping is flat over all layers, exactly what opacus's DPOptimizer computes: factor_i = min(1, C / (||g_i||
+ 1e-6)). The clipped sum sum_i factor_i g_i of each layer is then one batch weight gradient with the
output gradients scaled by factor_i; noise and the 1/expected-batch scaling stay opacus's
(DPOptimizerFastGradientClipping, see client/training/sample_dp.py).

While a step is recorded, the parameters do not require grad (the input images do), so autograd's backward
computes input gradients only and no batch weight gradient that would be thrown away. Every gradient the
optimizer sees therefore comes from here: a parameter this module cannot clip is refused at construction,
never left to autograd.

Conventions: the loss is the mean over the batch of per-image losses (opacus's loss_reduction="mean"; the
per-image gradient is batch size x the output gradient), image i is row i of every call, and in-place ops
do not modify a hooked layer's output (the trainer runs under `fedrad.common.norms.opacus_safe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

CLIP_EPS = 1e-6  # opacus DPOptimizer.clip_and_accumulate: max_grad_norm / (norm + 1e-6)


@dataclass
class _Call:
    """One forward call of a layer in the recorded step: its input and, after backward, its output gradient."""

    inputs: torch.Tensor
    grad: torch.Tensor | None = None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    trained: dict[str, torch.Tensor]  # "weight" / "bias" -> the parameter, where the optimizer trains it
    calls: list[_Call] = field(default_factory=list)


def _check_layer(name: str, module: nn.Module) -> None:
    """ValueError unless ghost clipping computes this layer's per-image gradients exactly."""
    from torch import nn

    what = f"layer '{name}' ({type(module).__name__})"
    if type(module) not in (nn.Conv2d, nn.Linear, nn.GroupNorm):
        raise ValueError(f"grad-sample mode 'ghost' has no per-image gradient for {what}; it clips Conv2d, "
                         "Linear and GroupNorm only (use grad-sample mode 'hooks')")
    own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if not own <= {"weight", "bias"}:
        raise ValueError(f"grad-sample mode 'ghost': {what} has parameters {sorted(own)}")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"grad-sample mode 'ghost' clips plain Conv2d only (groups=1, zero padding given "
                             f"as numbers); {what} has groups={module.groups}, padding={module.padding!r}, "
                             f"padding_mode={module.padding_mode!r}")


class GhostClipping:
    """Forward hooks on every layer with trainable parameters of `model`; between `begin` and `clipped_sum`
    they record each call's input and output gradient, from which `clipped_sum` returns the batch's summed
    clipped gradient per parameter. `params` are the parameters the optimizer updates: each must belong to a
    supported layer (ValueError otherwise, so none is ever updated with an unclipped gradient)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor]) -> None:
        self.layers: list[_Layer] = []
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            _check_layer(name, module)
            for p in own.values():
                if id(p) in owner:
                    raise ValueError(f"grad-sample mode 'ghost': a parameter of layer '{name}' is also "
                                     f"layer '{owner[id(p)]}''s (tied weights are not supported)")
                owner[id(p)] = name
            self.layers.append(_Layer(name, module, own))
        names = {id(p): n for n, p in model.named_parameters()}
        for p in params:
            if id(p) not in owner:
                raise ValueError(f"grad-sample mode 'ghost': parameter '{names.get(id(p), '?')}' is trained but "
                                 "belongs to no layer of the model it clips")
        self.params = list(params)
        self._recording = False
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]

    def _hook(self, layer: _Layer):
        import torch

        def record(module, args, output) -> None:
            if not self._recording or not torch.is_grad_enabled():
                return
            if not output.requires_grad:
                # its weights would get a gradient from autograd that ghost clipping cannot see
                raise RuntimeError(f"ghost clipping: layer '{layer.name}' ran on an input that needs no gradient")
            call = _Call(args[0].detach())
            layer.calls.append(call)

            def keep(grad: torch.Tensor) -> None:
                call.grad = grad

            output.register_hook(keep)

        return record

    def begin(self) -> None:
        """Start recording one step: earlier calls are dropped and autograd stops computing weight gradients
        (the caller makes the input images require grad so that backward still reaches every layer)."""
        self._clear()
        for p in self.params:
            p.requires_grad_(False)
        self._recording = True

    def end(self) -> None:
        """Stop recording; the parameters require grad again (the optimizer only steps those)."""
        self._recording = False
        self._clear()
        for p in self.params:
            p.requires_grad_(True)

    def _clear(self) -> None:
        for layer in self.layers:
            layer.calls.clear()

    def clipped_sum(self, max_grad_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(sum over images of each image's clipped gradient, one tensor per `params` entry; each image's
        gradient norm over all layers before clipping). Ends the step (`end`)."""
        import torch

        try:
            batch = {c.inputs.shape[0] for layer in self.layers for c in layer.calls}
            if len(batch) != 1:
                raise RuntimeError(f"ghost clipping: the recorded calls have batch sizes {sorted(batch)}, "
                                   "not one batch of images")
            n = batch.pop()
            parts = [_per_image(layer, n) for layer in self.layers]
            # The loss is the batch mean, so image i's gradient is n x what the output gradients hold of it.
            norms = torch.stack([sq_norm for sq_norm, _ in parts]).sum(0).sqrt() * n
            factor = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
            summed: dict[int, torch.Tensor] = {}
            for _, clip in parts:
                summed.update(clip(factor * n))
        finally:
            self.end()
        return [summed[id(p)] for p in self.params], norms

    def remove(self) -> None:
        """Remove the hooks; the model is as before."""
        self.end()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _per_image(layer: _Layer, n: int):
    """(squared norm of each image's share of the layer's batch gradient, (n,); a function weights ->
    {id(param): sum over images of weight_i x image i's share})."""
    import torch
    from torch import nn

    calls = [c for c in layer.calls if c.grad is not None]  # an output the loss never used has gradient 0
    module = layer.module
    if not calls:  # not called this step, or no output reached the loss: every image's gradient is 0
        trained = list(layer.trained.values())
        return torch.zeros(n, device=trained[0].device), lambda factor: {id(p): torch.zeros_like(p) for p in trained}
    if isinstance(module, nn.GroupNorm):
        return _group_norm(module, layer.trained, calls, n)
    return _weight_layer(module, layer.trained, calls, n)


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """F.unfold(x) for `conv`, (n, C_in*kh*kw, T) ordered as weight.view(C_out, -1): a strided view of the padded
    input copied once, several times faster on CPU than F.unfold's im2col."""
    import torch.nn.functional as F

    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    n, c, h, w = x.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_n, s_c, s_h, s_w = x.stride()
    view = x.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw))
    return view.reshape(n, c * kh * kw, ho * wo)


def _positions(module: nn.Module, call: _Call, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, d_in, T), output gradients (n, d_out, T)) of one call of a Linear or Conv2d."""
    from torch import nn

    grad = call.grad.float()
    if isinstance(module, nn.Conv2d):
        return _patches(call.inputs.float(), module), grad.reshape(n, grad.shape[1], -1)
    a = call.inputs.float().reshape(n, -1, module.in_features).transpose(1, 2)
    return a, grad.reshape(n, -1, module.out_features).transpose(1, 2)


def _weight_layer(module: nn.Module, trained: dict[str, torch.Tensor], calls: list[_Call], n: int):
    """Linear / Conv2d: image i's weight gradient is sum over calls c and positions t of g_ict a_ict^T."""
    import torch

    weight, bias = module.weight, trained.get("bias")
    d_out, d_in = weight.shape[0], weight[0].numel()
    pairs = [_positions(module, c, n) for c in calls]  # [(a (n, d_in, T_c), g (n, d_out, T_c))]
    positions = sum(a.shape[2] for a, _ in pairs)  # of one image, over all calls
    bias_grad = sum(g.sum(2) for _, g in pairs) if bias is not None else None  # (n, d_out)
    sq = bias_grad.square().sum(1) if bias_grad is not None else torch.zeros(n, device=weight.device)
    explicit = gram = None
    if "weight" in trained and positions * positions > d_in * d_out:
        explicit = sum(torch.bmm(g, a.transpose(1, 2)) for a, g in pairs)  # (n, d_out, d_in): image i's gradient
        sq = sq + explicit.square().sum((1, 2))
    elif "weight" in trained:
        # Gram form: sum_{t,s} (a_t . a_s)(g_t . g_s) over both calls' positions, never (n, d_out, d_in)
        gram = torch.zeros(n, device=weight.device)
        for c, (a_c, g_c) in enumerate(pairs):
            for d, (a_d, g_d) in enumerate(pairs[c:], start=c):
                block = (torch.bmm(a_c.transpose(1, 2), a_d) * torch.bmm(g_c.transpose(1, 2), g_d)).sum((1, 2))
                gram = gram + (block if d == c else 2 * block)
        sq = sq + gram.clamp(min=0)
    kept = pairs if gram is not None else []  # the explicit form lets the patches go now

    def clip(factor: torch.Tensor) -> dict[int, torch.Tensor]:
        out = {}
        if explicit is not None:
            out[id(weight)] = torch.einsum("n,nij->ij", factor, explicit).reshape(weight.shape).to(weight.dtype)
        elif gram is not None:  # one batch weight gradient with image i's output gradients x factor_i
            w = sum(torch.einsum("nit,njt->ij", g * factor[:, None, None], a) for a, g in kept)
            out[id(weight)] = w.reshape(weight.shape).to(weight.dtype)
        if bias is not None:
            out[id(bias)] = (factor @ bias_grad).to(bias.dtype)
        return out

    del pairs
    return sq, clip


def _group_norm(module: nn.GroupNorm, trained: dict[str, torch.Tensor], calls: list[_Call], n: int):
    import torch.nn.functional as F

    per_w = per_b = None
    for c in calls:
        grad = c.grad.float().reshape(n, module.num_channels, -1)
        x_hat = F.group_norm(c.inputs.float(), module.num_groups, eps=module.eps).reshape(grad.shape)
        w, b = (grad * x_hat).sum(2), grad.sum(2)  # (n, C) each: this call's per-image gradients
        per_w, per_b = (w, b) if per_w is None else (per_w + w, per_b + b)
    named = [(trained[k], v) for k, v in (("weight", per_w), ("bias", per_b)) if k in trained]
    sq = sum(v.square().sum(1) for _, v in named)

    def clip(factor: torch.Tensor) -> dict[int, torch.Tensor]:
        return {id(p): (factor @ v).to(p.dtype) for p, v in named}

    return sq, clip


__all__ = ["CLIP_EPS", "GhostClipping"]
