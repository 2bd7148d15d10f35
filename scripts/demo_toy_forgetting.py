"""Catastrophic forgetting in a two-headed MLP, and what each mitigation does about it, in a few seconds.

    python scripts/demo_toy_forgetting.py                 # every method, one row each
    python scripts/demo_toy_forgetting.py --method ewc --ewc-lambda 10

The toy: one shared layer feeds two heads,

    h = ReLU(W x + c)   (shared: nn.Linear(10, 20))      ŷ_A = head_a(h)      ŷ_B = head_b(h)

on synthetic regression data x ~ N(0, I_10):

    task A: y = x_1 + x_2 + x_3 + x_4 + x_5                (the first five inputs)
    task B: y = 3 · (x_6 + ... + x_10) − 2 · (x_1 + ... + x_5)

Task B also depends on A's inputs, with the opposite sign, so fitting it pulls the shared features that A
reads. Phase 1 trains shared + head_a on A. Phase 2 trains shared + head_b on B aggressively (high learning
rate, many epochs); head_a is frozen, so every change of A's loss comes from the shared layer moving under it.
The forgetting ratio is A's test loss after phase 2 divided by A's test loss after phase 1.

Mitigations of phase 2 (the same data, seeds and steps unless the row says otherwise):
    plain    shared + head_b, lr 0.01 (Adam), 300 full-batch epochs
    freeze   shared frozen, only head_b trains: A's features cannot move (the limit of "train fewer weights")
    lora     lora.apply_lora on the shared layer (rank 1) + head_b: a low-rank change of W. Not a mitigation
             here, and kept to show why: rank 1 is enough to fit B, and nothing steers the update away from the
             features A reads, so A is forgotten at least as badly as with plain fine-tuning (every seed tried).
             LoRA forgets less when it learns less (Biderman et al. 2024, "LoRA Learns Less and Forgets Less");
             a low rank alone protects nothing.
    low_lr   lr 0.001 and 30 epochs: a gentler fine-tune, which also learns B less
    replay   a quarter of each batch is task-A data trained through head_a (head_a trains too)
    ewc      λ/2 Σ F (θ − θ*)² via ewc.EWC, F the Fisher of task A at the end of phase 1 (see `task_fisher`)

The baselines of methods/, each in its toy form (train.py's method of the same name):
    l2-init      λ/2 Σ F̄ (θ − θ*)² on the shared layer: EWC with each of its F_i replaced by their mean F̄ (the
                 toy's "F = 1 on a mean-normalized scale") at ewc's λ, so ewc vs l2-init shows what the Fisher's
                 distribution adds; head_b is new and, as in L2-SP (Li et al. 2018), not pulled anywhere
    kl           β · ½ · mean_x (f_A(x) − f_A⁰(x))² over task-A inputs x (no labels): the KL between the unit-
                 variance Gaussians the regression heads define, to task A's predictions at the end of phase 1
                 (computed once: the cached teacher); Li & Hoiem 2017
    wise-ft      plain phase 2, then θ = (1 − α) θ⁰ + α θ_ft (α = 0.5) on the shared layer (head_b is new: it has
                 no θ⁰); Wortsman et al. 2022. Not a mitigation here: the ReLU features of the midpoint are neither
                 A's nor those head_b learnt to read, so it loses B without keeping A (no α does both)
    mofo         plain phase 2 with methods.MoFOOptimizer: only the 10% entries of largest momentum per tensor move
                 (Chen et al. 2025). Not a mitigation here either: the entries B's gradient pushes hardest are those
                 A's features live in, and a sparse update moves them as far (at fraction 1 it is the plain row)
    ties         plain phase 2, then the shared layer θ⁰ + τ_m, τ_m the 20% largest entries of each of its task
                 vectors τ = θ_ft − θ⁰ (methods.ties.ties_merge, λ = 1; Yadav et al. 2023)
    dare         plain phase 2, then θ⁰ + m ⊙ τ / (1 − p) with a Bernoulli(1 − p) mask m, p = 0.9, on the shared
                 layer (methods.dare.dare; Yu et al. 2024). Neither is a mitigation here: a 10 x 20 layer has no
                 redundant entries for a sparse update to leave out, so both lose B and keep no more of A
    a-gem        plain phase 2 with each step's gradient projected (methods.agem.project) against the gradient
                 on a memory of a quarter of task A's examples through head_a (Chaudhry et al. 2019)
    self-replay  replay whose task-A targets are the phase-1 model's own predictions, not the labels
    ewc-lora     the lora row plus λ/2 Σ F_W (s·B·A)², F_W the task-A Fisher of the shared weight W
(freeze is the freeze row above: the toy's shared layer is its only layer below the heads.)

Its output for seed 0, with what each row shows, is in docs/methods.md.

Deterministic: fixed seeds, full-batch training, no data shuffling.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import ArgumentParser, ForgetlabError, run_cli
from ewc import EWC
from lora import apply_lora
from methods.agem import project
from methods.dare import dare
from methods.mofo import MoFOOptimizer
from methods.ties import ties_merge

METHODS = ("plain", "freeze", "lora", "low_lr", "replay", "ewc", "l2-init", "kl", "wise-ft", "mofo", "self-replay",
           "ewc-lora", "ties", "dare", "a-gem")
# the rows that reduce forgetting (see "lora", "wise-ft", "mofo", "ties" and "dare" for those that do not, here)
MITIGATIONS = ("freeze", "low_lr", "replay", "ewc", "l2-init", "kl", "self-replay", "ewc-lora")
N_IN, N_HIDDEN = 10, 20


class TinyModel(nn.Module):
    """A shared ReLU layer and one linear head per task."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(N_IN, N_HIDDEN)
        self.head_a = nn.Linear(N_HIDDEN, 1)
        self.head_b = nn.Linear(N_HIDDEN, 1)

    def forward(self, x, task: str):
        h = F.relu(self.shared(x))  # (N, hidden)
        head = self.head_a if task == "a" else self.head_b
        return head(h).squeeze(-1)  # (N,)


