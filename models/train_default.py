"""Trains bitnetd's default model: a small BitNet b1.58 of the 2B-4T architecture (ReLU² gated FFN with
ffn_sub_norm, attn_sub_norm, GQA, RoPE, tied embeddings), with transformers' BitNet classes and online
quantization-aware training (AutoBitLinear, quantization_mode="online"), on the English glosses and usage
examples of WordNet 3.0 (Debian package `wordnet-base`, WordNet 3.0 license: free use, copy, modify and
distribute with the copyright notice).

  apt-get install wordnet-base
  python models/train_default.py --out models/default-hf --minutes 55

It writes the checkpoint in the exact microsoft/bitnet-b1.58-2B-4T layout (packed uint8 ternary weights,
bf16, weight_scale, autobitlinear offline), a byte-level BPE tokenizer trained on the same corpus, and
prints samples. `bitnetd export --from models/default-hf --out models/default` makes the ONNX model.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import replace_with_bitnet_linear
from transformers.utils.quantization_config import BitNetQuantConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bitnet_ckpt import bitnet_config, load_f32, packed_state_dict, write_checkpoint  # noqa: E402

WORDNET = "/usr/share/wordnet"
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, EOT, "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% set content = message['role'] | capitalize + ': ' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Unlike 2B-4T's template, the generation prompt ends without a space: the byte-level BPE trained here joins a
# space to the word after it ("ĠA"), so a trailing space would leave the model a token it never saw in training.


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def wordnet_docs(seed=0):
    """One short English document per synset: a question/answer in the chat format, plus the usage examples."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET, f"data.{pos}"), encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                head, gloss = line.split("|", 1)
                fields = head.split()
                n = int(fields[3], 16)
                words = [fields[4 + 2 * i].replace("_", " ") for i in range(n)]
                words = [re.sub(r"\(.*\)$", "", w) for w in words]
                parts = [p.strip() for p in gloss.strip().split(";")]
                defs = [p for p in parts if p and not p.startswith('"')]
                examples = [p.strip('" ') for p in parts if p.startswith('"')]
                if not defs:
                    continue
                d = defs[0].rstrip(".")
                w = words[0]
                if len(w) < 2 or not w.isascii():
                    continue
                if pos == "noun":
                    q, a = f"What is {article(w)} {w}?", f"{article(w).capitalize()} {w} is {d}."
                elif pos == "verb":
                    q, a = f"What does it mean to {w}?", f"To {w} is to {d}."
                else:
                    q, a = f"What does {w} mean?", f"{w[0].upper() + w[1:]} means {d}."
                docs.append(f"{BOS}User: {q}{EOT}Assistant: {a}{EOT}")
                for e in examples:
                    if len(e) > 8 and e.isascii():
                        docs.append(f"{BOS}{e[0].upper() + e[1:]}.{EOS}")
    random.Random(seed).shuffle(docs)
    return docs


