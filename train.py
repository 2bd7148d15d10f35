"""Fine-tune a Llama on a domain dataset with a forgetting mitigation, and measure what it forgot.

    python train.py --method ewc                       # end to end, on the default model and data
    python train.py --method lora --replay-fraction 0.15
    python train.py --method ewc --ewc.lambda 2        # a method's options: --NAME.OPTION, listed by --help
    python train.py --method-file my_method.py --method l1-init
    python train.py --method lora --out runs/a --save-every 50        # killed? run it again with --resume:
    python train.py --method lora --out runs/a --save-every 50 --resume
    torchrun --nproc_per_node 8 train.py --method ewc --fsdp     # several GPUs: DDP, or FSDP2 with --fsdp

The run: evaluate general capability -> method setup (e.g. Fisher on general data) -> fine-tune on --data ->
method finish -> evaluate again -> write the forgetting report. `main`, first below, reads as these phases, and
the functions follow in the order a run calls them. The loop, `train`, is plain PyTorch, top to bottom: AdamW,
warmup then cosine/linear/constant decay, gradient accumulation, clipping, bf16 autocast on CUDA with float32
master weights. Around it: the command line in train_config.py, the method's hooks in methods/ (base.py is the
contract), the output directory's files in outputs.py (config.json, before.json, results.json, report.md, the
model or adapter), and the resumable checkpoints in train_state.py.

Reliability: a run killed at any point and resumed with --resume ends with the same weights, bit for bit on
CPU, as one never interrupted (the data order is a function of (seed, epoch), and the weights, optimizer, method
and RNG states are restored). A non-finite loss or gradient stops the run with the step and the cause, leaving
the last checkpoint intact (--skip-nonfinite N skips up to N such batches instead); NaN or inf weights are never
saved. Outputs are written to a temporary name and renamed, and a run that stops before its first checkpoint
removes its directory (outputs.run_directory).

Several processes (torchrun, see distributed.py): --batch-size is the global micro-batch, each rank trains on
its own rows of it, and the per-step losses are those of one process; rank 0 evaluates and writes every output,
config.json records world_size, backend and fsdp.
"""

import contextlib
import copy
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
from data import (batches_by_length, create_replay_dataset, load_dataset, micro_batch_stream, split_held_out,
                  tokenize_dataset)
from diagnostics import diagnose
from errors import ForgetlabError, recorded_path, run_cli
from eval import DOMAIN_TASKS, LEVELS, TASKS, evaluate, load_task_rows
from loggers import MetricLoggers
from methods import Method
from methods.lora import check_lora_targets
from model import load_pretrained
from model.checkpoint import load_model, weights_sha256
from outputs import (cached_evaluation, provenance, read_before, run_directory, run_summary, save_outputs,
                     write_config, write_results)
from train_config import TrainConfig, output_dir, parse_config, resolve_device, run_context
from train_state import (Progress, count_nonfinite, find_resumable, nonfinite_cause, resume, skip_or_stop,
                         write_checkpoint)


