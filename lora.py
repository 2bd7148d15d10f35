"""Low-rank adaptation (LoRA) written out by hand, with exact merging and PEFT-compatible adapter files.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a pretrained weight
W0 (out, in) and learns a low-rank update B·A with A (r, in) and B (out, r), r << min(in, out):

    x ↦ W0·x + (α/r)·B·A·x

B starts at zero, so the adapted model is exactly the base model at step 0, and only r·(in + out)
parameters per adapted matrix are trained. With `rslora=True` the scale is α/√r instead (Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"), which keeps the update's magnitude stable
as r grows.

    apply_lora(model, r=16, alpha=32, targets=("q_proj", "v_proj"))   # in place; everything else frozen
    with lora_disabled(model): base_logits = model(ids)               # the base model, without reloading it
    save_adapter(model, "out/adapter")                                # PEFT's on-disk format
    merged = merge_lora(model)                                        # a copy: plain nn.Linear, HF names

Parameter names follow PEFT's minus its `base_model.model.` prefix and `.default` adapter name:
`model.layers.3.self_attn.q_proj.lora_A.weight`, while the frozen base keeps `...q_proj.weight`.
"""
import copy
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ForgetlabError, check_names, read_json_object
from model.checkpoint import read_safetensors, write_atomic_safetensors, write_atomic_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path in front of the model's own module names
# PEFT LoraConfig fields whose non-default values change the math or the layout: an adapter that uses one
# would load here silently wrong, so it is refused instead.
PEFT_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save",
                    "lora_bias", "fan_in_fan_out", "exclude_modules", "layer_replication",
                    "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens")


def init_lora_a(weight: torch.Tensor):
    """Kaiming-uniform with a=√5, i.e. U(-1/√in, 1/√in): what the reference LoRA code (microsoft/LoRA) and
    PEFT use for A (it is also nn.Linear's default init)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_lora_b(weight: torch.Tensor):
    """Zeros (Hu et al. 2021, section 4.1): B·A = 0, so training starts from the base model exactly."""
    nn.init.zeros_(weight)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank path: x ↦ W0·x + b + (α/r)·B·A·dropout(x).

    `weight` (and `bias`) are the very Parameters of the wrapped linear, so they keep their names and stay
    frozen (requires_grad False: autograd computes no gradient for W0). The adapter is kept in float32 even
    when W0 is bf16/fp16, so optimizer updates to A and B are not rounded away.

    `disabled = True` gives the base layer's output exactly (W0 is never modified by training);
    `merged_weight()` is W0 with the update folded in, for a plain nn.Linear (see `merge_lora`)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if r <= 0:
            raise ForgetlabError(f"LoRA rank r must be a positive integer, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.dropout, self.rslora = r, alpha, dropout, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # A: (r, in)
        self.lora_B = nn.Linear(r, self.out_features, **kw)  # B: (out, r)
        init_lora_a(self.lora_A.weight)
        init_lora_b(self.lora_B.weight)
        self.disabled = False

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        if self.dropout > 0 and self.training:
            x = F.dropout(x, self.dropout, training=True)
        if x.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # bf16 base without autocast: run the adapter in float32
        return out + (self.lora_B(self.lora_A(x)) * self.scale).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A, (out, in), in float32 whatever the weights' dtype."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + (α/r)·B·A, a new (out, in) tensor: the sum taken in float32 and rounded once to W0's dtype."""
        return (self.weight.float() + self.delta_weight()).to(self.weight.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.rslora}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full module name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the nn.Linear modules to adapt.

    `targets` is a list of module-name suffixes ("q_proj", or a full name), "all-linear" (every nn.Linear in
    the decoder layers: q, k, v, o, gate, up, down; not lm_head, as in PEFT), or another single string, which
    PEFT treats as a regular expression the whole module name must match."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets == "all-linear":
        found = [n for n in linears if n.startswith("model.layers.")]
    elif isinstance(targets, str):
        found = [n for n in linears if re.fullmatch(targets, n)]
    else:
        missing = [t for t in targets if not any(matches(n, t) for n in linears)]
        if missing:
            raise ForgetlabError(f"LoRA target module {missing[0]!r} not found in the model "
                                 f"(its linear layers end in: {', '.join(sorted({n.split('.')[-1] for n in linears}))})")
        found = [n for n in linears if any(matches(n, t) for t in targets)]
    if not found:
        raise ForgetlabError(f"LoRA targets {targets!r} match no linear layer of the model")
    return found


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.1,
               targets=("q_proj", "v_proj"), rslora: bool = False) -> nn.Module:
    """Replace each target nn.Linear by a LoRALinear, in place, and freeze every other parameter
    (embeddings, norms, lm_head, the base weights). Returns the model; `count_params` gives what trains."""
    if lora_modules(model):
        raise ForgetlabError("LoRA is already applied to this model; merge_lora() it before applying another")
    if not 0.0 <= dropout < 1.0:
        raise ForgetlabError(f"LoRA dropout must be in [0, 1), got {dropout}")
    for name in find_targets(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(getattr(parent, child), r, alpha, dropout, rslora)
        setattr(parent, child, lora.train(parent.training))  # a new module is in training mode: follow the model
    for n, p in model.named_parameters():
        if not is_lora_param(n):
            p.requires_grad_(False)
    assert all(p.requires_grad == is_lora_param(n) for n, p in model.named_parameters())  # only the adapter learns
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: every LoRALinear returns W0·x (bit-exact) inside the block."""
    modules = list(lora_modules(model).values())
    previous = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(modules, previous):
            m.disabled = d


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of `model` with every adapter folded into its base weight (`LoRALinear.merged_weight`) and plain
    nn.Linear layers in place of the LoRALinear ones; `model` itself is left as it is (torchtune, too, merges
    into a copy rather than in place).

    The copy is what `load_model` would give for the merged weights: its state dict has exactly the HF names
    (save it with `save_pretrained`) and all its parameters are trainable."""
    merged = copy.deepcopy(model)
    for name, m in lora_modules(merged).items():
        with torch.device("meta"):  # a shell: its weight and bias are replaced just below
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight = nn.Parameter(m.merged_weight())
        linear.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent_name), child, linear)
    return merged.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, under the model's names (`model.layers.0.self_attn.q_proj.lora_A.weight`)."""
    return {n: p.detach() for n, p in model.named_parameters() if is_lora_param(n)}


