"""KL (teacher-forced, per token) of adapter variants on validation questions: NAME=PATH[+link] ..."""
import sys, torch
from tqdm.auto import tqdm
from kvpacket_rag.tuning import set_threads
from kvpacket_rag.models import load_model
from kvpacket_rag.engine import resolve_adapter
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.datasets import load_samples
from training import student_logits, tokenize_sample, teacher_answer
set_threads(2)
model = load_model(None)
f = PromptFormatter(model.tokenizer)
spec, n, *vs = sys.argv[1:]
variants = {}
for v in vs:
    name, _, path = v.partition("=")
    base, _, link = path.partition("+")
    if base.startswith("ckpt:"):
        from safetensors.torch import load_file
        adapter = resolve_adapter(model, "default").with_link(load_file(base[5:])["adapter.link"])
    else:
        adapter = resolve_adapter(model, base)
    variants[name] = (adapter, bool(link))
name, _, docs = spec.partition(":")
opts = {"docs_per_sample": int(docs)} if docs else {}
samples = load_samples(name, "test", int(n), seed=1, **opts)
tot = dict.fromkeys(variants, 0.0); tokens = 0
with torch.no_grad():
    for s in tqdm(samples):
        tk = tokenize_sample(s, f, model, 24, 32)
        prompt = tk.prompt_ids(f.preamble_ids())
        t = teacher_answer(model, prompt, 32, eos_ids(model.tokenizer, model.config))
        tokens += t.length
        for k, (a, linked) in variants.items():
            tot[k] += float(t.kl(student_logits(model, a, f.preamble_ids(), tk, t.answer_ids, linked=linked)).sum())
print(spec, n, {k: round(v / tokens, 4) for k, v in tot.items()}, flush=True)
