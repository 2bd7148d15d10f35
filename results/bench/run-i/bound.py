"""Run I: the matmul bound of eval.py's `full` level. Per task: the positions run through the decoder layers
(computed, padding included) and the real ones (the attention mask's), the lm_head rows, and the seconds their
FLOPs need at the measured matmul peak (2 x body parameters per position + 2 x vocab x hidden per lm_head row;
attention's T^2 left out). From the repository root, with the streams paused:

    python results/bench/run-i/bound.py results/bench/run-i/bound.json
"""
import sys, time, json, collections, torch
import eval as E
from model import load_model
from model.tokenizer import Tokenizer
from model.convert_gguf import prepare_default_model
d = prepare_default_model()
model = load_model(d); tok = Tokenizer.from_dir(d)
stats = collections.Counter()
orig = model.hidden
def hidden(input_ids, attention_mask=None, position_ids=None, cache_start=None):
    B, T = input_ids.shape
    stats['computed'] += B*T
    if attention_mask is None or attention_mask.dim() == 2:  # a packed row's real tokens: counted in _tree_row
        stats['real'] += int(attention_mask[:, -T:].sum()) if attention_mask is not None else B*T
    stats['passes'] += 1
    if T == 1: stats['decode_rows'] += B; stats['decode_steps'] += 1
    return orig(input_ids, attention_mask, position_ids, cache_start)
model.hidden = hidden
import tasks.loglikelihood as LL
tree_row = LL._tree_row
def counted_tree_row(ctx, conts):
    row = tree_row(ctx, conts)
    stats['real'] += len(row[0])
    return row
LL._tree_row = counted_tree_row
hr = collections.Counter()
model.lm_head.register_forward_hook(lambda m,i,o: hr.__setitem__('rows', hr['rows']+i[0][...,0].numel()))
body = sum(p.numel() for n,p in model.named_parameters() if p.dim()==2 and 'embed' not in n)
head = model.config.vocab_size*model.config.hidden_size
print('body', body, 'head', head)
a = torch.randn(2048, 2048); a @ a
peak = max((lambda t0: (a @ a, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)[1])(time.perf_counter()) for _ in range(5))
print(f'matmul peak {peak:.1f} GFLOP/s'); out = dict(peak_gflops=peak, tasks={})
lim = E.LEVELS['full']
for task in lim:
    stats.clear(); hr.clear(); t=time.perf_counter()
    E.evaluate(model, tok, tasks=[task], limit={task: lim[task]} , split='test', progress=False)
    s=time.perf_counter()-t
    fl_real = 2*body*stats['real'] + 2*head*hr['rows']
    fl_comp = 2*body*stats['computed'] + 2*head*hr['rows']
    print(f"{task:14s} {s:6.1f}s computed {stats['computed']:6d} real {stats['real']:6d} passes {stats['passes']:4d} decode_steps {stats['decode_steps']:4d} decode_rows {stats['decode_rows']:6d} head_rows {hr['rows']:6d} bound_comp {fl_comp/(peak*1e9):5.1f}s bound_real {fl_real/(peak*1e9):5.1f}s", flush=True)
    out['tasks'][task] = dict(seconds=s, computed=stats['computed'], real=stats['real'], head_rows=hr['rows'],
                              bound_computed_s=fl_comp / (peak * 1e9), bound_real_s=fl_real / (peak * 1e9))
out['total'] = {k: sum(t[k] for t in out['tasks'].values()) for k in ('seconds', 'bound_computed_s', 'bound_real_s')}
print(out['total'])
json.dump(out, open(sys.argv[1], 'w'), indent=1)
