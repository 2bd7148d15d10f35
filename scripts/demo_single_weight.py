"""Forgetting and EWC with a single weight: where w settles between two tasks' optima, in closed form and by
gradient descent.

    python scripts/demo_single_weight.py
    python scripts/demo_single_weight.py --a 2 --b -1 --lambdas 0,0.1,1,10,100

One weight w. Task A's loss is (w − a)², optimum a; task B's loss is (w − b)², optimum b. Train on A (w = a),
then fine-tune on B: gradient descent slides w from a to b, and task A's loss grows from 0 to (a − b)²:
forgetting, in one dimension.

EWC (Kirkpatrick et al. 2017) fine-tunes on B with a penalty that holds w near the old optimum a, weighted by
how much task A cares about w, the Fisher information F of task A at w = a:

    L(w) = (w − b)² + λ/2 · F · (w − a)²

The Fisher. Read task A as a Gaussian likelihood with unit variance around the prediction w:
p(y | w) = N(y; w, 1), so −log p = ½ (y − w)² + const (task A's data is y = a, and (w − a)² is twice this
negative log-likelihood). The score is ∂ log p / ∂w = y − w, and

    F = E_{y∼p(·|w)}[(y − w)²] = Var(y) = 1,      at w = a as everywhere.

(The empirical Fisher, the squared score on the data itself, (a − w)² at w = a, is 0: the reason EWC needs
the expectation over the model's own predictions, or many data points, not the data gradient at the optimum.)

Setting dL/dw = 2 (w − b) + λ F (w − a) = 0 gives

    w* = (2b + λ F a) / (2 + λ F)

a weighted mean of the two optima: w* = b at λ = 0 (plain fine-tuning, A forgotten), w* → a as λ → ∞
(nothing learnt of B), moving monotonically between them. The demo puts the penalty through ewc.EWC and the
weight through torch.optim.SGD, and prints the closed form beside where gradient descent ends.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from errors import ArgumentParser, ForgetlabError, run_cli
from ewc import EWC

FISHER = 1.0  # unit-variance Gaussian likelihood: F = Var(y) = 1 (see the module docstring)


class OneWeight(nn.Module):
    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w), dtype=torch.float64))


def fine_tune(a: float, b: float, lr: float = 0.1, steps: int = 50) -> list[float]:
    """Plain fine-tuning on B from w = a: w after each step, [w_0 = a, w_1, ..., w_steps].
    Each step is w ← w − lr · 2 (w − b), so w − b shrinks by (1 − 2 lr) per step."""
    model = OneWeight(a)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    trajectory = [model.w.item()]
    for _ in range(steps):
        opt.zero_grad()
        ((model.w - b) ** 2).backward()
        opt.step()
        trajectory.append(model.w.item())
    return trajectory


def ewc_closed_form(a: float, b: float, lam: float, fisher: float = FISHER) -> float:
    """argmin_w (w − b)² + λ/2 F (w − a)² = (2b + λ F a) / (2 + λ F)."""
    return (2 * b + lam * fisher * a) / (2 + lam * fisher)


def ewc_descent(a: float, b: float, lam: float, fisher: float = FISHER, steps: int = 100) -> float:
    """Where SGD on (w − b)² + ewc.penalty ends, from w = a (the end of task A, EWC's anchor).

    The objective's curvature is c = 2 + λF, and a step of size lr multiplies the distance to the minimum by
    (1 − lr·c): lr = 0.5 / c halves it at every λ (a fixed lr would diverge once λF > 2/lr − 2), so 100 steps
    end within 1e-12 of it. Any gap to the closed form would be a bug in the penalty, not slow convergence."""
    model = OneWeight(a)
    ewc = EWC(model, {"w": torch.tensor(fisher, dtype=torch.float64)}, lam=lam, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 / (2 + lam * fisher))
    for _ in range(steps):
        opt.zero_grad()
        ((model.w - b) ** 2 + ewc.penalty(model)).backward()
        opt.step()
    return model.w.item()


@dataclass
class EWCRow:
    lam: float
    closed_form: float
    descent: float
    loss_a: float  # (w − a)² at the descent result
    loss_b: float  # (w − b)²


def ewc_table(a: float, b: float, lambdas, fisher: float = FISHER) -> list[EWCRow]:
    rows = []
    for lam in lambdas:
        w = ewc_descent(a, b, lam, fisher)
        rows.append(EWCRow(lam, ewc_closed_form(a, b, lam, fisher), w, (w - a) ** 2, (w - b) ** 2))
    return rows


def format_report(a: float, b: float, trajectory: list[float], rows: list[EWCRow]) -> str:
    lines = [f"Task A: (w - {a:g})^2, task B: (w - {b:g})^2. After task A, w = {a:g} and task-A loss = 0.", "",
             "Plain fine-tuning on B (SGD, lr 0.1):", "",
             "| step | w | task-A loss | task-B loss |", "|---:|---:|---:|---:|"]
    for step in sorted({0, 1, 2, 5, 10, 20, len(trajectory) - 1}):
        if step < len(trajectory):
            w = trajectory[step]
            lines.append(f"| {step} | {w:.4f} | {(w - a) ** 2:.4f} | {(w - b) ** 2:.4f} |")
    lines += ["", f"EWC on B: (w - {b:g})^2 + lambda/2 * F * (w - {a:g})^2 with F = {FISHER:g}; "
                  "w* = (2b + lambda F a) / (2 + lambda F):", "",
              "| lambda | w* closed form | w* gradient descent | task-A loss | task-B loss |",
              "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.lam:g} | {r.closed_form:.4f} | {r.descent:.4f} | {r.loss_a:.4f} | {r.loss_b:.4f} |")
    return "\n".join(lines)


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ForgetlabError(f"--lambdas: expected comma-separated numbers, got {text!r}") from None


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", type=float, default=2.0, help="task A's optimum")
    p.add_argument("--b", type=float, default=-1.0, help="task B's optimum")
    p.add_argument("--lambdas", default="0,0.1,1,10,100", help="EWC strengths, comma-separated")
    args = p.parse_args(argv)
    lambdas = parse_floats(args.lambdas)
    if any(lam < 0 for lam in lambdas):
        raise ForgetlabError(f"--lambdas: lambda must be >= 0, got {args.lambdas!r}")
    torch.set_num_threads(1)  # a few hundred scalar steps: a second thread only adds synchronisation
    print(format_report(args.a, args.b, fine_tune(args.a, args.b), ewc_table(args.a, args.b, lambdas)))


if __name__ == "__main__":
    run_cli(main)