def main(argv=None):
    t_start = time.time()
    cfg, method = parse_config(argv)  # flags, --method-file, and --resume's run directory, all checked
    device, backend, out = start(cfg, method)

    # -- load: every input is checked here, before the first slow step (the "before" evaluation)
    model, tok, data = load_inputs(cfg, method, device)
    run_ctx = run_context(cfg, tok, data, device)
    method.check(model, run_ctx)  # the method's own inputs, e.g. EWC's --fisher file against this model
    check_lora_targets(method, model)
    found = find_resumable(out, len(data.train_set), data.total_steps) if cfg.resume else None
    base_sha = weights_sha256(model)  # the base model's identity: the evaluation cache's key, and the record's
    seconds = dict(load=time.time() - t_start)
    with run_directory(out, model, cfg):  # a run that stops before its first checkpoint leaves nothing behind

        # -- before: evaluate the base model, then let the method set itself up on it
        with timed(seconds, "eval_before"):
            before = evaluate_before(model, tok, cfg, base_sha)
        with timed(seconds, "setup"):
            counts = set_up_method(method, model, run_ctx, data)
        config = write_config(cfg, method, device, backend, data, out, before,
                              provenance(["python", "train.py", *(sys.argv[1:] if argv is None else argv)],
                                         input_files(cfg, method), base_sha))
        log = MetricLoggers(cfg.log if distributed.is_main() else "", out, config)  # --log, besides metrics.jsonl

        # -- train (resuming: from the checkpoint found above; resume() restores its RNG states, so nothing may
        # draw after it)
        forward, optimizer, twin = prepare_training(cfg, model, method, device)
        run = Progress()
        if cfg.resume:
            run = resume(found, out, model, optimizer, method, data.total_steps, out / "metrics.jsonl")
        stream = micro_batch_stream(data.train_set, cfg, tok.pad_id, start=run.step)
        seconds["train"], tokens_now = train(cfg, model, forward, optimizer, method, stream, data, run, out, config,
                                             log)
        method.finish(model)
        model.eval()

        # -- save, evaluate again, report
        after, variants, diagnostics = save_and_evaluate_after(model, twin, tok, cfg, method, out, device, seconds,
                                                               data)
        if not distributed.is_main():
            return None
        summary = run_summary(method, counts, data, run, seconds, tokens_now, t_start, before)
        base = before and {k: before[k] for k in ("eval", "eval_split", "weights_sha256")}
        results = write_results(out, method, before and before["results"], after, summary,
                                variants if before else None, base, diagnostics)
        log.log_evaluation(results.get("comparison"), run.step)
        log.close()
        return results


def start(cfg, method) -> tuple[str, str | None, Path]:
    """Join the process group under torchrun (gloo on CPU, NCCL on CUDA: this rank's GPU; alone, nothing changes),
    check what distribution asks of the flags, and fix the output directory (rank 0's timestamp, if it is one)."""
    device, backend = distributed.init(resolve_device(cfg.device), cfg.fsdp, cfg.backend)
    distributed.check_batch_size(cfg.batch_size)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return device, backend, Path(distributed.broadcast_object(str(output_dir(cfg, method))))