def make_task(task: str, n: int, generator: torch.Generator):
    """(x (n, 10), y (n,)) for task "a" or "b"."""
    x = torch.randn(n, N_IN, generator=generator)
    first, last = x[:, :5].sum(1), x[:, 5:].sum(1)
    y = first if task == "a" else 3 * last - 2 * first
    return x, y


@dataclass
class ToyConfig:
    n_train: int = 256  # training points of each task
    n_test: int = 1024  # held-out points of each task, for the losses in the table
    lr_a: float = 0.01  # task A is learnt first, to convergence
    epochs_a: int = 300
    lr_b: float = 0.01  # "aggressive": a high learning rate (Adam) ...
    epochs_b: int = 300  # ... for many epochs
    low_lr: float = 0.001
    low_epochs: int = 30
    lora_r: int = 1
    replay_fraction: float = 0.25  # replayed A examples per B example in each batch
    ewc_lambda: float = 100.0  # also l2-init's and ewc-lora's λ
    kl_beta: float = 10.0
    wise_alpha: float = 0.5
    mofo_fraction: float = 0.1
    seed: int = 0


@dataclass
class Row:
    method: str
    loss_a_before: float  # task-A test MSE after phase 1
    loss_a_after: float  # task-A test MSE after phase 2
    loss_b_after: float  # task-B test MSE after phase 2

    @property
    def ratio(self) -> float:
        return self.loss_a_after / self.loss_a_before


def mse(model, task, data) -> float:
    with torch.no_grad():
        x, y = data
        return F.mse_loss(model(x, task), y).item()


def train(model, loss_fn, epochs: int, lr: float, optimizer=torch.optim.Adam):
    """Full-batch Adam (or `optimizer`) on the parameters with requires_grad."""
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


