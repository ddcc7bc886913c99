"""A quantised frozen base: the memory lever of `model.quantize_base` (QLoRA-style training).

The frozen base U-Net's linear layers (attention and feed-forward: most of its weights) are
stored in int8 or fp8 (e4m3; or int4 on a GPU) by torchao's weight-only quantisation; LoRA trains on top
in full precision through peft's `TorchaoLoraLinear`; the other layers (convolutions, norms)
are held in the frozen parts' dtype (bf16 under mixed precision). The ControlNet is copied
from the U-Net before it is quantised, so it starts from the full-precision weights.

Why torchao: it is maintained by the PyTorch team, its int8 weight-only layers run (and
pass gradients to LoRA) on a CPU as on a GPU, so the path is tested here; diffusers loads
through it (`TorchAoConfig`) and peft trains LoRA on it. bitsandbytes' nf4 (the original
QLoRA) is refused on a machine without a GPU by diffusers' loader, and optimum-quanto is
deprecated in diffusers.
"""

from __future__ import annotations

from torch import nn

from genlab.errors import ConfigError, GenlabError

# model.quantize_base -> torchao config class: int8 and fp8 (e4m3, a scale per row) weights everywhere,
# int4 on CUDA GPUs (torchao's kernels).
SCHEMES = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig"}


def quantize_frozen(module: nn.Module, scheme: str | None) -> nn.Module:
    """Quantise `module`'s linear weights in place (`scheme` None: leave it as it is)."""
    if scheme is None:
        return module
    if scheme not in SCHEMES:
        raise ConfigError(f"model.quantize_base={scheme!r}: use null, {', '.join(SCHEMES)}.")
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise GenlabError(f"model.quantize_base={scheme} needs torchao: `pip install torchao` (genlab's [quantize] "
                          "extra), or set model.quantize_base=null.") from e
    try:
        tq.quantize_(module, getattr(tq, SCHEMES[scheme])())
    except (ImportError, RuntimeError, NotImplementedError) as e:
        raise GenlabError(f"model.quantize_base={scheme}: torchao cannot quantise here ({str(e).splitlines()[0]}); "
                          "int4 needs a CUDA GPU, int8 and fp8 run anywhere.") from e
    # A quantised layer computes in the dtype its weights were quantised from (fp32), whatever the
    # autocast; its output is cast to the dtype the rest of the module is moved to (`set_dtype`), so a
    # bf16 U-Net keeps its convolutions and norms in bf16 around int8 linear layers.
    module.quantized_output_dtype = None
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and is_quantized(layer):
            layer.register_forward_hook(lambda _, __, out: out if module.quantized_output_dtype is None
                                        else out.to(module.quantized_output_dtype))
    return module


def set_dtype(module: nn.Module, dtype) -> None:
    """The dtype a quantised module's int8 layers hand on (the dtype its other layers were moved to)."""
    if hasattr(module, "quantized_output_dtype"):
        module.quantized_output_dtype = dtype


def is_quantized(module: nn.Module) -> bool:
    """Whether any weight of `module` is a torchao quantised tensor."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return any(isinstance(p, TorchAOBaseTensor) for p in module.parameters())


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers take, a quantised weight counted by its stored parts (int8
    values and scales), not by the full-precision size it stands for."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = tensor.__tensor_flatten__()[0] if hasattr(tensor, "__tensor_flatten__") else None
        if inner:
            total += sum(getattr(tensor, name).numel() * getattr(tensor, name).element_size() for name in inner)
        else:
            total += tensor.numel() * tensor.element_size()
    return total
