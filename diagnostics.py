"""Forgetting diagnostics of a fine-tune, computed after training and kept in results.json "diagnostics":
the update's geometry and the KL to the base model on the new task's prompts.

The update's geometry, per weight matrix W₀ (every 2-D weight: the decoder's projections and the embedding)
and its update ΔW = W_ft − W₀ (a LoRA run's ΔW = s·B·A, the adapter folded in):

    norm            ‖ΔW‖_F, and relative = ‖ΔW‖_F / ‖W₀‖_F
    effective rank  exp(H(p)), p_i = σ_i / Σ_j σ_j over ΔW's singular values σ (Roy & Vetterli 2007): 1 for a
                    rank-1 update, min(m, n) for one whose singular values are all equal
    overlap         ‖U_kᵀ ΔW V_k‖²_F / ‖ΔW‖²_F: the share of the update's energy inside the span of W₀'s top-k
                    left and right singular vectors; an update with no preferred directions has k² / (m·n)
                    in expectation (`overlap_chance`)

Updates that stay low-rank and outside W₀'s principal directions are the ones the low-rank fine-tuning
literature links with less forgetting (e.g. Biderman et al. 2024, "LoRA Learns Less and Forgets Less"; Shuttleworth
et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence", on intruder dimensions); these numbers let
a report say which kind of update a method made. Cost: one Gram-matrix eigendecomposition of ΔW and a
randomized top-k SVD of W₀ (Halko et al. 2011, torch.svd_lowrank, a fixed seed) per matrix.
"""
import os
from pathlib import Path

import random

import torch
import torch.nn.functional as F

from lora import lora_modules
from model import eval_mode, generate_ids
from model.llama import IGNORE_INDEX
from stats import format_interval, mean_interval

TOP_K = 16  # W₀'s singular directions the overlap counts
KL_PROMPTS, KL_NEW_TOKENS = 32, 32  # the new task's prompts the KL is taken on, and the base's sample length


def effective_weights(model) -> dict[str, torch.Tensor]:
    """{HF name: 2-D weight} of the model as it computes: a LoRA module's weight with its adapter folded in."""
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 2 and ".lora_" not in n}
    for name, m in lora_modules(model).items():
        weights[f"{name}.weight"] = m.merged_weight().detach()
    return weights


