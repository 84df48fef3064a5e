"""The PyTorch model computes what supra computes: per-token log-probs equal `supra score
--json` within 1e-4 on the reference prompts, for the teacher, a fully converted SUPRA model
and a hybrid, loaded through transformers' Auto classes from the directory supra wrote, in the
chunked form (blocks of 16, so that the state carries across blocks) and the recurrent form.

Both sides in f64 (`supra score --f64`): the definitions agree. supra's own f32 forward is then
checked against it too. An untrained SUPRA model's f32 log-probs move by ~1e-4-2.5e-4 between
f32 implementations (PyTorch's own f32 differs from its f64 by as much: GroupNorm of near-flat
head outputs), so there the bound is 1e-3; the teacher's stay within 1e-4."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import PROMPTS, score, torch_logprobs

TOL = 1e-4
F32_TOL = {"teacher": 1e-4, "supra": 1e-3, "hybrid": 1e-3}


@pytest.mark.parametrize("kind", ["teacher", "supra", "hybrid"])
def test_logprobs_equal_supra_score(models, kind):
    model = AutoModelForCausalLM.from_pretrained(models / kind, trust_remote_code=True).double().eval()
    assert type(model).__name__ == "SupraForCausalLM"
    for i, prompt in enumerate(PROMPTS):
        ref = score(models / kind, prompt["text"], f64=True)
        ids, want = ref["token_ids"], torch.tensor(ref["logprobs"], dtype=torch.float64)
        forms = [("chunked", {"chunk_size": 16})] + ([("recurrent", {"form": "recurrent"})] if i == 0 else [])
        for form, kw in forms:
            got = torch_logprobs(model, ids, **kw)
            diff = (got - want).abs().max().item()
            print(f"{kind} {prompt['name']} {form}: {len(ids)} tokens, max |diff| {diff:.2e}")
            assert diff <= TOL, f"{kind}, prompt {prompt['name']}, {form} form: max |log-prob diff| {diff:.2e}"
        f32 = torch.tensor(score(models / kind, prompt["text"])["logprobs"], dtype=torch.float64)
        diff = (f32 - got).abs().max().item()
        print(f"{kind} {prompt['name']} supra f32: max |diff| {diff:.2e}")
        assert diff <= F32_TOL[kind], f"{kind}, prompt {prompt['name']}: supra's f32 log-probs off by {diff:.2e}"


def test_generate_reads_through_the_state(models):
    """transformers' generate() with the recurrent state gives the tokens the full chunked
    forward picks greedily, and a continued state gives the logits of the whole sequence."""
    model = AutoModelForCausalLM.from_pretrained(models / "supra", trust_remote_code=True).double().eval()
    ids = torch.tensor([score(models / "supra", PROMPTS[0]["text"])["token_ids"][:20]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 6
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(out, seq)
        first = model(seq[:, :13], use_cache=True)
        rest = model(seq[:, 13:], state=first.state)
        whole = model(seq).logits
    assert (torch.cat([first.logits, rest.logits], 1) - whole).abs().max() < 1e-9
