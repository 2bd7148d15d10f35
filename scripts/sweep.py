"""A grid of forgetting mitigations x seeds through train.py: the learning-versus-forgetting picture.

    python scripts/sweep.py                                           # full, lora, ewc, replay x seeds 0,1,2
    python scripts/sweep.py --methods full,ewc,l2-init --grid ewc.lambda=0.1,0.5,2 --grid lr=1e-4,2e-4 --eval quick
    python scripts/sweep.py --methods full,lora,ewc --baseline full    # + each run against full, paired by item
    python scripts/sweep.py --quick                                   # a tiny random model, seconds per run
    python scripts/sweep.py --protocol configs/study.json --results results/study --jobs 2   # the study
    python scripts/sweep.py --report results/study                    # its tables and figures, rebuilt

--protocol runs a study fixed in advance (settings chosen on dev by a coded rule, then seeds reported on test)
and keeps one small record per run in --results; --report rebuilds its report from those records alone. Both are
described in scripts/study.py; the rest of this docstring is about free grids.

Each grid point is one `python train.py ...` run in its own process, written to DIR/<run-name>/ (DIR = --out,
default runs/sweep). A run whose results.json exists is skipped, so an interrupted sweep picks up where it
stopped (an unfinished run's directory is cleared and the run starts over). Flags that sweep.py does not know
are passed to every train.py run (e.g. --eval quick, --epochs 1); they are recorded per run, and resuming
a run with different flags is refused rather than silently mixed.

Grid axes: `--grid KEY=V1,V2,...`, repeatable. KEY is a train.py setting every method has (`lr`, `epochs`,
`replay-fraction`, ...) or a method option by its `--help` name (`ewc.lambda`, `lora.r`, `kl.beta`: see
methods.option_keys); a method option applies only to the methods that read it (`ewc.lambda` to ewc and
ewc-lora), the others keep their preset. The grid is every method × the values of each key it reads × every
seed, seeds innermost.

The base model is evaluated once: the runs after the first read its evaluation from train.py's cache
(--eval-cache; their results.json name the file). --baseline METHOD adds, per run of another method, its paired
comparison with METHOD's run of the same seed (eval.compare_runs: per metric, the difference of the two runs'
after − before changes, item by item, with its interval and verdict).

Outputs in DIR (the csv, the table and the plot are written by scripts/sweep_report.py):
    sweep.csv   one row per finished run: this grid's, then those that earlier sweeps left in DIR, so grids
                run one after another into one DIR are tabulated and plotted together
    sweep.md    for each (method, params): the mean over seeds with its 95% Student-t interval (stats.py;
                one seed: the mean alone)
    sweep.png   domain gain (x) against forgetting (y), one point per run, the Pareto front drawn
                (needs matplotlib, an optional dependency: without it the png is skipped with a note)
    logs/       each run's console output

Columns, all read from the run's results.json ("before"/"after" = evaluation before/after fine-tuning, on the
test split of each evaluation set; see eval.py):
    recall_acc        after: trained drugs' facts asked in new words, strict-match accuracy (domain_recall)
    recall_nll        after: NLL of their reference answers, nats/token
    unseen_acc        after: the same for drugs never trained on (domain_unseen): generalization
    unseen_nll        after: NLL of the unseen drugs' reference answers
    general_qa_acc    after: general QA accuracy (chat, strict matching)
    general_nll       after: NLL of held-out general prose, nats/token
    instructions      after: instruction-following pass rate (only with --eval full)
    hellaswag, arc_easy, lambada   after: benchmark accuracy (acc_norm for hellaswag; only with --eval full)
    tokens            non-pad tokens processed in training
    wall_s            wall time of the whole train.py process (evaluations included)
    peak_mem_mb       peak resident set size of the train.py process (CPU memory), from the kernel's accounting
    recall_gain       recall_nll before − after: what the run learnt, in nats/token (higher = learnt more)
    unseen_gain       unseen_nll before − after: what of it carries to unseen drugs
    forgetting        general_nll after − before: what it forgot, in nats/token (higher = forgot more)
    qa_drop           general_qa_acc before − after
The NLLs are the primary axes: they move smoothly with the weights, while accuracies over a few dozen
questions move in coarse steps. A good mitigation sits bottom right: large gain, little forgetting.
Biderman et al. (2024, "LoRA Learns Less and Forgets Less") draw the same picture for LoRA vs full fine-tuning.
"""
import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from errors import ArgumentParser, ForgetlabError, run_cli