@dataclass
class Data:
    """The tokenized training inputs and the step counts they give."""
    domain: list  # the tokenized domain examples
    train_set: list  # domain examples, with the replayed general ones mixed in (--replay-fraction)
    replayed: list  # the positions in train_set of the replayed general examples, in order
    general: list  # tokenized --general-data for the method's setup; [] when neither the method nor replay uses it
    n_domain: int
    truncated: int
    truncated_general: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def load_inputs(cfg, method, device) -> tuple:
    """(model, tokenizer, Data): every input read and checked, before anything slow happens or anything is
    written. The data files are read first, so that a bad one fails before the model is even loaded."""
    needs_general = method.needs_general_data or cfg.replay_fraction > 0 or cfg.realign_steps > 0
    domain_rows = load_dataset(cfg.data)
    if cfg.domain_eval:  # its rows checked now, not after the training
        load_task_rows("domain_recall", cfg.domain_eval)
    elif "domain_heldout" in domain_evaluation(cfg):  # your own data: a tenth of it measures what the run learnt
        domain_rows, held = split_held_out(domain_rows)
        if not domain_rows or not held:
            raise ForgetlabError(f"{cfg.data}: too few rows to keep a tenth out of training for the domain "
                                 f"evaluation ({len(domain_rows) + len(held)}); give --domain-eval FILE")
    general_rows = load_dataset(cfg.general_data) if needs_general else []
    model, tok = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    domain, n_trunc = tokenize_dataset(tok, domain_rows, cfg.max_len)
    general, n_trunc_general = tokenize_dataset(tok, general_rows, cfg.max_len)
    if not domain:
        raise ForgetlabError(f"{cfg.data}: no example has an answer token left within --max-len {cfg.max_len}")
    if needs_general and not general:
        raise ForgetlabError(f"{cfg.general_data}: no example has an answer token left within --max-len {cfg.max_len}")
    train_set = domain
    if cfg.replay_fraction > 0:
        train_set = create_replay_dataset(domain, general, cfg.replay_fraction, cfg.seed)
    in_domain = {id(e) for e in domain}
    replayed = [i for i, e in enumerate(train_set) if id(e) not in in_domain]
    n_batches = math.ceil(len(train_set) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = int(math.ceil(cfg.warmup * total_steps))
    if distributed.is_main():
        print(f"{len(domain)} domain examples ({n_trunc} truncated to {cfg.max_len} tokens), "
              f"{len(train_set) - len(domain)} replay; {total_steps} steps of {cfg.batch_size}x{cfg.grad_accum}",
              file=sys.stderr)
    return model, tok, Data(domain, train_set, replayed, general, len(domain), n_trunc, n_trunc_general,
                            steps_per_epoch, total_steps, warmup_steps)


def input_files(cfg, method) -> dict:
    """{flag: file} of the data the run reads, whose sha256 the record keeps."""
    files = dict(data=cfg.data)
    if method.needs_general_data or cfg.replay_fraction > 0:
        files["general_data"] = cfg.general_data
    if cfg.method_file:
        files["method_file"] = cfg.method_file
    return files


def evaluate_before(model, tok, cfg, base_sha: str) -> dict | None:
    """The base model's evaluation as the record before.json holds ({eval, eval_split, weights_sha256, results}):
    read back (--before, --resume, or the evaluation cache: outputs.evaluation_cache_file), else evaluated by
    rank 0 while the others wait, and cached; None with --eval none."""
    if cfg.eval == "none":
        return None
    record = dict(eval=cfg.eval, eval_split=cfg.eval_split, weights_sha256=base_sha)
    domain = domain_evaluation(cfg)
    if cfg.domain_eval or "domain_heldout" in domain:  # not the drug sets: the record and the cache key say which
        record["domain"] = {t: recorded_path(os.path.abspath(f)) for t, f in domain.items()}
    before = read_before(cfg, record)
    if before is None and distributed.is_main():
        before = cached_evaluation(cfg, record, lambda: run_eval(model, tok, cfg, "before"), data_files=domain.values())
    return distributed.broadcast_object(before)


def set_up_method(method, model, run_ctx, data: Data):
    """The method sees the untouched model (e.g. a Fisher estimate), may replace the domain's training examples
    (sdft-rewrite: the model's rewrites) and the replayed ones (self-replay: the base model's own answers), then
    decides what trains. Returns (trainable, all) parameters."""
    method.setup(model, run_ctx)
    use_train_examples(method, model, run_ctx, data)
    if data.replayed:
        replay = method.replay_examples(model, run_ctx, [data.train_set[i] for i in data.replayed])
        for i, example in zip(data.replayed, replay, strict=True):
            data.train_set[i] = example
    method.configure(model)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def use_train_examples(method, model, run_ctx, data: Data):
    """The method's training examples (Method.train_examples) in place of the domain's, where the training set
    holds them (the replayed examples stay)."""
    replayed = set(data.replayed)
    own = [i for i in range(len(data.train_set)) if i not in replayed]
    examples = method.train_examples(model, run_ctx, [data.train_set[i] for i in own])
    if len(examples) != len(own):
        raise ForgetlabError(f"method {method.name!r}: train_examples returned {len(examples)} examples for "
                             f"{len(own)}; it must return one for each")
    for i, example in zip(own, examples):
        data.train_set[i] = example


def prepare_training(cfg, model, method, device: str):
    """(forward, optimizer, twin). Several processes: DDP around the model, or FSDP2 sharding it in place; then
    the method's per-parameter state (EWC's F and θ*) is sharded like the parameters, and a meta-device twin
    will receive the gathered weights for saving and evaluating."""
    model.gradient_checkpointing = cfg.grad_ckpt
    twin = distributed.meta_twin(model) if cfg.fsdp else None
    forward = distributed.wrap(model, cfg.fsdp, device)
    if cfg.fsdp:
        distributed.shard_method_state(method, model)
    forward = torch.compile(forward) if cfg.compile else forward  # hooks keep the raw model (its parameter names)
    optimizer = configure_optimizers(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.split(":")[0],
                                     method)
    return forward, optimizer, twin


def configure_optimizers(model, weight_decay: float, lr: float, betas, device_type: str, method=None):
    """AdamW (Loshchilov & Hutter 2019), or the method's optimizer (Method.optimizer, e.g. mofo), over trainable
    parameters: matrices and embeddings (dim >= 2) decay, norms and biases (dim < 2) do not, since shrinking a
    gain or an offset toward 0 is not a useful prior. Speed: torch's fused AdamW, one kernel over all the tensors,
    on CUDA and on CPU (BENCHMARKS.md: on CPU the per-tensor loop costs several times as long per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return (method or Method()).optimizer(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def train(cfg, model, forward, optimizer, method, stream, data: Data, run: Progress, out: Path, config: dict,
          log=None):
    """The training loop: optimizer steps run.step .. data.total_steps - 1, counted in `run`, one line each in
    metrics.jsonl (and to the --log loggers), a checkpoint every --save-every steps. Returns (seconds, tokens
    processed) of this process."""
    device = config["device"]  # as resolved, under torchrun this rank's
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
    t0, tokens_before = time.time(), run.tokens
    model.train()
    main_rank = distributed.is_main()  # the one that logs
    bar = tqdm(total=data.total_steps, initial=run.step, desc=f"train {method.name}", unit="step",
               disable=not main_rank)
    with open(out / "metrics.jsonl", "a") if main_rank else contextlib.nullcontext() as metrics, bar:
        for step in range(run.step, data.total_steps):
            lr = get_lr(step, cfg.lr, data.warmup_steps, data.total_steps, cfg.schedule)
            for g in optimizer.param_groups:
                g["lr"] = lr
            epoch, micro = next(stream)
            loss, tokens = accumulate_gradients(forward, micro, device, autocast,
                                                functools.partial(method.task_loss, model, step=step))
            extra = regularize(method, model, step)
            grad_norm = distributed.clip_grad_norm_(trainable, max_norm)  # over every rank's shards
            cause = nonfinite_cause(loss, extra, grad_norm)
            if cause is None:
                optimizer.step()
                method.after_step(model, step)
            else:
                skip_or_stop(step, cause, run, cfg)  # drops the batch, or raises past --skip-nonfinite
            optimizer.zero_grad(set_to_none=True)
            run.step, run.loss, run.tokens = step + 1, loss, run.tokens + tokens
            tok_s = (run.tokens - tokens_before) / max(time.time() - t0, 1e-9)
            record = dict(step=run.step, epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm, tokens=run.tokens,
                          tokens_per_second=tok_s, time=time.time() - t0)
            if extra is not None:
                record["extra_loss"] = float(extra.detach())
            if cause is not None:
                record["skipped"] = cause
            if main_rank:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if log is not None:
                    log.log(record, run.step)
            if cfg.save_every and (run.step % cfg.save_every == 0 or run.step == data.total_steps):
                run.checkpoint = write_checkpoint(out, model, optimizer, method, run, data, epoch, config)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
    return time.time() - t0, run.tokens - tokens_before


def get_lr(it: int, lr: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `it` (0-based): linear warmup to lr over warmup_steps, then decay to 0 at
    total_steps, cosine (Loshchilov & Hutter 2017: lr/2 (1 + cos(pi t))), linear (lr (1 - t)) or constant."""
    if it < warmup_steps:
        return lr * (it + 1) / (warmup_steps + 1)
    t = min(1.0, (it - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return lr * (1.0 - t)
    return lr


def accumulate_gradients(forward, micro_batches, device, autocast, task_loss) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches so the gradient equals that of one big batch: each
    micro-batch's mean loss is weighted by its share of the step's labelled tokens (a plain 1/grad_accum would
    overweight short batches). Returns (the step's mean loss, the non-pad tokens processed).

    Under torchrun the micro-batches are the global ones and each rank backpropagates its own rows
    (distributed.rank_slice), weighted so that the gradients DDP / FSDP2 average over the ranks are the
    single-process ones (distributed.loss_weight; 1 process: n / n_total); gradients are synchronized once, on
    the last micro-batch. task_loss(forward, batch): a micro-batch's loss (Method.task_loss; default: the labels'
    mean cross-entropy)."""
    n_total = sum(distributed.count_targets(b) for b in micro_batches)  # global: every rank holds the global batches
    active = [b for b in micro_batches if distributed.count_targets(b) > 0]
    loss_sum, tokens = 0.0, 0
    for i, b in enumerate(active):
        part = distributed.rank_slice(b)
        with distributed.gradient_sync(forward, enabled=i == len(active) - 1):
            with autocast:
                loss = task_loss(forward, {k: part[k].to(device) for k in ("input_ids", "labels", "attention_mask")})
            (loss * distributed.loss_weight(part, n_total)).backward()
        loss_sum += loss.item() * distributed.local_targets(part)
        tokens += int(b["attention_mask"].sum())
    return distributed.all_reduce_sum(loss_sum) / max(1, n_total), tokens


def regularize(method, model, step: int):
    """The method's regularizer for this step: its extra_loss backpropagated, then its add_gradient written into
    .grad. Returns their value for the log (a plain scalar tensor, summed over the ranks), or None when the method
    has neither."""
    extra = scalar_or_none(method, "extra_loss", method.extra_loss(model, step), step)
    if extra is not None and extra.requires_grad:
        extra.backward()
    added = scalar_or_none(method, "add_gradient", method.add_gradient(model, step), step)
    values = [distributed.full(v.detach()) for v in (extra, added) if v is not None]  # FSDP2: a partial sum per rank
    return sum(values[1:], values[0]) if values else None


def scalar_or_none(method, hook: str, extra, step: int):
    """What a method's extra_loss or add_gradient returned: None or a one-element tensor; anything else stops
    the run at its first step."""
    if extra is None or (torch.is_tensor(extra) and extra.numel() == 1):
        return extra
    what = f"a tensor of shape {tuple(extra.shape)}" if torch.is_tensor(extra) else f"a {type(extra).__name__}"
    raise ForgetlabError(f"step {step + 1}: method {method.name!r}: {hook} returned {what}; it must return a "
                         f"scalar tensor or None")


def save_and_evaluate_after(model, twin, tok, cfg, method, out: Path, device: str, seconds: dict, data: Data):
    """Save the model or adapter, take its diagnostics against the base model (the update's geometry, the KL on
    prompts of the training set), then evaluate it, its re-aligned copy (--realign-steps) and each of the
    method's variants (e.g. WiSE-FT's alphas). Returns (after, {label: evaluation}, the diagnostics: rank 0's,
    else None).
    Several processes: rank 0 works on the whole model (FSDP2's shards gathered) while the others wait."""
    with timed(seconds, "save"):
        if (bad := count_nonfinite(model)):  # e.g. --lr so large that the last update overflowed
            raise ForgetlabError(f"{bad:,} trainable weights are NaN or inf after the last step: nothing saved; "
                                 f"lower --lr")
        final = distributed.gathered(model, twin)
        if distributed.is_main():
            final = final.to(device)
            save_outputs(final, tok, cfg, out)
        method.save(out)  # on every rank: a sharded state is gathered first (EWC writes from rank 0)
    diagnostics = None
    with timed(seconds, "diagnostics"):
        if distributed.is_main() and cfg.diagnostics == "all":  # the saved model against its base (diagnostics.py)
            base = load_model(Path(tok.source), device=device)  # read once: the geometry's W₀ and the KL's π₀
            diagnostics = diagnose(final, base, data.domain, tok, cfg.seed)
            del base
    after, variants = None, {}
    with timed(seconds, "eval_after"):
        if distributed.is_main():
            after = run_eval(final, tok, cfg, "after")
            if cfg.realign_steps:  # before the variants, which change `final`
                label = f"re-aligned ({cfg.realign_steps} steps on general data)"
                variants[label] = run_eval(realigned(final, data.general, cfg, tok.pad_id), tok, cfg, f"after, {label}")
            for label, apply in method.variants(final).items():  # after the save: the saved model is the final one
                apply()
                variants[label] = run_eval(final, tok, cfg, f"after, {label}")
        distributed.barrier()
    return after, variants, diagnostics


def realigned(model, general: list, cfg, pad_id: int):
    """Spurious or real forgetting (Zheng et al. 2025, "Spurious Forgetting in Continual Learning of Language
    Models"): a copy of the fine-tuned model whose trainable parameters (a LoRA run's: the adapters) take
    cfg.realign_steps AdamW steps (--lr, constant) on batches of the general examples (by the seed, cycled).
    Ability that comes back within a few steps was a lost alignment (the format), not lost knowledge. The model
    itself is unchanged."""
    twin = copy.deepcopy(model).train()
    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    batches = batches_by_length(general, cfg.batch_size, pad_id, seed=cfg.seed)
    device = params[0].device
    for step in range(cfg.realign_steps):
        b = batches[step % len(batches)]
        loss = twin(b["input_ids"].to(device), labels=b["labels"].to(device),
                    attention_mask=b["attention_mask"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return twin.eval()


def domain_evaluation(cfg) -> dict:
    """{domain task: its file} of the --eval level: the drug sets on the default data; --domain-eval's file in
    their place; on your own --data without it, domain_heldout, the tenth of --data kept out of training
    (data.is_held_out). {} for a level without domain tasks."""
    level = LEVELS[cfg.eval] if cfg.eval != "none" else {}
    if not any(t in level for t in DOMAIN_TASKS):
        return {}
    if cfg.domain_eval:
        return {"domain_recall": cfg.domain_eval}
    if Path(cfg.data).resolve() != Path(TrainConfig.data).resolve():
        return {"domain_heldout": cfg.data}
    return {t: str(TASKS[t].data) for t in DOMAIN_TASKS[:2] if t in level}


def run_eval(model, tok, cfg, stage: str):
    """The --eval level of eval.py (eval.LEVELS): the same tasks, items and settings as `python eval.py --level`,
    its domain tasks those of `domain_evaluation`."""
    if cfg.eval == "none":
        return None
    print(f"[{stage}] evaluating ({cfg.eval}, {cfg.eval_split} split)", file=sys.stderr)
    domain = domain_evaluation(cfg)
    limits = {t: n for t, n in LEVELS[cfg.eval].items() if t not in DOMAIN_TASKS}
    limits.update({t: LEVELS[cfg.eval].get(t, LEVELS[cfg.eval].get("domain_recall")) for t in domain})
    return evaluate(model, tok, tasks=tuple(limits), limit=limits, split=cfg.eval_split, data_paths=domain,
                    batch_size=cfg.eval_batch_size, progress=True)


@contextlib.contextmanager
def timed(seconds: dict, phase: str):
    """seconds[phase] = the wall time the with-block took."""
    t = time.time()
    yield
    seconds[phase] = time.time() - t


def cli():
    """The console script (pip install: forgetlab-train)."""
    run_cli(main)


if __name__ == "__main__":
    cli()
