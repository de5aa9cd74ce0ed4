//! Decode benchmark: a model directory end to end, every figure of the engine's goals in one run.
//!
//!   cargo bench --bench decode -- [--model DIR] [--threads N] [--prompt-tokens 128] [--long-prompt 1500]
//!                                 [--tokens 32] [--runs 3] [--kv f16|i8|f32] [--weights loaded|mapped]
//!                                 [--output-layer screened|exact] [--contended] [--sweep] [--fidelity TEXT]
//!
//! It reports, as one line of JSON and a few human lines:
//! - prefill tokens/s on a `--prompt-tokens` prompt, and time to first token;
//! - decode tokens/s after that prompt and after a `--long-prompt` one, and their ratio;
//! - peak RSS over the whole run (it includes the long context's KV cache), and the load's peak against the
//!   resident size after loading;
//! - the bytes one decode step reads (weights, the screened output layer's candidates on average, and the KV
//!   cache), this machine's read bandwidth with the same threads
//!   (measured by a child process, so that its buffer is not in the peak, right before each decode run: the
//!   share of the ceiling pairs the best run with the bandwidth of its own moment, on a host whose bandwidth
//!   varies by half from minute to minute), the bandwidth ceiling and decode's share of it, and what a
//!   Raspberry Pi 4 (5.5 GB/s) and Pi 5 (10 GB/s) allow: their ceilings, and their speed at the same share;
//! - before the measured runs, 1000 decode steps bring the thread tuner to the probe rate of a daemon in service;
//! - with `--contended`: decode (160 tokens or more) on 1 thread and on all threads while another process keeps
//!   one core busy, and their ratio (more threads must never be slower on a busy board);
//! - with `--sweep`: one decode step's time after 64, 128, 256, ... cached tokens.
//!
//! `--fidelity TEXT` measures quality instead of speed: the model with the chosen options and the same model with
//! an f32 KV cache read the text file (up to the context) token by token, and the line of JSON gives how close
//! the next-token distributions stay (`engine::fidelity`: mean and largest KL divergence, top-1 agreement, both
//! log-likelihoods). Run it on a real checkpoint before trusting a lossy option (`--kv i8`, the default) with it.
//!
//! Without --model it uses the default model. For the 2B-4T shape:
//!   python3 models/make_synthetic.py /tmp/syn2b4t
//!   cargo run --release -- export --from /tmp/syn2b4t --out /tmp/syn2b4t-onnx
//!   cargo bench --bench decode -- --model /tmp/syn2b4t-onnx --contended

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Instant;

use bitnetd::engine::{
    sampler::argmax, KvFormat, LoadOptions, Model, OutputLayer, WeightResidency,
};

/// Decode steps before the measured runs: enough for the thread tuner's probe period to reach its longest.
const WARMUP_STEPS: usize = 1000;

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

/// `--fidelity`: the model as configured against the same model with an f32 KV cache, over the text at `path`.
fn fidelity(dir: &std::path::Path, opts: LoadOptions, path: &std::path::Path) {
    let exact = LoadOptions {
        kv_format: KvFormat::F32,
        ..opts.clone()
    };
    let reference = Model::load(dir, &exact).expect("loading the model");
    let candidate = Model::load(dir, &opts).expect("loading the model");
    let text = std::fs::read_to_string(path).expect("reading the text");
    let mut ids = reference.encode(text.trim(), false).expect("tokenizing");
    ids.truncate(reference.meta.context_length);
    let t = Instant::now();
    let f = bitnetd::engine::fidelity::compare(&reference, &candidate, &ids).expect("comparing");
    println!(
        "{}",
        serde_json::json!({
            "model": reference.meta.name, "kv_cache": opts.kv_format.name(), "reference_kv_cache": "f32",
            "positions": f.positions, "mean_kl_nats": f.mean_kl, "max_kl_nats": f.max_kl,
            "top1_agreement": f.top1_agreement, "reference_nll": f.reference_nll,
            "candidate_nll": f.candidate_nll,
        })
    );
    eprintln!(
        "{}: {} KV cache against f32 over {} positions ({:.0} s): mean KL {:.2e} nats (largest {:.2e}), top-1 \
         agreement {:.1}%, mean NLL {:.4} against {:.4}",
        reference.meta.name,
        opts.kv_format,
        f.positions,
        t.elapsed().as_secs_f64(),
        f.mean_kl,
        f.max_kl,
        f.top1_agreement * 100.0,
        f.candidate_nll,
        f.reference_nll
    );
}

