"""Run I: the log-likelihood engine before (tasks/loglikelihood.py at 935df7c: a prefill of the left-padded
contexts, the KV cache repeated per continuation, the continuations right-padded) against the packed
prefix-tree rows that replaced it, side by side in one process, rounds interleaved; every per-item field
compared. From the repository root, with the streams paused:

    python results/bench/run-i/compare_engines.py 2 results/bench/run-i/engines.json

(It ran from /tmp with the old file copied there; its sha256 equals `git show 935df7c:tasks/loglikelihood.py`.)
"""
import importlib.util, json, subprocess, sys, tempfile, time, torch
from pathlib import Path
import eval as E
import tasks.benchmarks, tasks.domain, tasks.perplexity, tasks.classification
from model import load_model, Llama
from model.tokenizer import Tokenizer
from model.convert_gguf import prepare_default_model
import tasks.loglikelihood as new
old_file = Path(tempfile.mkdtemp()) / "old_loglikelihood.py"
old_file.write_text(subprocess.run(["git", "show", "935df7c:tasks/loglikelihood.py"], capture_output=True, text=True,
                                   check=True).stdout)
spec = importlib.util.spec_from_file_location("old_ll", old_file); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
def repeat_kv_cache(self, counts):
    for layer in self.model.layers:
        c = layer.self_attn.kv_cache
        c.k = c.k.repeat_interleave(counts, dim=0); c.v = c.v.repeat_interleave(counts, dim=0)
Llama.repeat_kv_cache = repeat_kv_cache
d = prepare_default_model(); model = load_model(d); tok = Tokenizer.from_dir(d)
def use(mod):
    for m in (tasks.benchmarks, tasks.domain, tasks.perplexity, tasks.classification):
        m.score_continuations = mod.score_continuations
lim = E.LEVELS['full']; ll = ['arc_easy', 'lambada', 'ppl', 'domain_recall', 'domain_unseen']
def cmp(a, b, path=''):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return max([cmp(a[k], b[k], path + '.' + k) for k in a if k != 'seconds'] + [0])
    if isinstance(a, list):
        assert len(a) == len(b), path
        return max([cmp(x, y, path + f'[{i}]') for i, (x, y) in enumerate(zip(a, b))] + [0])
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b)
    assert a == b, (path, a, b)
    return 0
times = {k: {'old': [], 'new': []} for k in ll}
res = {}
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
for rnd in range(rounds):
    for name, mod in (('old', old), ('new', new)) if rnd % 2 == 0 else (('new', new), ('old', old)):
        use(mod)
        for t in ll:
            t0 = time.perf_counter()
            r = E.evaluate(model, tok, tasks=[t], limit={t: lim[t]}, split='test', progress=False)[t]
            times[t][name].append(time.perf_counter() - t0)
            res.setdefault((name, t), r)
# the stream's classification scoring on dbpedia's 100 test rows
from tasks.classification import load_benchmark, load_rows, score_classification
bench = load_benchmark('../shared/data/cl/cl500')
cl = ['dbpedia', 'amazon', 'yahoo', 'agnews']
for t in cl:
    times[t] = {'old': [], 'new': []}
for name, mod in (('old', old), ('new', new)):
    use(mod)
    for t in cl:
        rows = load_rows(bench[t], 'test')
        t0 = time.perf_counter()
        items = score_classification(model, tok, bench[t], rows, max_len=256)
        times[t][name].append(time.perf_counter() - t0)
        res[(name, t)] = items
out = {}
for t in times:
    diff = cmp(res[('old', t)], res[('new', t)])
    o, n = min(times[t]['old']), min(times[t]['new'])
    out[t] = dict(old_s=times[t]['old'], new_s=times[t]['new'], ratio=o / n, max_abs_diff=diff)
    print(f"{t:14s} old {o:6.2f}s new {n:6.2f}s  {o/n:4.2f}x  max |diff| {diff:.2e}", flush=True)
tot_o = sum(min(times[t]['old']) for t in ll); tot_n = sum(min(times[t]['new']) for t in ll)
print(f"log-likelihood tasks of the full level: old {tot_o:.1f}s new {tot_n:.1f}s {tot_o/tot_n:.2f}x")
json.dump(dict(tasks=out, machine=open('/proc/cpuinfo').read().split('model name')[1].split('\n')[0].strip(': '),
               torch=torch.__version__, threads=torch.get_num_threads()), open(sys.argv[2] if len(sys.argv) > 2 else '/tmp/prof/sbs.json', 'w'), indent=1)
