"""Runs onnxruntime on the ONNX files bitnetd exports from the reference fixtures, and records its greedy
continuations and last-position logits next to transformers' (tests/fixtures/reference/<case>/onnxruntime.json).
tests/reference.rs checks that tract agrees with them, so CI needs no Python.

  cargo build && python models/ort_reference.py --bitnetd target/debug/bitnetd
"""
import argparse
import json
import os
import subprocess
import tempfile

import numpy as np
import onnxruntime as ort


def greedy(sess, prompt_ids, n, kv_heads, head_dim, layers):
    past = {f"past_key_values.{l}.{k}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
            for l in range(layers) for k in ("key", "value")}
    seq, n_past, out, first = list(prompt_ids), 0, [], None
    for _ in range(n):
        feed = {"input_ids": np.array([seq], np.int64),
                "attention_mask": np.ones((1, n_past + len(seq)), np.int64),
                "position_ids": np.arange(n_past, n_past + len(seq), dtype=np.int64)[None, :], **past}
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feed)))
        for l in range(layers):
            for k in ("key", "value"):
                past[f"past_key_values.{l}.{k}"] = res[f"present.{l}.{k}"]
        logits = res["logits"][0, -1]
        if first is None:
            first = logits.tolist()
        n_past += len(seq)
        seq = [int(np.argmax(logits))]
        out.append(seq[0])
    return out, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bitnetd", default="target/debug/bitnetd")
    ap.add_argument("--fixtures", default="tests/fixtures/reference")
    a = ap.parse_args()
    for case in sorted(os.listdir(a.fixtures)):
        src = os.path.join(a.fixtures, case)
        exp = json.load(open(os.path.join(src, "expected.json")))
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([a.bitnetd, "export", "--from", src, "--out", out], check=True, capture_output=True)
            meta = json.load(open(os.path.join(out, "bitnetd.json")))["architecture"]
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            sess = ort.InferenceSession(os.path.join(out, "model.onnx"), so, providers=["CPUExecutionProvider"])
            cases = []
            for c in exp["cases"]:
                ids, logits = greedy(sess, c["prompt_ids"], len(c["greedy_ids"]), meta["kv_heads"],
                                     meta["head_dim"], meta["layers"])
                cases.append({"prompt_ids": c["prompt_ids"], "greedy_ids": ids, "last_logits": logits})
                print(case, "onnxruntime greedy == transformers greedy:", ids == c["greedy_ids"])
        with open(os.path.join(src, "onnxruntime.json"), "w") as f:
            json.dump({"source": f"onnxruntime {ort.__version__}, CPU, 1 thread", "cases": cases}, f)


if __name__ == "__main__":
    main()