REPO = Path(__file__).resolve().parent.parent  # the repository root: each run starts its train.py


def sibling(name: str):
    """scripts/<name>.py: `scripts.<name>` when the tests import scripts as a package, `<name>` when the scripts
    run as scripts (scripts/ is then sys.path[0]); the project's own modules come from its install."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


# column -> (stage, eval task, metric) read from results.json
READ = dict(recall_acc=("after", "domain_recall", "accuracy"), recall_nll=("after", "domain_recall", "nll"),
            unseen_acc=("after", "domain_unseen", "accuracy"), unseen_nll=("after", "domain_unseen", "nll"),
            general_qa_acc=("after", "general_qa", "accuracy"), general_nll=("after", "ppl", "nll"),
            instructions=("after", "instructions", "pass_rate"), hellaswag=("after", "hellaswag", "acc_norm"),
            arc_easy=("after", "arc_easy", "acc"), lambada=("after", "lambada", "acc"))
COLUMNS = ["method", "params", "seed", *READ, "tokens", "wall_s", "peak_mem_mb", "recall_gain", "unseen_gain",
           "forgetting", "qa_drop", "run"]
METRICS = COLUMNS[3:-1]  # the numeric columns, averaged over seeds in sweep.md
DECIMALS = {**{k: 4 if k.endswith("nll") else 3 for k in READ}, "tokens": 0, "wall_s": 0, "peak_mem_mb": 0,
            "recall_gain": 4, "unseen_gain": 4, "forgetting": 4, "qa_drop": 3}  # in sweep.md
RESERVED = ("--out", "--method", "--seed")  # set by the sweep itself for each run (and --model with --quick)
# --quick: train.py flags for a tiny random model (4 optimizer steps, quick evaluation, no diagnostics), and 8
# Fisher examples for the methods that estimate one
QUICK_TRAIN_FLAGS = ["--eval", "quick", "--max-steps", "4", "--batch-size", "4", "--max-len", "128",
                     "--diagnostics", "none"]
QUICK_FISHER_SAMPLES = "8"


# ----------------------------------------------------------------------------- the grid

@dataclass
class Run:
    method: str
    params: dict  # grid key -> value as typed, e.g. {"ewc.lambda": "0.5", "lr": "1e-4"}
    seed: int
    control: str | None = None  # a study's control with runs of its own (study.test_groups): named after it

    @property
    def params_label(self) -> str:
        """"ewc.lambda=0.5,lr=1e-4", or "" for the method's presets."""
        return ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def name(self) -> str:
        if self.control:
            return f"{self.control}-seed{self.seed}"
        parts = [self.method] + [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in self.params.items()] + [f"seed{self.seed}"]
        return "-".join(parts)

    def train_flags(self) -> list[str]:
        flags = ["--method", self.method, "--seed", str(self.seed)]
        for key, value in self.params.items():
            flags += ["--" + key, value]
        return flags