class ProjectedAdam(torch.optim.Adam):
    """Adam on A-GEM's projected gradient: at each step the memory's gradient is taken and the step's gradient
    projected against it (methods.agem.project) before Adam uses it."""

    def __init__(self, params, lr: float, memory_loss):
        super().__init__(params, lr=lr)
        self.memory_loss = memory_loss

    def step(self):
        params = [p for group in self.param_groups for p in group["params"]]
        ref = torch.autograd.grad(self.memory_loss(), params, allow_unused=True)
        ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref)]  # head_b: no part in A
        for p, g in zip(params, project([p.grad for p in params], ref)[0]):
            p.grad = g
        super().step()


def task_fisher(model, x) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of task A over the trainable parameters, one explicit backward per example.

    Task A's loss is the mean squared error, i.e. (up to constants) the negative log-likelihood of a Gaussian
    with unit variance around the prediction: −log p(y | x, θ) = ½ (y − f_θ(x))² + const. Its score is
    (y − f)·∇f, so the Fisher is E_{y∼p_θ}[(y − f)²] · (∇f)² = (∇f)²: the expectation over the model's own y is
    exact here, no sampling needed, F_i = 1/N Σ_n (∂f_θ(x_n)/∂θ_i)². (The empirical Fisher, the squared
    gradient of the data loss, would be ≈ 0: task A is fit almost exactly, its residuals y − f are tiny.)
    ewc.estimate_fisher is written for language models (token batches, per-layer hooks), so the toy computes
    this 256-example loop itself and hands the result to ewc.EWC."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for xn in x:
        grads = torch.autograd.grad(model(xn[None], "a").sum(), list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:  # head_b does not enter task A's prediction: its Fisher stays zero
                fisher[name] += g.square()
    return {n: f / len(x) for n, f in fisher.items()}


def run(method: str, cfg: ToyConfig = ToyConfig()) -> Row:
    """Phase 1 (task A), then phase 2 (task B) with `method`; returns the losses."""
    if method not in METHODS:
        raise ForgetlabError(f"unknown toy method {method!r} (choose from {', '.join(METHODS)})")
    torch.manual_seed(cfg.seed)
    model = TinyModel()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_a, test_a = make_task("a", cfg.n_train, g), make_task("a", cfg.n_test, g)
    train_b, test_b = make_task("b", cfg.n_train, g), make_task("b", cfg.n_test, g)

    model.head_b.requires_grad_(False)
    train(model, lambda: F.mse_loss(model(train_a[0], "a"), train_a[1]), cfg.epochs_a, cfg.lr_a)
    loss_a_before = mse(model, "a", test_a)

    model.requires_grad_(True)
    model.head_a.requires_grad_(method == "replay")  # only (self-)replay has task-A targets to train head_a on
    loss_b = lambda: F.mse_loss(model(train_b[0], "b"), train_b[1])  # noqa: E731
    loss_fn, epochs, lr, optimizer = loss_b, cfg.epochs_b, cfg.lr_b, torch.optim.Adam
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "freeze":
        model.shared.requires_grad_(False)
    elif method == "lora":
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_r, dropout=0.0, targets=("shared",))
        model.head_b.requires_grad_(True)  # apply_lora froze everything but the adapter; the new head must learn
    elif method == "low_lr":
        epochs, lr = cfg.low_epochs, cfg.low_lr
    elif method in ("replay", "self-replay"):
        k = int(cfg.n_train * cfg.replay_fraction)
        xa, ya = train_a[0][:k], train_a[1][:k]
        if method == "self-replay":  # the phase-1 model's own answers
            model.head_a.requires_grad_(True)
            with torch.no_grad():
                ya = model(xa, "a")
        n_b = cfg.n_train
        # The mixed batch's mean loss: B and replayed A examples weigh one each.
        loss_fn = lambda: (loss_b() * n_b + F.mse_loss(model(xa, "a"), ya, reduction="sum")) / (n_b + k)  # noqa: E731
    elif method == "ewc":
        ewc = EWC(model, task_fisher(model, train_a[0]), lam=cfg.ewc_lambda)
        loss_fn = lambda: loss_b() + ewc.penalty(model)  # noqa: E731
    elif method == "l2-init":
        fisher = task_fisher(model, train_a[0])
        shared = [n for n in fisher if n.startswith("shared.")]  # the pretrained weights; head_b is new (F = 0)
        mean = float(sum(fisher[n].sum() for n in shared) / sum(fisher[n].numel() for n in shared))
        ewc = EWC(model, {n: torch.full_like(f, mean) if n in shared else f for n, f in fisher.items()},
                  lam=cfg.ewc_lambda)
        loss_fn = lambda: loss_b() + ewc.penalty(model)  # noqa: E731
    elif method == "kl":
        xa = train_a[0]
        with torch.no_grad():
            teacher = model(xa, "a")  # cached once, before phase 2
        loss_fn = lambda: loss_b() + cfg.kl_beta * 0.5 * (model(xa, "a") - teacher).pow(2).mean()  # noqa: E731
    elif method == "a-gem":
        k = int(cfg.n_train * cfg.replay_fraction)
        xa, ya = train_a[0][:k], train_a[1][:k]
        optimizer = lambda params, lr: ProjectedAdam(params, lr, lambda: F.mse_loss(model(xa, "a"), ya))  # noqa: E731
    elif method == "mofo":
        optimizer = lambda params, lr: MoFOOptimizer(params, lr=lr, fraction=cfg.mofo_fraction)  # noqa: E731
    elif method == "ewc-lora":
        fisher_w = task_fisher(model, train_a[0])["shared.weight"]
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_r, dropout=0.0, targets=("shared",))
        model.head_b.requires_grad_(True)
        m = model.shared

        def loss_fn():
            delta = (m.lora_B.weight @ m.lora_A.weight) * m.scale  # ΔW = s·B·A
            return loss_b() + cfg.ewc_lambda / 2 * (fisher_w * delta.square()).sum()
    train(model, loss_fn, epochs, lr, optimizer)
    if method == "wise-ft":
        with torch.no_grad():
            for p, p0 in zip(model.shared.parameters(), (start["shared.weight"], start["shared.bias"])):
                p.copy_(torch.lerp(p0, p, cfg.wise_alpha))  # head_b is new: it has no θ⁰ to return to
    if method in ("ties", "dare"):
        generator = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for p, p0 in zip(model.shared.parameters(), (start["shared.weight"], start["shared.bias"])):
                tau = p - p0
                p.copy_(p0 + (ties_merge([tau], 0.2) if method == "ties" else dare(tau, 0.9, generator)))
    return Row(method, loss_a_before, mse(model, "a", test_a), mse(model, "b", test_b))