def adapter_settings(model: nn.Module) -> dict:
    """r, alpha, dropout, rslora and target suffixes of the applied LoRA (one setting for all layers)."""
    modules = lora_modules(model)
    if not modules:
        raise ForgetlabError("the model has no LoRA adapter (call apply_lora first)")
    settings = {(m.r, m.alpha, m.dropout, m.rslora) for m in modules.values()}
    assert len(settings) == 1, f"LoRA layers with different settings: {settings}"
    r, alpha, dropout, rslora = settings.pop()
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    return dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, targets=targets)


def save_adapter(model: nn.Module, dir, base_model_name_or_path: str = "") -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does, so `PeftModel.from_pretrained`
    loads them onto the transformers model (and `load_adapter` onto ours)."""
    s = adapter_settings(model)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    if not base_model_name_or_path:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path or None,
                  r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"], target_modules=s["targets"],
                  use_rslora=s["rslora"], bias="none", fan_in_fan_out=False, inference_mode=True,
                  init_lora_weights=True, modules_to_save=None)
    tensors = {PEFT_PREFIX + n: t.contiguous() for n, t in lora_state_dict(model).items()}
    write_atomic_safetensors(dir / ADAPTER_WEIGHTS, tensors)
    write_atomic_text(dir / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return dir


def read_adapter_config(file: Path) -> dict:
    config = read_json_object(file, "adapter config")
    if config.get("peft_type") != "LORA":
        raise ForgetlabError(f"{file}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ForgetlabError(f"{file}: missing {key!r}")
    number = (int, float)
    targets = config["target_modules"]
    checks = [(isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] > 0,
               "'r' must be a positive integer"),
              (isinstance(config["lora_alpha"], number) and not isinstance(config["lora_alpha"], bool),
               "'lora_alpha' must be a number"),
              (isinstance(config.get("lora_dropout", 0.0), number), "'lora_dropout' must be a number"),
              (isinstance(targets, str) or (isinstance(targets, list) and targets
                                            and all(isinstance(t, str) for t in targets)),
               "'target_modules' must be a string or a non-empty list of strings")]
    for ok, msg in checks:
        if not ok:
            raise ForgetlabError(f"{file}: {msg}")
    if config.get("bias", "none") != "none":
        raise ForgetlabError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for key in PEFT_UNSUPPORTED:
        if config.get(key):  # None, False, {} and [] are the defaults
            raise ForgetlabError(f"{file}: {key}={config[key]!r} is not supported by this LoRA implementation")
    return config


def load_adapter(model: nn.Module, dir) -> nn.Module:
    """Load a PEFT LoRA adapter directory onto `model`, in place.

    Applies LoRA with the adapter's r / alpha / dropout / targets / rslora when the model has none yet;
    otherwise the applied LoRA must have the same r, alpha and rslora. Every tensor must match a LoRA layer
    of the model in name and shape, and every LoRA layer must get one."""
    dir = Path(dir)
    config = read_adapter_config(dir / ADAPTER_CONFIG)
    weights = dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ForgetlabError(f"{weights}: adapter weights not found (only safetensors adapters are supported)")
    r, alpha, rslora = config["r"], config["lora_alpha"], bool(config.get("use_rslora", False))
    if lora_modules(model):
        s = adapter_settings(model)
        if (s["r"], s["alpha"], s["rslora"]) != (r, alpha, rslora):
            raise ForgetlabError(f"{dir / ADAPTER_CONFIG}: adapter has r={r}, lora_alpha={alpha}, use_rslora={rslora} "
                                 f"but the model's LoRA has r={s['r']}, alpha={s['alpha']}, rslora={s['rslora']}")
    else:
        try:
            apply_lora(model, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                       targets=config["target_modules"], rslora=rslora)
        except ForgetlabError as e:
            raise ForgetlabError(f"{dir / ADAPTER_CONFIG}: {e}") from None
    params = {PEFT_PREFIX + n: p for n, p in model.named_parameters() if is_lora_param(n)}  # the file's names
    tensors, _ = read_safetensors(weights)
    check_names(params, tensors, f"{weights}: does not fit the model's LoRA layers")
    for key, t in tensors.items():
        if t.shape != params[key].shape:
            raise ForgetlabError(f"{weights}: shape mismatch for {key}: adapter {tuple(t.shape)} vs model "
                                 f"{tuple(params[key].shape)} (an adapter for another model?)")
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t)
    return model
