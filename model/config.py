"""LlamaConfig: one dataclass for every Llama-family checkpoint, read from a Hugging Face config.json."""
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from errors import ForgetlabError, read_json_object


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # < num_attention_heads means grouped-query attention (GQA)
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as in HF config.json.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    name_or_path: str = ""
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, written back on save

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ForgetlabError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "llama3", "default"):
                raise ForgetlabError(f"rope_scaling type {kind!r} is not supported (linear, llama3)")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, (list, tuple)) else [e]

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ForgetlabError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "llama":
            raise ForgetlabError(f"{source}: model_type is {d.get('model_type')!r}, only 'llama' is supported")
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "name_or_path")}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ForgetlabError(f"{source}: missing required key(s) {', '.join(missing)}")
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
        for k in sizes:
            if k in d and d[k] is not None and not (isinstance(d[k], int) and not isinstance(d[k], bool) and d[k] > 0):
                raise ForgetlabError(f"{source}: {k} must be a positive integer, got {d[k]!r}")
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        kwargs["rope_scaling"] = d.get("rope_scaling")
        rp = d.get("rope_parameters")  # transformers >= 5 writes theta and scaling together here
        if isinstance(rp, dict):
            kwargs.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default" and kwargs["rope_scaling"] is None:
                kwargs["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        check_rope_and_norm(kwargs, source)
        extra = {k: v for k, v in d.items() if k not in known and k != "rope_parameters"}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ForgetlabError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        cfg = cls.from_hf_dict(read_json_object(path, "model config"), str(path))
        cfg.name_or_path = str(path.parent)
        return cfg

    def to_hf_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "name_or_path")}
        return {**self.extra, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, **d}

    def to_transformers(self, **kwargs):
        """The same config as a `transformers.LlamaConfig`, for the tests and the benchmark, which compare
        against transformers (imported here only: the model itself never needs it)."""
        from transformers import LlamaConfig as HFConfig

        d = self.to_hf_dict()
        for k in ("model_type", "architectures"):
            d.pop(k)
        return HFConfig(**d, **kwargs)


def positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf


def check_rope_and_norm(kwargs: dict, source: str):
    """The float settings of a config.json are positive numbers, and rope_scaling an object whose factors are:
    a string or a list there would only fail deep inside the first forward pass."""
    for k in ("rms_norm_eps", "rope_theta"):
        if k in kwargs and not positive_number(kwargs[k]):
            raise ForgetlabError(f"{source}: {k} must be a positive number, got {kwargs[k]!r}")
    scaling = kwargs.get("rope_scaling")
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ForgetlabError(f"{source}: rope_scaling must be null or an object, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    for k in {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}.get(kind, ()):
        if k not in scaling:
            raise ForgetlabError(f"{source}: rope_scaling of type {kind!r} needs {k}")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if k in scaling and not positive_number(scaling[k]):
            raise ForgetlabError(f"{source}: rope_scaling.{k} must be a positive number, got {scaling[k]!r}")