@torch.no_grad()
def matrix_geometry(w0: torch.Tensor, dw: torch.Tensor, top_k: int = TOP_K) -> dict:
    """norm, relative, effective_rank, overlap and overlap_chance (the module docstring) of one update."""
    w0, dw = w0.float().to(dw.device), dw.float()
    m, n = dw.shape
    norm = float(dw.norm())
    k = min(top_k, m, n)
    out = dict(norm=norm, relative=norm / max(float(w0.norm()), 1e-30), overlap_chance=k * k / (m * n))
    if norm == 0:
        return dict(out, effective_rank=0.0, overlap=0.0)
    d = dw.double()  # float64: the Gram matrix squares the spread of the σ, and its rounding would pose as rank
    gram = d @ d.T if m <= n else d.T @ d  # the smaller side: its eigenvalues are the σ²
    sigma = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    p = sigma / sigma.sum()
    p = p[p > 0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, _, v = torch.svd_lowrank(w0, q=min(k + 8, m, n), niter=4)
    u, v = u[:, :k], v[:, :k]
    inside = float((u.T @ dw @ v).square().sum())
    return dict(out, effective_rank=float(torch.exp(-(p * p.log()).sum())), overlap=inside / norm ** 2)


def update_geometry(base: dict, tuned: dict, top_k: int = TOP_K) -> dict:
    """{"top_k", "matrices": {name: matrix_geometry}} for every 2-D weight present in both."""
    return dict(top_k=top_k, matrices={n: matrix_geometry(base[n], tuned[n].float() - base[n].to(tuned[n].device),
                                                          top_k) for n in tuned if n in base})


def by_module(geometry: dict) -> dict[str, dict]:
    """{module kind (q_proj, ..., embed_tokens): the median of each figure over its layers}."""
    groups: dict = {}
    for name, g in geometry["matrices"].items():
        groups.setdefault(name.split(".")[-2], []).append(g)
    return {kind: {key: float(torch.tensor([g[key] for g in rows]).median())
                   for key in ("relative", "effective_rank", "overlap", "overlap_chance")}
            for kind, rows in groups.items()}


def geometry_md(geometry: dict) -> str:
    """The report's section: per module kind, the medians over layers."""
    rows = "".join(f"| {kind} | {g['relative']:.2e} | {g['effective_rank']:.1f} | {g['overlap']:.3g} | "
                   f"{g['overlap_chance']:.3g} |\n" for kind, g in by_module(geometry).items())
    return (f"## The update's geometry\n\nMedians over layers (diagnostics.py; per matrix in results.json "
            f"\"diagnostics\"): ‖ΔW‖/‖W₀‖, the effective rank of ΔW, and the share of ΔW's energy in W₀'s top "
            f"{geometry['top_k']} singular directions, against what an update with no preferred direction would "
            f"have there.\n\n| module | relative norm | effective rank | overlap | overlap by chance |\n"
            f"|---|---:|---:|---:|---:|\n{rows}\n")


def geometry_figure(geometry: dict, file):
    """One figure: relative norm, effective rank and overlap of each module kind against the layer index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict = {}
    for name, g in geometry["matrices"].items():
        parts = name.split(".")
        if "layers" in parts:
            series.setdefault(parts[-2], []).append((int(parts[parts.index("layers") + 1]), g))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for kind, points in sorted(series.items()):
        points.sort(key=lambda x: x[0])
        for ax, key in zip(axes, ("relative", "effective_rank", "overlap")):
            ax.plot([i for i, _ in points], [g[key] for _, g in points], marker=".", label=kind)
    for ax, title in zip(axes, ("‖ΔW‖ / ‖W₀‖", "effective rank of ΔW", f"overlap with W₀'s top {geometry['top_k']}")):
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, metadata={"Software": None})  # no version string: same records, same bytes
    plt.close(fig)
    os.replace(tmp, file)


def task_prompts(examples: list[dict], seed: int, n: int = KL_PROMPTS) -> list[list[int]]:
    """The prompts (the tokens before the first labelled one; at least the first token, for a text example whose
    every token is labelled) of n training examples drawn by the seed."""
    rows = random.Random(seed).sample(range(len(examples)), min(n, len(examples)))
    prompts = []
    for i in sorted(rows):
        labels = examples[i]["labels"]
        start = next(t for t, y in enumerate(labels) if y != IGNORE_INDEX)
        prompts.append(list(examples[i]["input_ids"][:max(start, 1)]))
    return prompts


@torch.no_grad()
def kl_to_base(model, base, prompts: list[list[int]], stop_ids, pad_id: int, seed: int = 0,
               max_new_tokens: int = KL_NEW_TOKENS) -> dict:
    """RL's Razor's predictor of forgetting (Shenfeld, Pari & Agrawal 2025): the forward KL from the base policy
    π₀ to the fine-tuned π on the new task's prompts x,

        KL(π₀ ‖ π) = E_x E_{y∼π₀(·|x)} Σ_t KL(π₀(·|x, y<t) ‖ π(·|x, y<t))

    by the chain rule the sequence-level KL, estimated with one sample y of the base model per prompt
    (temperature 1, seeded, at most max_new_tokens, its stop token's position included) and each position's KL
    exact over the vocabulary. Returns {"kl", "kl_ci" (a t interval over prompts), "n", "max_new_tokens",
    "per_prompt"}: nats per prompt."""
    device = model.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(base):
        samples = generate_ids(base, prompts, max_new_tokens, stop_ids, pad_id, temperature=1.0, generator=generator)
    rows = [x + y for x, y in zip(prompts, samples)]
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right-padded: causal attention never lets a real token see a pad
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    per_prompt = []
    with eval_mode(model), eval_mode(base):
        h0 = base.hidden(ids.to(device), attention_mask=mask.to(device))
        h = model.hidden(ids.to(device), attention_mask=mask.to(device))
        for i, (x, y) in enumerate(zip(prompts, samples)):
            n = len(y) + 1 if len(y) < max_new_tokens else len(y)  # the distributions y (and its stop) came from
            where = slice(len(x) - 1, len(x) - 1 + n)
            log_p0 = F.log_softmax(base.lm_head(h0[i, where]).float(), -1)
            log_p = F.log_softmax(model.lm_head(h[i, where]).float(), -1)
            per_prompt.append(float((log_p0.exp() * (log_p0 - log_p)).sum()))
    kl, lo, hi = mean_interval(per_prompt)
    return dict(kl=kl, kl_ci=[None, None] if len(per_prompt) < 2 else [lo, hi], n=len(per_prompt), max_new_tokens=max_new_tokens, per_prompt=per_prompt)


def diagnose(model, base, examples: list[dict], tok, seed: int) -> dict:
    """Both diagnostics of `model` against the `base` it was fine-tuned from, the KL on prompts of `examples`."""
    return dict(update_geometry=update_geometry(effective_weights(base), effective_weights(model)),
                kl_to_base=kl_to_base(model, base, task_prompts(examples, seed), tok.stop_ids, tok.pad_id, seed=seed))


def geometry_medians(geometry: dict) -> dict:
    """The medians over every matrix: relative norm, effective rank, and overlap over its chance level."""
    rows = list(geometry["matrices"].values())
    median = lambda xs: float(torch.tensor(xs, dtype=torch.float64).median())  # noqa: E731
    return dict(relative=median([g["relative"] for g in rows]),
                effective_rank=median([g["effective_rank"] for g in rows]),
                overlap_ratio=median([g["overlap"] / g["overlap_chance"] for g in rows]))


def kl_md(kl: dict) -> str:
    return (f"## KL to the base model on the new task\n\nKL(π₀ ‖ π) on {kl['n']} of the training prompts, along "
            f"one sample of the base model each (at most {kl['max_new_tokens']} tokens; diagnostics.kl_to_base): "
            f"{format_interval(kl['kl'], *kl['kl_ci'])} nats per prompt (95% t interval over prompts).\n\n")