def split_list(text: str, flag: str, kind=float) -> list[str]:
    """A comma list, each value checked to parse as `kind` but kept as typed (it names the run)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ForgetlabError(f"{flag}: empty list")
    for v in values:
        try:
            kind(v)
        except ValueError:
            raise ForgetlabError(f"{flag}: {v!r} is not {'an integer' if kind is int else 'a number'}") from None
    if len(set(values)) != len(values):
        raise ForgetlabError(f"{flag}: a value appears twice in {text!r}")
    return values


def grid_keys(methods: list[str]) -> dict[str, tuple[type, set[str] | None]]:
    """Every key --grid accepts for these methods: {key: (value type, the methods that read it; None = all)}.
    The numeric train.py settings apply to every method; a method option (methods.option_keys) to its readers."""
    import dataclasses

    from methods import REGISTRY, option_keys
    from train_config import TrainConfig

    keys = {f.name.replace("_", "-"): (f.type, None)
            for f in dataclasses.fields(TrainConfig) if f.type in (int, float)}
    for m in methods:
        for key, (_, _, typ) in option_keys(REGISTRY[m]).items():
            if typ in (int, float):
                keys[key] = (typ, (keys[key][1] if key in keys else set()) | {m})
    return keys


def parse_grid(specs: list[str], methods: list[str]) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 (repeatable) -> {key: values}, each key and value checked before any run."""
    keys, axes = grid_keys(methods), {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not sep or key not in keys:
            known = ", ".join(sorted(keys))
            raise ForgetlabError(f"--grid {spec!r}: expected KEY=V1,V2,... with KEY one of: {known}")
        if key in axes:
            raise ForgetlabError(f"--grid: {key} is given twice")
        axes[key] = split_list(values, f"--grid {key}", keys[key][0])
    return axes


def expand_grid(methods: list[str], seeds: list[int], axes: dict[str, list[str]]) -> list[Run]:
    """Every method x the values of each key it reads x every seed, seeds innermost."""
    readers = grid_keys(methods)
    runs = []
    for method in methods:
        combos = [{}]
        for key, values in axes.items():
            applies_to = readers[key][1]
            if applies_to is None or method in applies_to:
                combos = [{**c, key: v} for c in combos for v in values]
        runs += [Run(method, c, seed) for c in combos for seed in seeds]
    return runs


# ----------------------------------------------------------------------------- running

def quick_model(out: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (model.tiny), in out/tiny-model (made once)."""
    from model.convert_gguf import prepare_default_model
    from model.tiny import save_tiny_model

    path = out / "tiny-model"
    if all((path / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return path
    return save_tiny_model(path, like=prepare_default_model())


def peak_rss_mb(rusage) -> float:
    """ru_maxrss is in kilobytes on Linux, in bytes on macOS."""
    return rusage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def run_train(argv: list[str], log: Path, env: dict) -> tuple[int, float, float, float]:
    """Run train.py with argv in a child process, its output to `log`. Returns (exit code, wall seconds,
    peak RSS of the child in MiB, its CPU seconds (user + system)), from the kernel's own accounting of that
    one process."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
        try:
            _, status, rusage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, peak_rss_mb(rusage), rusage.ru_utime + rusage.ru_stime


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_all(runs: list[Run], out: Path, extra: list[str], env: dict, quick_flags: dict | None = None) -> list[str]:
    """Run every unfinished grid point (quick_flags: extra train.py flags per method); returns the names of the
    runs that failed."""
    quick_flags = quick_flags or {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failed = []
    for i, run in enumerate(runs, 1):
        run_dir = out / run.name
        argv = [*run.train_flags(), *extra, *quick_flags.get(run.method, []), "--out", str(run_dir)]
        label = f"[{i}/{len(runs)}] {run.name}"
        if (run_dir / "results.json").is_file():
            check_same_flags(run_dir, argv, out)
            print(f"{label}: done before, skipped", file=sys.stderr)
            continue
        if run_dir.exists():
            print(f"{label}: clearing an unfinished run", file=sys.stderr)
            shutil.rmtree(run_dir)
        print(f"{label}: running", file=sys.stderr)
        log = out / "logs" / f"{run.name}.log"
        code, wall, peak, _ = run_train(argv, log, env)
        if code != 0 or not (run_dir / "results.json").is_file():
            print(f"{label}: FAILED (exit {code}); the end of {log}:\n{tail(log)}", file=sys.stderr)
            failed.append(run.name)
            continue
        record = dict(method=run.method, params=run.params, seed=run.seed, argv=argv, wall_s=wall, peak_rss_mb=peak)
        (run_dir / "sweep.json").write_text(json.dumps(record, indent=2))
        print(f"{label}: done in {wall:.0f} s", file=sys.stderr)
    return failed


def check_same_flags(run_dir: Path, argv: list[str], out: Path):
    """ForgetlabError if the finished run was made with other train.py flags. Paths inside the sweep directory
    are compared relative to it, so a moved sweep directory still resumes."""
    record = run_dir / "sweep.json"
    if record.is_file():
        before = json.loads(record.read_text())["argv"]
        old_out = Path(before[before.index("--out") + 1]).parent if "--out" in before else out
        relative = lambda args, root: [a.replace(str(root), "{sweep}") for a in args]  # noqa: E731
        if relative(before, old_out) != relative(argv, out):
            raise ForgetlabError(f"{run_dir}: finished with other train flags ({' '.join(before)}); "
                                 f"use another --out for this sweep")


# ----------------------------------------------------------------------------- the study (scripts/study.py)

STUDY_RESERVED = ("--out", "--before")  # per run and machine: not part of what a run record must match


def study_argv(protocol: dict, run: Run) -> list[str]:
    """The train.py flags of one study run, but --out and --before."""
    return [*protocol["train_flags"], *run.train_flags(), "--eval-split", "all"]  # the run's own flags win


def study_record(run: Run, run_dir: Path, argv: list[str], wall: float, cpu: float, peak: float) -> dict:
    """What results/ keeps of a finished run: no weights, no prompts or responses, the per-item scores."""
    study = sibling("study")

    results = json.loads((run_dir / "results.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    kl = (results.get("diagnostics") or {}).get("kl_to_base")  # diagnostics.py; absent with --diagnostics none
    return dict(method=run.method, params=run.params, seed=run.seed, argv=argv, config=config, training=results["training"],
                wall_s=round(wall, 1), cpu_s=round(cpu, 1), peak_rss_mb=round(peak), items=study.compact(results["after"]),
                **({"kl_to_base": {k: kl[k] for k in ("kl", "kl_ci", "n")}} if kl else {}),
                **({"control": run.control} if run.control else {}))


def run_protocol(protocol_file: str, results: Path, out: Path, jobs: int, env: dict) -> list[str]:
    """Run the study's two stages into `results` (resuming from the records it holds); returns failed runs."""
    study, study_report = sibling("study"), sibling("study_report")
    from concurrent.futures import ThreadPoolExecutor

    from errors import read_json_object
    from model.checkpoint import write_atomic_text

    import train
    from methods import get_method

    protocol = read_json_object(protocol_file, "study protocol")
    try:  # an unknown method or a bad train flag fails now, not after hours of other runs
        for m in [*protocol.get("methods", {}), *(c.get("method") for c in protocol.get("controls", {}).values())]:
            get_method(m)
        protocol = study.check_protocol(protocol, protocol_file, grid_keys)
        first = protocol["seeds"][0]
        for m in protocol["methods"]:
            for params in study.settings(protocol, m):
                train.parse_config([*study_argv(protocol, Run(m, params, first)), "--out", str(out / "not-made")])
    except ForgetlabError as e:
        raise ForgetlabError(str(e) if str(e).startswith(protocol_file) else f"{protocol_file}: {e}") from None
    saved = results / "protocol.json"
    if saved.is_file() and (why := study.amendment_error(json.loads(saved.read_text()), protocol)):
        raise ForgetlabError(f"{saved} holds another protocol's runs ({why}): use another --results directory")
    (results / "runs").mkdir(parents=True, exist_ok=True)
    write_atomic_text(saved, json.dumps(protocol, indent=2) + "\n")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    before, failed = out / "before.json", []
    threads = str(max(1, (os.cpu_count() or 1) // jobs))

    def one(run: Run, alone: bool = False):
        argv, record = study_argv(protocol, run), results / "runs" / f"{run.name}.json"
        run_dir, log = out / run.name, out / "logs" / f"{run.name}.log"
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts over
        extra = ["--before", str(before)] if before.is_file() else []
        print(f"study: {run.name}: running", file=sys.stderr)
        code, wall, peak, cpu = run_train([*argv, *extra, "--out", str(run_dir)], log,
                                          {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or
                                           (str(os.cpu_count() or 1) if alone else threads)})
        if code != 0 or not (run_dir / "results.json").is_file():
            print(f"study: {run.name}: FAILED (exit {code}); the end of {log}:\n{tail(log)}", file=sys.stderr)
            failed.append(run.name)
            return
        if not before.is_file():
            shutil.copyfile(run_dir / "before.json", before)
            saved_before = json.loads(before.read_text())
            base = dict(weights_sha256=saved_before["weights_sha256"], eval=saved_before["eval"],
                        items=study.compact(saved_before["results"]))
            if (results / "base.json").is_file():  # a later sitting evaluated the base again: does it reproduce?
                kept, (n, differ, largest), added = study.later_base(
                    json.loads((results / "base.json").read_text()), base)
                print(f"study: the base model evaluated again in this sitting: {differ} of {n} items differ from "
                      f"{results / 'base.json'} (largest score difference {largest:.5f}); the report reads "
                      f"base.json", file=sys.stderr)
                if added:
                    write_atomic_text(results / "base.json", json.dumps(kept) + "\n")
                    print(f"study: base.json gains the tasks this sitting's level has and it lacked: "
                          f"{', '.join(added)}", file=sys.stderr)
            else:
                write_atomic_text(results / "base.json", json.dumps(base) + "\n")
        write_atomic_text(record, json.dumps(study_record(run, run_dir, argv, wall, cpu, peak)) + "\n")
        print(f"study: {run.name}: done in {wall:.0f} s", file=sys.stderr)

    def execute(runs: list[Run]):
        todo = []
        for run in {r.name: r for r in runs}.values():  # once each: a control may be a method's own setting
            record = results / "runs" / f"{run.name}.json"
            if record.is_file():
                if json.loads(record.read_text()).get("argv") != study_argv(protocol, run):
                    raise ForgetlabError(f"{record}: made with other train.py flags than this protocol gives")
                continue
            todo.append(run)
        if todo and not before.is_file():  # the first run evaluates the base model, alone; the rest reuse it
            one(todo.pop(0), alone=True)
            if not before.is_file():
                return
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, todo))

    execute([Run(m, p, first) for m in protocol["methods"] for p in study.settings(protocol, m)])
    if not (results / "base.json").is_file():
        raise ForgetlabError(f"the first study run failed ({', '.join(failed)}), so the base model was not evaluated: "
                             f"see {out / 'logs'}")
    _, base, records = study.read_results_dir(results)
    chosen = study.select(protocol, [r for r in study_report.rows_of(protocol, base, records) if r["split"] == "dev"])
    print("study: chosen on dev: " + "; ".join(f"{m} {study.label(c['params'])}" for m, c in chosen.items()),
          file=sys.stderr)
    groups = study.test_groups(protocol, chosen)
    # seed by seed, so that an interrupted study leaves every method (and control) with as many seeds as the others
    execute([Run(m, params, s, own) for s in protocol["seeds"] for _, m, params, own in groups])
    return failed


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--seed 3" must not be read as "--seeds 3", nor any train.py flag as a sweep flag
    p = ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Other flags are passed to every train.py run.")
    p.add_argument("--methods", default="full,lora,ewc,replay", help="comma list of train.py methods")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis, repeatable: a train.py setting (lr, replay-fraction, ...) or a method option "
                        "(ewc.lambda, lora.r, ...), applied to the methods that read it")
    p.add_argument("--baseline", metavar="METHOD",
                   help="add to sweep.md each run's paired comparison with this method's run of the same seed "
                        "(eval.py --compare: mine's change minus the baseline's, per metric, item by item)")
    p.add_argument("--out", default="runs/sweep", help="sweep directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny random model with SmolLM2's tokenizer, 4 steps, quick eval: for tests and smoke runs")
    p.add_argument("--protocol", metavar="FILE",
                   help="run the study FILE describes (scripts/study.py: settings chosen on dev, seeds reported on "
                        "test) into --results, resuming from the runs it holds; then --report it")
    p.add_argument("--results", metavar="DIR", help="with --protocol: where the run records and report go")
    p.add_argument("--jobs", type=int, default=1, help="with --protocol: runs side by side (each gets "
                                                       "cores / jobs threads)")
    p.add_argument("--report", metavar="DIR",
                   help="rebuild DIR's study tables and figures from its protocol.json, base.json and runs/ alone")
    return p


def main_study(args, extra):
    """--protocol / --report: the study, its runs in --out (weights, logs) and its records in --results."""
    study_report = sibling("study_report")

    if extra:
        raise ForgetlabError(f"--protocol and --report take no train.py flags (the protocol holds them): {extra[0]}")
    failed = []
    if args.protocol:
        if not args.results:
            raise ForgetlabError("--protocol needs --results DIR, where the run records go")
        if args.jobs < 1:
            raise ForgetlabError(f"--jobs must be >= 1, got {args.jobs}")
        out = Path(args.out if args.out != "runs/sweep" else "runs/study").resolve()
        failed = run_protocol(args.protocol, Path(args.results), out, args.jobs, dict(os.environ))
    results = Path(args.report or args.results)
    written = study_report.write_report(results)
    print((results / "study.md").read_text())
    print(f"wrote {', '.join(str(results / w) for w in written)}", file=sys.stderr)
    if failed:
        raise ForgetlabError(f"{len(failed)} study runs failed ({', '.join(failed)}): see their logs")


def main(argv=None):
    args, extra = build_parser().parse_known_args(argv)
    if args.protocol or args.report:
        return main_study(args, extra)
    for flag in RESERVED + (("--model",) if args.quick else ()):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ForgetlabError(f"{flag} is set by the sweep for each run; it cannot be passed through")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from methods import get_method, load_method_file
    if "--method-file" in extra[:-1]:
        load_method_file(extra[extra.index("--method-file") + 1])  # so that its methods can be checked here
    for m in methods:
        get_method(m)  # an unknown name fails now, not after hours of other runs
    if args.baseline and args.baseline not in methods:
        raise ForgetlabError(f"--baseline {args.baseline}: not one of --methods ({', '.join(methods)})")
    import train
    train.parse_config([*extra, "--method", methods[0]])  # so does a bad pass-through train flag
    seeds = [int(s) for s in split_list(args.seeds, "--seeds", int)]
    runs = expand_grid(methods, seeds, parse_grid(args.grid, methods))
    for run in runs:  # every grid point's flags and option values, before the first run (e.g. --ewc.lambda -1)
        try:
            train.parse_config([*(QUICK_TRAIN_FLAGS if args.quick else []), *extra, *run.train_flags()])
        except ForgetlabError as e:
            raise ForgetlabError(f"grid point {run.name}: {e}") from None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    quick_flags = {}
    if args.quick:
        extra = [*QUICK_TRAIN_FLAGS, *extra, "--model", str(quick_model(out))]
        readers = grid_keys(methods).get("ewc.fisher-samples", (None, set()))[1]
        quick_flags = {m: ["--ewc.fisher-samples", QUICK_FISHER_SAMPLES] for m in readers or ()}
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model's ops are too small to share between threads
    print(f"sweep: {len(runs)} runs into {out}", file=sys.stderr)
    failed = run_all(runs, out, extra, env, quick_flags)

    sweep_report = sibling("sweep_report")
    grid = {r.name for r in runs}
    finished = [(r, out / r.name) for r in runs]
    finished += [(r, d) for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in grid)
                 if (r := sweep_report.recorded_run(d)) is not None]
    rows = [sweep_report.collect_row(r, d) for r, d in finished if (d / "results.json").is_file()]
    sweep_report.write_csv(rows, out / "sweep.csv")
    table = sweep_report.summary_table(rows)
    paired = sweep_report.baseline_table(runs, out, args.baseline) if args.baseline else ""
    (out / "sweep.md").write_text(f"# Sweep: {len(rows)} runs\n\nmean over seeds [95% t interval]; column "
                                  f"definitions in scripts/sweep.py.\n\n{table}\n{paired}")
    plotted = sweep_report.plot(rows, out / "sweep.png")
    print(table)
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.md'}" + (f", {out / 'sweep.png'}" if plotted else ""),
          file=sys.stderr)
    if failed:
        raise ForgetlabError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}): see {out / 'logs'}")


if __name__ == "__main__":
    run_cli(main)