fn prompt(m: &Model, n: usize, salt: u32) -> Vec<u32> {
    let vocab = m.meta.architecture.vocab_size as u32;
    (0..n as u32)
        .map(|i| (i * 7919 + 13 + salt) % vocab)
        .collect()
}

/// Prefills `ids` (in the engine's prefill steps) and decodes `tokens` greedily: (prefill s, TTFT s, decode tok/s).
fn run(m: &Arc<Model>, ids: &[u32], tokens: usize) -> (f64, f64, f64) {
    let mut s = m.session().unwrap();
    let t = Instant::now();
    let mut logits = vec![];
    for chunk in ids.chunks(m.prefill_chunk()) {
        logits = s.forward(chunk).unwrap();
    }
    let prefill = t.elapsed().as_secs_f64();
    let mut id = argmax(&logits);
    let ttft = t.elapsed().as_secs_f64();
    let td = Instant::now();
    for _ in 1..tokens {
        logits = s.forward(&[id]).unwrap();
        id = argmax(&logits);
    }
    (
        prefill,
        ttft,
        (tokens - 1) as f64 / td.elapsed().as_secs_f64(),
    )
}

/// Best of `runs`: (prefill tok/s, TTFT s, decode tok/s, and the read bandwidth measured right before the best
/// decode run when `threads` is given).
fn best(
    m: &Arc<Model>,
    ids: &[u32],
    tokens: usize,
    runs: usize,
    threads: Option<usize>,
) -> (f64, f64, f64, f64) {
    let mut b = (0f64, f64::MAX, 0f64, 0f64);
    for _ in 0..runs {
        let bw = threads.map_or(0.0, bandwidth_now);
        let (p, t, d) = run(m, ids, tokens);
        b.0 = b.0.max(ids.len() as f64 / p);
        b.1 = b.1.min(t);
        if d > b.2 {
            (b.2, b.3) = (d, bw);
        }
    }
    b
}

/// The read bandwidth now, measured by a child process (bytes/s).
fn bandwidth_now(threads: usize) -> f64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("BITNETD_BENCH_BANDWIDTH", threads.to_string())
        .output()
        .expect("starting the bandwidth probe");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the bandwidth probe prints bytes/s")
}

/// Another process spinning on one core until dropped.
struct Busy(Child);

