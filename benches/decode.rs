//! Decode benchmark: loads a model directory and prints prompt tokens/s, decode tokens/s, time to first token,
//! load time and peak RSS, as one line of JSON and a human line.
//!
//!   cargo bench --bench decode -- [--model DIR] [--prompt-tokens 64] [--tokens 64] [--threads N] [--runs 3]
//!                                 [--sweep]
//!
//! `--sweep` also times one decode step after 64, 256, 1024, ... cached tokens (up to the context), to show
//! that a step's cost grows at most linearly with the context (the KV cache is not copied per step).
//!
//! It also reports the weight bytes one decode step reads, this machine's read bandwidth (1 GiB summed by the same
//! number of threads) and so the bandwidth ceiling of decode speed, and the load's peak RSS against the resident
//! size after loading.
//!
//! Without --model it uses the default model. For the 2B-4T shape:
//!   python3 models/make_synthetic.py /tmp/syn2b4t
//!   cargo run --release -- export --from /tmp/syn2b4t --out /tmp/syn2b4t-onnx
//!   cargo bench --bench decode -- --model /tmp/syn2b4t-onnx

use std::path::PathBuf;
use std::time::Instant;

use bitnetd::engine::{sampler::argmax, LoadOptions, Model};
use bitnetd::onnx::bitnet::HeadFormat;

/// A `/proc/self/status` field in MiB (`VmHWM` peak, `VmRSS` now).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// Bytes of weights one decode step reads: every linear once (2-bit ternary, or int8 for a pre-packing export)
/// and the output layer; the embedding contributes one row.
fn bytes_per_token(m: &Model) -> f64 {
    let a = &m.meta.architecture;
    let (h, ffn) = (a.hidden_size as f64, a.intermediate_size as f64);
    let (q, kv) = (
        (a.heads * a.head_dim) as f64,
        (a.kv_heads * a.head_dim) as f64,
    );
    let per_layer = h * (q + 2.0 * kv) + q * h + 2.0 * h * ffn + ffn * h;
    let ternary_bytes = if a.ternary_storage == "2bit" {
        0.25
    } else {
        1.0
    };
    let head_bytes = match a.head_format {
        HeadFormat::F32 => 4.0,
        HeadFormat::Int8 => 1.0,
    };
    a.layers as f64 * per_layer * ternary_bytes + a.vocab_size as f64 * h * head_bytes
}

/// Read bandwidth of this machine with `threads` threads, in bytes/s: the best of 5 sums over 1 GiB.
fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut model, mut prompt_tokens, mut tokens, mut threads, mut runs) =
        (None, 64usize, 64usize, None, 3usize);
    let mut sweep = false;
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(val())),
            "--prompt-tokens" => prompt_tokens = val().parse().unwrap(),
            "--tokens" => tokens = val().parse().unwrap(),
            "--threads" => threads = Some(val().parse().unwrap()),
            "--runs" => runs = val().parse().unwrap(),
            "--sweep" => sweep = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = model.unwrap_or_else(bitnetd::default_model::default_model_dir);
    let mut opts = LoadOptions::default();
    if let Some(t) = threads {
        opts.threads = t;
    }
    let t0 = Instant::now();
    let m = Model::load(&dir, &opts).expect("loading the model");
    let load_s = t0.elapsed().as_secs_f64();
    let (load_peak, resident) = (peak_rss_mib(), status_mib("VmRSS:"));
    let vocab = m.meta.architecture.vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let (mut best_prefill, mut best_decode, mut best_ttft) = (0f64, 0f64, f64::MAX);
    for _ in 0..runs {
        let mut s = m.session().unwrap();
        let t = Instant::now();
        let mut logits = s.forward(&prompt).unwrap();
        let prefill = t.elapsed().as_secs_f64();
        let mut id = argmax(&logits);
        let ttft = t.elapsed().as_secs_f64();
        let td = Instant::now();
        for _ in 1..tokens {
            logits = s.forward(&[id]).unwrap();
            id = argmax(&logits);
        }
        let decode = (tokens - 1) as f64 / td.elapsed().as_secs_f64();
        best_prefill = best_prefill.max(prompt_tokens as f64 / prefill);
        best_decode = best_decode.max(decode);
        best_ttft = best_ttft.min(ttft);
    }
    let mut step_ms = serde_json::Map::new();
    if sweep {
        let ctx = m.meta.context_length;
        let mut past = 64;
        while past + 8 < ctx {
            let mut s = m.session().unwrap();
            let fill: Vec<u32> = (0..past as u32).map(|i| (i * 7919 + 13) % vocab).collect();
            for chunk in fill.chunks(256) {
                s.forward(chunk).unwrap();
            }
            let t = Instant::now();
            for _ in 0..8 {
                s.forward(&[1]).unwrap();
            }
            step_ms.insert(
                past.to_string(),
                (t.elapsed().as_secs_f64() * 1e3 / 8.0).into(),
            );
            past *= 4;
        }
    }
    let peak = peak_rss_mib();
    let bytes = bytes_per_token(&m);
    let bandwidth = read_bandwidth(m.threads());
    let ceiling = bandwidth / bytes;
    let out = serde_json::json!({
        "model": m.meta.name, "parameters": m.meta.parameters, "threads": m.threads(),
        "prompt_tokens": prompt_tokens, "tokens": tokens, "runs": runs,
        "prompt_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode, "ttft_ms": best_ttft * 1e3,
        "load_s": load_s, "load_peak_rss_mib": load_peak, "rss_after_load_mib": resident,
        "load_peak_over_resident": load_peak / resident, "peak_rss_mib": peak,
        "kernel": m.kernel().map(|k| k.name()), "head": m.meta.architecture.head_format.to_string(),
        "weight_bytes_per_token": bytes, "read_bandwidth_gb_s": bandwidth / 1e9,
        "bandwidth_ceiling_tokens_per_s": ceiling, "decode_over_ceiling": best_decode / ceiling,
        "attention_layers": m.summary().attention_layers, "decode_step_ms_by_context": step_ms,
    });
    println!("{out}");
    eprintln!(
        "{}: prefill {:.1} tok/s, decode {:.1} tok/s, TTFT {:.1} ms, load {:.2} s, peak RSS {:.0} MiB \
         (load peak {:.2}x resident), {} threads, kernel {}",
        m.meta.name,
        best_prefill,
        best_decode,
        best_ttft * 1e3,
        load_s,
        peak,
        load_peak / resident,
        m.threads(),
        m.kernel().map_or("none", |k| k.name())
    );
    eprintln!(
        "  {:.1} MB of weights per token, read bandwidth {:.1} GB/s: ceiling {:.1} tok/s, decode at {:.0}% of it",
        bytes / 1e6,
        bandwidth / 1e9,
        ceiling,
        100.0 * best_decode / ceiling
    );
}
