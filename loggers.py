"""Metric loggers beside metrics.jsonl (which every run writes): `train.py --log tensorboard,wandb`.

    tensorboard  <out>/tensorboard/: event files for `tensorboard --logdir <out>` (the `tensorboard` package)
    wandb        a Weights & Biases run in <out>/wandb/, offline unless WANDB_MODE says otherwise, so that it
                 works without a network; `wandb sync <out>/wandb/offline-run-*` uploads it later (`wandb`)

Each logs the scalars of every step's metrics.jsonl line (loss, lr, grad_norm, tokens_per_second, extra_loss)
and, at the end, each evaluated metric before and after (`eval/<task>/<metric>/before|after`). Both packages
are optional: asking for one that is not installed is a one-line error before anything slow.
"""
import os
from pathlib import Path

from errors import ForgetlabError

KINDS = ("tensorboard", "wandb")
STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_second", "extra_loss")


def parse_kinds(spec: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in (spec or "").split(",") if k.strip())
    for k in kinds:
        if k not in KINDS:
            raise ForgetlabError(f"--log {k}: unknown logger (choose from {', '.join(KINDS)}; metrics.jsonl is "
                                 "always written)")
    return kinds


def check_available(spec: str):
    """Each asked-for logger's package imports, checked before the run's first slow step."""
    for kind in parse_kinds(spec):
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise ForgetlabError(f"--log {kind}: the {kind} package is not installed (pip install {kind})") from None


class MetricLoggers:
    """The loggers of --log, opened in the run's output directory; `log(record)` per step, `close()` at the end."""

    def __init__(self, spec: str, out: Path, config: dict):
        self.writers = {}
        for kind in parse_kinds(spec):
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writers[kind] = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
            else:
                import wandb

                self.writers[kind] = wandb.init(project="forgetlab", name=Path(out).name, dir=str(out), config=config,
                                                mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict, step: int):
        scalars = {k: float(record[k]) for k in STEP_SCALARS if isinstance(record.get(k), (int, float))}
        self._write({f"train/{k}": v for k, v in scalars.items()}, step)

    def log_evaluation(self, comparison: dict | None, step: int):
        """Each compared metric's value before and after (the forgetting report's rows)."""
        if not comparison:
            return
        values = {}
        for row in comparison["metrics"]:
            values[f"eval/{row['task']}/{row['metric']}/before"] = float(row["before"])
            values[f"eval/{row['task']}/{row['metric']}/after"] = float(row["after"])
        self._write(values, step)

    def _write(self, values: dict, step: int):
        for kind, w in self.writers.items():
            if kind == "tensorboard":
                for k, v in values.items():
                    w.add_scalar(k, v, step)
            elif values:
                w.log(values, step=step)

    def close(self):
        for kind, w in self.writers.items():
            w.close() if kind == "tensorboard" else w.finish()
        self.writers = {}