impl Busy {
    fn start() -> Busy {
        let exe = std::env::current_exe().unwrap();
        Busy(
            Command::new(exe)
                .env("BITNETD_BENCH_BUSY", "1")
                .spawn()
                .expect("starting the busy process"),
        )
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    if let Ok(threads) = std::env::var("BITNETD_BENCH_BANDWIDTH") {
        println!("{}", read_bandwidth(threads.parse().unwrap()));
        return;
    }
    if std::env::var_os("BITNETD_BENCH_BUSY").is_some() {
        let mut x = 0u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let (mut prompt_tokens, mut long_prompt, mut tokens, mut runs) =
        (128usize, 1500usize, 32usize, 3usize);
    let (mut contended, mut sweep) = (false, false);
    let mut fidelity_text = None;
    let mut prefill_chunk = None;
    let mut opts = LoadOptions::default();
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(val())),
            "--prompt-tokens" => prompt_tokens = val().parse().unwrap(),
            "--long-prompt" => long_prompt = val().parse().unwrap(),
            "--tokens" => tokens = val().parse().unwrap(),
            "--threads" => opts.threads = val().parse().unwrap(),
            "--runs" => runs = val().parse().unwrap(),
            "--kv" => opts.kv_format = KvFormat::parse(&val()).expect("--kv f16|i8|f32"),
            "--weights" => {
                opts.residency = WeightResidency::parse(&val()).expect("--weights loaded|mapped")
            }
            "--output-layer" => {
                opts.output_layer =
                    OutputLayer::parse(&val()).expect("--output-layer screened|exact")
            }
            "--prefill-chunk" => prefill_chunk = Some(val().parse().unwrap()),
            "--contended" => contended = true,
            "--sweep" => sweep = true,
            "--fidelity" => fidelity_text = Some(PathBuf::from(val())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = model.unwrap_or_else(bitnetd::default_model::default_model_dir);
    if let Some(text) = fidelity_text {
        return fidelity(&dir, opts, &text);
    }
    let t0 = Instant::now();
    let m = Model::load(&dir, &opts).expect("loading the model");
    let load_s = t0.elapsed().as_secs_f64();
    if let Some(c) = prefill_chunk {
        m.set_prefill_chunk(c);
    }
    let (load_peak, resident) = (status_mib("VmHWM:"), status_mib("VmRSS:"));
    let threads = m.threads();
    let ctx = m.meta.context_length;
    let long_prompt = long_prompt.min(ctx.saturating_sub(tokens + 1));

    let short = prompt(&m, prompt_tokens, 0);
    // The thread tuner (`engine::tuner`) probes one thread fewer every 32 steps at first, every 512 once the
    // probes keep confirming its choice: a daemon in service runs at that steady rate. Decoding to it first
    // keeps the measured runs from paying the first minutes' probes (8 slower steps in a run of 32 skew it).
    let warm = std::cmp::min(WARMUP_STEPS, ctx.saturating_sub(prompt_tokens + 1));
    if warm > 0 {
        run(&m, &short, warm);
    }
    let (prefill, ttft, decode, bandwidth) = best(&m, &short, tokens, runs, Some(threads));
    let long = prompt(&m, long_prompt, 1);
    let (_, _, decode_long, _) = best(&m, &long, tokens, runs.min(2), None);
    let peak = status_mib("VmHWM:");

    let mut contention = serde_json::Value::Null;
    if contended {
        let _busy = Busy::start();
        // Alternating, so that both counts see the same moments of a noisy host; long enough runs that the
        // session's thread tuner (`engine::tuner`) measures and chooses within each, as it would in the daemon.
        let (mut one, mut all) = (0f64, 0f64);
        let tokens = tokens.max(160);
        for _ in 0..runs {
            m.set_threads(1);
            one = one.max(best(&m, &short, tokens, 1, None).2);
            m.set_threads(threads);
            all = all.max(best(&m, &short, tokens, 1, None).2);
        }
        let totals = m.team_totals();
        contention = serde_json::json!({
            "decode_1_thread": one, "decode_all_threads": all, "ratio": all / one,
            "chunks_taken_over": totals.taken_over, "chunks": totals.chunks,
        });
    }

    let mut step_ms = serde_json::Map::new();
    if sweep {
        let mut past = 64;
        while past + 8 < ctx {
            let mut s = m.session().unwrap();
            for chunk in prompt(&m, past, 2).chunks(m.prefill_chunk()) {
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
            past *= 2;
        }
    }

    let plan = m.summary();
    let row = plan.embedding_bytes as f64 / m.meta.architecture.vocab_size.max(1) as f64;
    // The screened output layer's exact rows, on average over every step of the run.
    let candidates = m
        .screen_counts()
        .map(|c| c.rescored as f64 / c.steps.max(1) as f64);
    let candidate_bytes = m.screen_counts().map_or(0.0, |c| {
        c.rescored as f64 / c.steps.max(1) as f64 * c.candidate_bytes as f64
    });
    let step_bytes = |context: usize| {
        plan.product_bytes as f64
            + candidate_bytes
            + row
            + m.kv_bytes_per_token() as f64 * context as f64
    };
    let (bytes_short, bytes_long) = (
        step_bytes(prompt_tokens + tokens / 2),
        step_bytes(long_prompt + tokens / 2),
    );
    let ceiling = bandwidth / bytes_short;
    let share = decode / ceiling;
    let pi = |gb_s: f64| share * gb_s * 1e9 / bytes_short;
    let pi_ceiling = |gb_s: f64| gb_s * 1e9 / bytes_short;
    let out = serde_json::json!({
        "model": m.meta.name, "parameters": m.meta.parameters, "threads": threads,
        "kernel": m.kernel().map(|k| k.name()), "kv_cache": plan.kv.format.name(),
        "weights": if plan.products_mapped { "mapped" } else { "loaded" },
        "output_layer": if plan.screened_output { "screened" } else { "exact" },
        "screen_candidates_per_token": candidates,
        "prompt_tokens": prompt_tokens, "long_prompt_tokens": long_prompt, "tokens": tokens, "runs": runs,
        "prefill_tokens_per_s": prefill, "ttft_ms": ttft * 1e3,
        "decode_tokens_per_s": decode, "decode_long_tokens_per_s": decode_long,
        "long_over_short": decode_long / decode,
        "load_s": load_s, "load_peak_rss_mib": load_peak, "rss_after_load_mib": resident,
        "load_peak_over_resident": load_peak / resident, "peak_rss_mib": peak,
        "bytes_per_token": bytes_short, "bytes_per_token_long": bytes_long,
        "read_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_ceiling_tokens_per_s": ceiling,
        "decode_over_ceiling": share,
        "pi4_tokens_per_s_at_5_5_gb_s": pi(5.5), "pi5_tokens_per_s_at_10_gb_s": pi(10.0),
        "pi4_ceiling_tokens_per_s": pi_ceiling(5.5), "pi5_ceiling_tokens_per_s": pi_ceiling(10.0),
        "contended": contention, "decode_step_ms_by_context": step_ms,
    });
    println!("{out}");
    eprintln!(
        "{}: {} threads, kernel {}, {} KV cache, {} weights, {} output layer{}",
        m.meta.name,
        threads,
        m.kernel().map_or("none", |k| k.name()),
        plan.kv.format,
        if plan.products_mapped {
            "mapped"
        } else {
            "loaded"
        },
        if plan.screened_output {
            "screened"
        } else {
            "exact"
        },
        candidates.map_or(String::new(), |c| format!(" ({c:.0} candidates per token)"))
    );
    eprintln!(
        "  prefill {prefill:.1} tok/s ({prompt_tokens} tokens, TTFT {:.0} ms); decode {decode:.1} tok/s after \
         {prompt_tokens}, {decode_long:.1} after {long_prompt} ({:.2}x)",
        ttft * 1e3,
        decode_long / decode
    );
    eprintln!(
        "  load {load_s:.2} s (peak {:.2}x resident), peak RSS {peak:.0} MiB",
        load_peak / resident
    );
    eprintln!(
        "  {:.0} MB read per token, read bandwidth {:.1} GB/s: ceiling {ceiling:.1} tok/s, decode at {:.0}% of it \
         (Pi 4 at 5.5 GB/s: ceiling {:.1}, {:.1} tok/s at that share; Pi 5 at 10 GB/s: ceiling {:.1}, {:.1} tok/s)",
        bytes_short / 1e6,
        bandwidth / 1e9,
        100.0 * share,
        pi_ceiling(5.5),
        pi(5.5),
        pi_ceiling(10.0),
        pi(10.0)
    );
    if !contention.is_null() {
        eprintln!(
            "  one core busy: 1 thread {:.1} tok/s, {threads} threads {:.1} tok/s ({:.2}x)",
            contention["decode_1_thread"].as_f64().unwrap(),
            contention["decode_all_threads"].as_f64().unwrap(),
            contention["ratio"].as_f64().unwrap()
        );
    }
}
