"""Helpers shared by the scripts in models/: write a BitNet b1.58 checkpoint in the exact
layout of microsoft/bitnet-b1.58-2B-4T (ternary weights packed 4 per uint8 along the output
dimension, a `weight_scale` per linear, bf16 everything else), from a float BitNet model.

The packing and the scale conventions follow transformers' `integrations/bitnet.py`:
- values are stored as w+1 in {0,1,2}; rows [i*R, (i+1)*R) live in bits 2i..2i+1 of the
  packed row block, R = out_features / 4;
- `autobitlinear` (offline): output = linear(ActQuant(x), W) * weight_scale, so weight_scale = mean|w|;
- `bitlinear`: output = linear(q(x), W) / (input_scale * weight_scale), so weight_scale = 1 / mean|w|.
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers.integrations.bitnet import pack_weights

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ternarize(w: torch.Tensor):
    """absmean ternarization exactly as transformers' WeightQuant: returns (codes in {-1,0,1}, scale=1/mean|w|)."""
    w = w.float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1), scale


def packed_state_dict(float_state: dict, linear_class: str, dtype=torch.bfloat16) -> dict:
    """Turns the state dict of a float (or online-quantized) BitNet model into the 2B-4T layout."""
    out = {}
    for name, t in float_state.items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        module = name.rsplit(".", 2)
        if name.endswith(".weight") and module[-2] in LINEAR_SUFFIXES:
            codes, scale = ternarize(t)
            out[name] = pack_weights(codes.to(torch.int8).clone()).contiguous()
            ws = (1.0 / scale) if linear_class == "autobitlinear" else scale
            out[name[: -len("weight")] + "weight_scale"] = ws.reshape(1).to(dtype)
        else:
            out[name] = t.detach().to(dtype).contiguous()
    return out


def write_checkpoint(out_dir: str, config: dict, state: dict, tokenizer_json: str | None = None):
    """Writes config.json, model.safetensors and (optionally) tokenizer.json into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer_json is not None:
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer_json)


def bitnet_config(vocab, hidden, layers, heads, kv_heads, ffn, linear_class="autobitlinear",
                  mode="offline", max_pos=512, act="relu2", bos=1, eos=2, theta=500000.0, eps=1e-5):
    """A config.json dict in the 2B-4T style (top-level rope_theta, quantization_config)."""
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": act,
        "max_position_embeddings": max_pos, "rms_norm_eps": eps, "rope_theta": theta,
        "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "bfloat16",
        "attention_bias": False, "initializer_range": 0.02,
        "quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": mode},
    }


def load_f32(path: str):
    """Loads a BitNet checkpoint through transformers' own BitNet loader, computing in float32.

    transformers 5 keeps the bf16 tensors that are not quantized linears (norms, embeddings) in bf16 even with
    dtype=float32, which mixes dtypes inside the model; everything is upcast here (exact for bf16 values)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            t.data = t.data.float()
    return m.eval()
