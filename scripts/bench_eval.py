"""The evaluation benchmark of scripts/bench.py (its `--eval` section, described in its docstring; bench.main runs
it): eval.py's `full` level timed per task, with the tokens its forward passes computed and their MFU.
"""
import importlib
import json
import time
from pathlib import Path

from model import LlamaConfig
from model.checkpoint import DTYPES
from model.tiny import random_llama


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


bench = sibling("bench")
build_ours, matmul_params = bench.build_ours, bench.matmul_params


EVAL_QUICK_LIMIT = 4  # items a task on --quick


def bench_eval(args, cfg: LlamaConfig, peak_gflops: float) -> dict:
    """eval.evaluate(level="full") timed per task, its forward tokens counted by hooks (bench's docstring)."""
    import eval as evaluation
    from model.tiny import TINY_SHAPE
    from model.tokenizer import Tokenizer

    if args.quick:
        from model.convert_gguf import prepare_default_model
        tok_dir = prepare_default_model()
        tok = Tokenizer.from_dir(tok_dir)
        config = {**json.loads((Path(tok_dir) / "config.json").read_text()), **TINY_SHAPE}
        model = random_llama(config, std=0.2, dtype=DTYPES[args.dtype], device=args.device)
        cfg = model.config
    else:
        model, tok = build_ours(args), Tokenizer.from_dir(args.model)
    counts = dict(tokens=0, head_rows=0)
    hooks = [model.model.embed_tokens.register_forward_hook(
                 lambda m, inp, out: counts.__setitem__("tokens", counts["tokens"] + inp[0].numel())),
             model.lm_head.register_forward_hook(
                 lambda m, inp, out: counts.__setitem__("head_rows", counts["head_rows"] + inp[0][..., 0].numel()))]
    head = cfg.vocab_size * cfg.hidden_size
    body = matmul_params(cfg)[0] - head
    limit = EVAL_QUICK_LIMIT if args.quick else None
    t0 = time.perf_counter()
    try:
        results = evaluation.evaluate(model, tok, level="full", limit=limit, split="test", progress=False)
    finally:
        for h in hooks:
            h.remove()
    wall = time.perf_counter() - t0
    flops = 2 * body * counts["tokens"] + 2 * head * counts["head_rows"]
    out = dict(seconds=wall, tasks={k: v.get("seconds") for k, v in results.items()}, **counts,
               tokens_per_s=counts["tokens"] / wall, gflops=flops / wall / 1e9,
               mfu=flops / wall / 1e9 / peak_gflops, limit=limit)
    print(f"evaluation: level full{f', {limit} items a task (tiny random model)' if limit else ''}")
    for name, sec in out["tasks"].items():
        print(f"  {name:16s} {sec if sec is not None else float('nan'):8.2f} s")
    print(f"  total {wall:.1f} s: {counts['tokens']} forward tokens, {counts['head_rows']} lm_head rows, "
          f"{out['tokens_per_s']:.1f} tokens/s, {out['gflops']:.1f} GFLOP/s, MFU {100 * out['mfu']:.1f}%")
    return out
