"""Builds tiny random BitNet b1.58 checkpoints in the exact microsoft/bitnet-b1.58-2B-4T layout and records what
Hugging Face transformers computes for them: greedy continuations and last-position logits.

  python models/make_reference.py --out tests/fixtures/reference

Each case directory holds a checkpoint (config.json, model.safetensors, tokenizer.json) and `expected.json`.
The cases cover: packed uint8 ternary weights with bf16 tensors under both `quantization_config.linear_class`
conventions (`autobitlinear` offline multiplies by weight_scale, `bitlinear` divides by it), GQA and MHA, and
float master weights (the `-bf16` variant, ternarized online by absmean).

The reference is transformers' own BitNet implementation (BitNetForCausalLM with its BitNet quantizer), run in
float32 with eager attention. Weights are drawn large enough that every layer moves the logits, and a seed is rejected (and
advanced) when a greedy step's top-2 logit margin is below MIN_MARGIN, so that a correct implementation can not
flip an argmax by float rounding, or when a continuation has fewer than 3 distinct tokens.
"""
import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BitNetConfig, BitNetForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bitnet_ckpt import bitnet_config, load_f32, packed_state_dict, write_checkpoint  # noqa: E402

MIN_MARGIN = 0.02
NEW_TOKENS = 12
PROMPTS = ["The quick brown fox", "Hello world", "a b c d e f g h"]
CASES = {
    # name: (linear_class, mode, heads, kv_heads, act, packed)
    "gqa-autobitlinear": ("autobitlinear", "offline", 4, 2, "relu2", True),
    "gqa-bitlinear": ("bitlinear", "offline", 4, 2, "relu2", True),
    "mha-autobitlinear": ("autobitlinear", "offline", 4, 4, "relu2", True),
    "gqa-online-bf16": ("autobitlinear", "online", 4, 2, "relu2", False),
    # 1bitLLM-style (Llama layout, BitnetForCausalLM): SiLU, MHA, untied float lm_head, fp16 master weights,
    # sub-norms named inner_attn_ln / ffn_layernorm. transformers' BitNet classes compute the same network
    # (online absmean weights, per-token absmax activations, the sub-norms in the same places), so they are
    # the reference; the checkpoint is then written with 1bitLLM's names and config.
    "llama-bitnet-mha-silu": ("autobitlinear", "online", 4, 4, "silu", False),
}
LLAMA_STYLE = {"llama-bitnet-mha-silu"}


def llama_style(cfg, state):
    """1bitLLM's config.json and tensor names for a transformers BitNet checkpoint."""
    ren = {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln", "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}
    out = {}
    for k, v in state.items():
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    c = {k: v for k, v in cfg.items() if k != "quantization_config"}
    c.update({"architectures": ["BitnetForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
              "weight_bits": 1, "input_bits": 8})
    return c, out


def tiny_tokenizer(vocab):
    text = (__doc__ + " ".join(PROMPTS) + " abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789") * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    assert tok.get_vocab_size() <= vocab, tok.get_vocab_size()
    return tok


def random_model(cfg_dict, seed):
    torch.manual_seed(seed)
    cfg = BitNetConfig(**{k: v for k, v in cfg_dict.items() if k not in ("quantization_config", "torch_dtype")})
    m = BitNetForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return m


def record(model, tok):
    out = []
    for p in PROMPTS:
        ids = tok.encode(p).ids
        seq, steps = list(ids), []
        with torch.no_grad():
            first = None
            for _ in range(NEW_TOKENS):
                logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                steps.append(float(top2[0] - top2[1]))
                if first is None:
                    first = logits.tolist()
                seq.append(int(torch.argmax(logits)))
            # the same continuation through transformers' generate (KV cache path)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=1)[0].tolist()
        assert gen == seq, (gen, seq)
        out.append({"prompt": p, "prompt_ids": ids, "greedy_ids": seq[len(ids):], "min_margin": min(steps),
                    "last_logits": first})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/reference")
    a = ap.parse_args()
    vocab = 320
    tok = tiny_tokenizer(vocab)
    for case_ix, (name, (lc, mode, heads, kv, act, packed)) in enumerate(CASES.items()):
        seed = 100 * case_ix
        while True:
            cfg = bitnet_config(vocab, 64, 2, heads, kv, 128, linear_class=lc, mode=mode, max_pos=128, act=act,
                                bos=0, eos=1, theta=10000.0 if heads == kv else 500000.0)
            llama = name in LLAMA_STYLE
            if llama:
                cfg["tie_word_embeddings"] = False
            m = random_model(cfg, seed)
            dt = torch.float16 if llama else torch.bfloat16
            state = packed_state_dict(m.state_dict(), lc) if packed else \
                {k: v.to(dt).contiguous() for k, v in m.state_dict().items() if llama or k != "lm_head.weight"}
            d = os.path.join(a.out, name)
            write_checkpoint(d, cfg, state, tok.to_str())
            ref = load_f32(d)
            ref.config._attn_implementation = "eager"
            rec = record(ref, tok)
            varied = all(len(set(r["greedy_ids"])) >= 3 for r in rec)
            if varied and min(r["min_margin"] for r in rec) >= MIN_MARGIN:
                if llama:
                    os.remove(os.path.join(d, "model.safetensors"))
                    write_checkpoint(d, *llama_style(cfg, state), tok.to_str())
                break
            seed += 1
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump({"source": "transformers " + __import__("transformers").__version__ + ", torch "
                       + torch.__version__ + ", float32, eager attention", "seed": seed, "cases": rec}, f)
        print(name, "seed", seed, [r["greedy_ids"] for r in rec])


if __name__ == "__main__":
    main()