def train_tokenizer(docs, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    strip = re.compile("|".join(re.escape(s) for s in SPECIALS))
    tok.train_from_iterator((strip.sub(" ", d) for d in docs), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def build_model(cfg_dict):
    """A float BitNetForCausalLM whose linears are AutoBitLinear with online ternarization (QAT)."""
    cfg = BitNetConfig(**{k: v for k, v in cfg_dict.items() if k not in ("quantization_config", "torch_dtype")})
    model = BitNetForCausalLM(cfg).float()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"],
                               quantization_config=BitNetQuantConfig(linear_class="autobitlinear",
                                                                     quantization_mode="online"))
    model.to_empty(device="cpu")
    model.load_state_dict(init, strict=False)
    model.float()
    model.tie_weights()
    return model


CARD = """---
license: other
license_name: wordnet-3.0
language: en
tags: [bitnet, ternary, bitnetd]
---
# bitnetd default model

A small BitNet b1.58 language model, bitnetd's default. Same architecture as microsoft/bitnet-b1.58-2B-4T
(ternary weights packed 4 per byte, `weight_scale`, ReLU² gated FFN with `ffn_sub_norm`, `attn_sub_norm`,
GQA, RoPE, tied embeddings), at a size a Raspberry Pi runs in milliseconds per token.

| | |
|---|---|
| parameters | {params:.2f} M ({layers} layers, hidden {hidden}, FFN {ffn}, {heads}/{kv_heads} heads, vocab {vocab}) |
| training | online quantization-aware training with transformers' AutoBitLinear, {steps} steps of {batch}x{seq} tokens, AdamW, {minutes:.0f} min on {threads} CPU threads |
| final training loss | {loss:.3f} |
| corpus | WordNet 3.0 glosses and usage examples (Debian package `wordnet-base`), {docs} documents, {tokens:.2f} M tokens |
| tokenizer | byte-level BPE trained on the same corpus, with Llama-3 style special tokens |
| chat format | `User: ...<|eot_id|>Assistant: ...<|eot_id|>` (the 2B-4T template) |

It answers "What is a X?" / "What does it mean to X?" / "What does X mean?" with a dictionary-style sentence,
and continues plain text with WordNet-like English. It knows nothing else: it is for testing, demos and
smoke tests of the daemon, not for real answers. Use microsoft/bitnet-b1.58-2B-4T for those.
Greedy decoding with a repetition penalty of 1.2 reads best (its generation_config.json says so, and
bitnetd follows it); without the penalty the model tends to loop.

Made by `python models/train_default.py` (bitnetd repository).

## License

The training data is WordNet 3.0, (c) 2006 Princeton University, used under the WordNet 3.0 license:
"Permission to use, copy, modify and distribute this software and database and its documentation for any
purpose and without fee or royalty is hereby granted, provided that you agree to comply with the following
copyright notice and statements, including the disclaimer, and that the same appear on ALL copies of the
software, database and documentation, including modifications that you make for internal use or for
distribution. WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND
DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED." The model weights are released under the same terms.
"""


def write_card(out_dir, **stats):
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(CARD.format(**stats))


def batches(ids, seq, bs, rng):
    n = len(ids) - seq - 1
    while True:
        starts = [rng.randrange(n) for _ in range(bs)]
        x = torch.stack([ids[s:s + seq + 1] for s in starts])
        yield x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "default-hf"))
    ap.add_argument("--minutes", type=float, default=55.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    rng = random.Random(0)

    docs = wordnet_docs()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB", flush=True)
    tok = train_tokenizer(docs, a.vocab)
    bos, eos, eot = (tok.token_to_id(s) for s in (BOS, EOS, EOT))
    stream = []
    for d in docs:
        stream.extend(tok.encode(d, add_special_tokens=False).ids)
    ids = torch.tensor(stream, dtype=torch.long)
    print(f"tokens: {len(ids) / 1e6:.2f} M", flush=True)

    cfg = bitnet_config(tok.get_vocab_size(), a.hidden, a.layers, a.heads, a.kv_heads, a.ffn,
                        max_pos=1024, bos=bos, eos=eos)
    cfg["pad_token_id"] = tok.token_to_id("<|pad|>")
    model = build_model(cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.05)
    budget = a.minutes * 60
    t0 = time.time()
    step, warm = 0, 200
    for x in batches(ids, a.seq, a.batch, rng):
        frac = min(1.0, (time.time() - t0) / budget)
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x[:, :-1], logits_to_keep=0)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if frac >= 1.0:
            break

    model.eval()
    state = packed_state_dict(model.state_dict(), "autobitlinear")
    tj = json.loads(tok.to_str())
    write_checkpoint(a.out, cfg, state, json.dumps(tj, ensure_ascii=False))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE,
                   "model_max_length": cfg["max_position_embeddings"]}, f, indent=2)
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": False, "repetition_penalty": 1.2},
                  f, indent=2)
    write_card(a.out, params=sum(p.numel() for p in model.parameters()) / 1e6, layers=a.layers, hidden=a.hidden,
               ffn=a.ffn, heads=a.heads, kv_heads=a.kv_heads, vocab=tok.get_vocab_size(), steps=step, batch=a.batch,
               seq=a.seq, minutes=(time.time() - t0) / 60, threads=a.threads, loss=loss.item(), docs=len(docs),
               tokens=len(ids) / 1e6)
    print(f"trained {step} steps in {time.time() - t0:.0f}s, final loss {loss.item():.3f}; wrote {a.out}")

    # Samples from the packed checkpoint, through transformers' own offline loader.
    m = load_f32(a.out)
    for p in ["User: What is a dog?<|eot_id|>Assistant:", "The weather", "User: What does it mean to run?<|eot_id|>Assistant:"]:
        enc = torch.tensor([tok.encode(p).ids])
        g = m.generate(enc, max_new_tokens=30, do_sample=False, eos_token_id=[eos, eot])
        print(repr(tok.decode(g[0].tolist(), skip_special_tokens=False)))


if __name__ == "__main__":
    main()
