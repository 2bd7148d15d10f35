"""The two self-distillation fine-tunes (methods/sdft_rewrite.py, methods/sdft_on_policy.py) and what they share
(methods/self_distillation.py): the teacher's prompt, the rewrites and their cache, the on-policy KL against a
brute-force one, the EMA teacher, and the refusals."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import train
from data import collate, load_dataset, tokenize_dataset
from errors import ForgetlabError
from methods.self_distillation import DemonstrationPrompt, split_example
from model import load_model
from model.tokenizer import Tokenizer
from tests.tiny import run_context, tiny_args

generate = importlib.import_module("model.generate")  # the module (model.generate is also a function's name)


def domain_examples(tiny_dir, tiny_data):
    tok = Tokenizer.from_dir(tiny_dir)
    examples, _ = tokenize_dataset(tok, load_dataset(tiny_data[0]), 256)
    return tok, examples


def test_the_teacher_prompt_is_the_chat_with_the_demonstration_written_into_the_user_turn(tiny_dir, tiny_data):
    tok, examples = domain_examples(tiny_dir, tiny_data)
    row = load_dataset(tiny_data[0])[0]
    prompt, answer, end = split_example(examples[0], tok.stop_ids)
    assert end and end[0] in tok.stop_ids and tok.decode(answer) == row["completion"]
    teacher = DemonstrationPrompt(tok, "\n\nAn answer:\n{demonstration}\n\nYours?", "unused")(prompt, answer)
    # the oracle: the chat template rendered on the user's text with the demonstration in it
    expected = tok.apply_chat_template([{"role": "user", "content": row["prompt"] + "\n\nAn answer:\n" +
                                         row["completion"] + "\n\nYours?"}], add_generation_prompt=True)
    assert tok.decode(teacher, skip_special_tokens=False) == expected


def test_a_plain_prompt_gets_the_demonstration_in_front(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    prompt, answer = tok.encode("Topic of: the match ended 2-1\nAnswer:", add_bos=tok.adds_bos), tok.encode(" sports")
    teacher = DemonstrationPrompt(tok, "unused {demonstration}", "Example:{demonstration}\n\n")(prompt, answer)
    assert tok.decode(teacher) == "Example: sports\n\nTopic of: the match ended 2-1\nAnswer:"
    assert teacher[-len(prompt) + tok.adds_bos:] == prompt[tok.adds_bos:]  # the prompt's own tokens, after it


def test_an_example_without_a_prompt_has_nothing_to_show_a_demonstration_with(tiny_dir, tmp_path):
    tok = Tokenizer.from_dir(tiny_dir)
    examples, _ = tokenize_dataset(tok, [{"text": "Just some text to continue."}], 256)
    with pytest.raises(ForgetlabError, match="example 1 has no prompt"):
        DemonstrationPrompt(tok, "a{demonstration}", "b{demonstration}").check(examples, tok.stop_ids, "--method x")


# ----------------------------------------------------------------------------- the rewrite form

def test_sdft_rewrite_trains_on_the_models_answers_to_the_demonstration_prompt_and_caches_them(
        tiny_dir, tiny_data, tmp_path, monkeypatch):
    from methods.sdft_rewrite import IN_TURN, PREFIX

    cfg, method = train.parse_config(["--method", "sdft-rewrite", "--sdft-rewrite.cache", str(tmp_path / "cache"),
                                      "--sdft-rewrite.max-new-tokens", "6"])
    model = load_model(tiny_dir)
    tok, examples = domain_examples(tiny_dir, tiny_data)
    examples = examples[:3]
    seen = []

    def rewrite(model, prompts, max_new_tokens, stop_ids, pad_id, **kw):  # a short one, one too long, an empty one
        seen.extend(prompts)
        return [[5, 6, 7], [8] * max_new_tokens, []][:len(prompts)]
    monkeypatch.setattr(generate, "generate_ids", rewrite)
    out = method.train_examples(model, run_context(cfg, tok), examples)
    teacher_prompt = DemonstrationPrompt(tok, IN_TURN, PREFIX)
    parts = [split_example(e, tok.stop_ids) for e in examples]
    assert sorted(seen) == sorted(teacher_prompt(p, a) for p, a, _ in parts)  # each shown its own answer
    prompt, answer, end = parts[0]
    assert out[0]["input_ids"] == prompt + [5, 6, 7] + end and out[0]["labels"] == [-100] * len(prompt) + [5, 6, 7] + end
    for i in (1, 2):  # unfinished or empty: the original answer
        assert out[i] is examples[i]
    assert method.kept_original == [1, 2]

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")
    monkeypatch.setattr(generate, "generate_ids", no_generation)
    assert method.train_examples(model, run_context(cfg, tok), examples) == out


def test_sdft_rewrite_runs_and_records_which_answers_it_rewrote(tiny_dir, tiny_data, tmp_path):
    import json

    out = tmp_path / "run"
    train.main(tiny_args(tiny_dir, tiny_data, out, "--method", "sdft-rewrite", "--max-steps", "2",
                         "--sdft-rewrite.cache", str(tmp_path / "cache"), "--sdft-rewrite.max-new-tokens", "4"))
    record = json.loads((out / "sdft_rewrite.json").read_text())
    assert record["examples"] == 24 and record["rewritten"] + len(record["kept_original"]) == 24  # a random model
    # rarely ends within 4 tokens: most, if not all, keep their original answer


# ----------------------------------------------------------------------------- the on-policy form

def on_policy(tiny_dir, tiny_data, *flags):
    cfg, method = train.parse_config(["--method", "sdft-on-policy", "--sdft-on-policy.max-new-tokens", "5", *flags])
    model = load_model(tiny_dir)
    with torch.no_grad():  # far from uniform, so that the demonstration changes the teacher's distributions
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    tok, examples = domain_examples(tiny_dir, tiny_data)
    method.setup(model, run_context(cfg, tok, domain=examples))
    return model, tok, method, collate(examples[:3], tok.pad_id)


def brute_force_kl(model, teacher, contexts, answers, reverse: bool) -> torch.Tensor:
    """1/N Σ KL over every answer position, each from its own unpadded forward of the prefix."""
    total, n = 0.0, 0
    for (student_ctx, teacher_ctx), answer in zip(contexts, answers):
        for t in range(len(answer)):
            with torch.no_grad():
                log_s = F.log_softmax(model(torch.tensor([student_ctx + answer[:t]]))[0, -1].float(), -1)
                log_t = F.log_softmax(teacher(torch.tensor([teacher_ctx + answer[:t]]))[0, -1].float(), -1)
            p, q = (log_s, log_t) if reverse else (log_t, log_s)
            total += float((p.exp() * (p - q)).sum())
            n += 1
    return torch.tensor(total / n)


@pytest.mark.parametrize("kl", ["reverse", "forward"])
def test_the_on_policy_loss_is_the_kl_to_the_demonstration_conditioned_teacher_along_the_students_samples(
        tiny_dir, tiny_data, kl):
    model, tok, method, batch = on_policy(tiny_dir, tiny_data, "--sdft-on-policy.teacher", "base",
                                          "--sdft-on-policy.kl", kl)
    loss = method.task_loss(model, model, batch, step=3)
    # the samples again, from the same seed: the student's own answers to the bare prompts
    parts = [split_example(dict(input_ids=batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist(),
                                labels=batch["labels"][i][batch["attention_mask"][i].bool()].tolist()), tok.stop_ids)
             for i in range(3)]
    with generate.eval_mode(model):
        samples = generate.generate_ids(model, [p for p, _, _ in parts], 5, tok.stop_ids, tok.pad_id, temperature=1.0,
                                        generator=method.sampler(3, 0, "cpu"))
    answers = [s + (e if len(s) < 5 else []) for s, (_, _, e) in zip(samples, parts)]
    contexts = [(p, method.teacher_prompt(p, c)) for p, c, _ in parts]
    expected = brute_force_kl(model, method.teacher, contexts, answers, reverse=kl == "reverse")
    assert float(expected) > 1e-4 and loss.item() == pytest.approx(float(expected), rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in method.teacher.parameters())  # the teacher is a target only


def test_the_on_policy_loss_is_zero_when_the_teacher_sees_what_the_student_sees(tiny_dir, tiny_data):
    model, tok, method, batch = on_policy(tiny_dir, tiny_data, "--sdft-on-policy.teacher", "live")
    method.teacher_prompt = lambda prompt, demonstration: prompt
    assert method.task_loss(model, model, batch, step=0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_ema_teacher_moves_a_fraction_of_the_way_to_the_student_after_each_step(tiny_dir, tiny_data):
    model, tok, method, batch = on_policy(tiny_dir, tiny_data, "--sdft-on-policy.ema-rate", "0.25")
    phi0 = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    method.after_step(model, 0)
    for n, p in model.named_parameters():
        assert torch.allclose(method.teacher_weights[n], phi0[n] + 0.25 * (p - phi0[n]), atol=1e-6)
    assert set(method.state_dict()) == {f"teacher_weights.{n}" for n, _ in model.named_parameters()}  # checkpointed


def test_each_micro_batch_samples_from_its_own_seed_whatever_ran_before(tiny_dir, tiny_data):
    _, _, method, _ = on_policy(tiny_dir, tiny_data)
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(method.sampler(7, 1, "cpu")), draw(method.sampler(7, 1, "cpu")))
    assert not torch.equal(draw(method.sampler(7, 1, "cpu")), draw(method.sampler(7, 0, "cpu")))
    assert not torch.equal(draw(method.sampler(7, 1, "cpu")), draw(method.sampler(8, 1, "cpu")))


def test_sdft_on_policy_is_refused_under_fsdp(tiny_dir, tiny_data):
    cfg, method = train.parse_config(["--method", "sdft-on-policy"])
    tok, examples = domain_examples(tiny_dir, tiny_data)
    run = run_context(cfg, tok, domain=examples)
    run.fsdp = True
    with pytest.raises(ForgetlabError, match="not with --fsdp"):
        method.check(load_model(tiny_dir), run)
