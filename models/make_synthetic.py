"""A random checkpoint in the exact microsoft/bitnet-b1.58-2B-4T layout, for speed and memory benchmarks only
(its text is noise). numpy only; never committed.

  python3 models/make_synthetic.py OUT_DIR [--layers 30]

Full shape: hidden 2560, 30 layers, 20/5 heads, FFN 6912, vocab 128256, tied embeddings, packed uint8 ternary
weights with a bf16 weight_scale (autobitlinear offline), bf16 norms and embeddings. A word-level tokenizer
covering every id is written so that any generated id decodes.
"""
import argparse
import json
import os
import struct

import numpy as np


def bf16_bytes(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def packed_ternary(rng, rows, cols):
    # codes w+1 in {0,1,2}, half zeros like absmean-ternarized weights; row block i in bits 2i
    codes = rng.choice(np.array([0, 1, 2], np.uint8), size=(rows, cols), p=[0.25, 0.5, 0.25])
    block = rows // 4
    out = np.zeros((block, cols), np.uint8)
    for i in range(4):
        out |= codes[i * block:(i + 1) * block] << (2 * i)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--ffn", type=int, default=6912)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--kv-heads", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=128256)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(1)
    hd = a.hidden // a.heads
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0

    def add(name, dtype, shape, data):
        nonlocal off
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)

    add("model.embed_tokens.weight", "BF16", [a.vocab, a.hidden],
        bf16_bytes(rng.standard_normal((a.vocab, a.hidden), np.float32) * 0.02))
    shapes = {"self_attn.q_proj": (a.hidden, a.hidden), "self_attn.k_proj": (a.kv_heads * hd, a.hidden),
              "self_attn.v_proj": (a.kv_heads * hd, a.hidden), "self_attn.o_proj": (a.hidden, a.hidden),
              "mlp.gate_proj": (a.ffn, a.hidden), "mlp.up_proj": (a.ffn, a.hidden), "mlp.down_proj": (a.hidden, a.ffn)}
    for layer in range(a.layers):
        p = f"model.layers.{layer}."
        for name, (rows, cols) in shapes.items():
            w = packed_ternary(rng, rows, cols)
            add(p + name + ".weight", "U8", list(w.shape), w.tobytes())
            add(p + name + ".weight_scale", "BF16", [1], bf16_bytes(np.array([1.0 + rng.random()], np.float32)))
        for norm, n in (("input_layernorm", a.hidden), ("post_attention_layernorm", a.hidden),
                        ("self_attn.attn_sub_norm", a.hidden), ("mlp.ffn_sub_norm", a.ffn)):
            add(p + norm + ".weight", "BF16", [n], bf16_bytes(1 + 0.1 * rng.standard_normal(n).astype(np.float32)))
        print(f"layer {layer + 1}/{a.layers}", end="\r", flush=True)
    add("model.norm.weight", "BF16", [a.hidden], bf16_bytes(np.ones(a.hidden, np.float32)))
    hj = json.dumps(header).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    bos, eos, eot = 128000, 128001, 128009
    cfg = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": a.hidden,
           "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
           "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "hidden_act": "relu2",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": [eos, eot], "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                   "quantization_mode": "offline"}}
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    vocab = {f"w{i}": i for i in range(min(a.vocab, 128000))}
    specials = {"<|begin_of_text|>": bos, "<|end_of_text|>": eos, "<|eot_id|>": eot}
    vocab.update(specials)
    vocab["<unk>"] = vocab.pop("w0")
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in specials.items()],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    json.dump(tok, open(os.path.join(a.out, "tokenizer.json"), "w"))
    print(f"\nwrote {off / 1e9:.2f} GB to {a.out}")


if __name__ == "__main__":
    main()