def format_table(rows: list[Row]) -> str:
    lines = ["| method | task-A loss before B | task-A loss after B | forgetting ratio | task-B loss after B |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.loss_a_before:.4f} | {r.loss_a_after:.4f} | {r.ratio:.1f}x "
                     f"| {r.loss_b_after:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="all", help=f"all, or one of: {', '.join(METHODS)}")
    p.add_argument("--ewc-lambda", type=float, default=ToyConfig.ewc_lambda, help="EWC strength λ")
    p.add_argument("--replay-fraction", type=float, default=ToyConfig.replay_fraction,
                   help="replayed task-A examples per task-B example")
    p.add_argument("--seed", type=int, default=ToyConfig.seed)
    args = p.parse_args(argv)
    methods = METHODS if args.method == "all" else (args.method,)
    if args.method != "all" and args.method not in METHODS:
        raise ForgetlabError(f"unknown toy method {args.method!r} (choose from all, {', '.join(METHODS)})")
    if args.ewc_lambda < 0 or args.replay_fraction < 0:
        raise ForgetlabError("--ewc-lambda and --replay-fraction must be >= 0")
    torch.set_num_threads(1)  # the same float reduction order on any machine
    cfg = ToyConfig(ewc_lambda=args.ewc_lambda, replay_fraction=args.replay_fraction, seed=args.seed)
    print(format_table([run(m, cfg) for m in methods]))


if __name__ == "__main__":
    run_cli(main)
