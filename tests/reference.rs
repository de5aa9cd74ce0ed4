//! The exported model, run by tract, against what Hugging Face transformers computes for the same checkpoint.
//!
//! Fixtures: `tests/fixtures/reference/<case>/` holds a tiny random checkpoint in the exact 2B-4T layout and
//! `expected.json`, both made by `models/make_reference.py` (transformers' BitNetForCausalLM, float32, eager).
//! Each case is exported with `bitnetd::export`, loaded with the engine, and checked for:
//! - the same prompt token ids from `tokenizer.json`;
//! - last-position logits within tolerance (see `TOLERANCE`);
//! - the same greedy continuation, token for token, through the KV cache;
//! - agreement with onnxruntime on the same exported file (`onnxruntime.json`, recorded by
//!   `models/ort_reference.py`, so CI needs no Python).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bitnetd::engine::{
    sampler::argmax, GenerateParams, KvFormat, LoadOptions, Model, OutputLayer, Prompt,
    SamplingParams,
};
use bitnetd::export::ExportOptions;
use bitnetd::onnx::bitnet::{EmbeddingFormat, HeadFormat, TableFormats};
use serde::Deserialize;

/// Max |logit - transformers| relative to the largest reference |logit|. The int8 activation quantization is a
/// step function: a float32 difference of one ulp in `x * 127 / max|x|` can move one activation across a
/// rounding boundary, which changes one linear's output by `|w| / scale` and the logits by up to about 1% of
/// their range (seen once in these fixtures: `llama-bitnet-mha-silu`, "Hello world", 0.84%; onnxruntime running
/// the same file shows the identical deviation, so it is the boundary, not the runtime). Everything else
/// (RMSNorm, RoPE, softmax order) differs by a few ulps (3e-7 on the other prompts). Structural errors move the
/// logits by 10-100% of the range: `wrong_scale_convention_is_detected` shows one.
const TOLERANCE: f32 = 1e-2;

/// tract against onnxruntime on the same ONNX file: same quantization decisions, so only float rounding differs.
const ORT_TOLERANCE: f32 = 1e-4;

/// Max |logit - transformers| relative to the range with `--head int8`: the int8 rounding of the weights and of
/// the final hidden state adds about 1% (measured up to 1.3%) to the boundary effect above.
const INT8_HEAD_TOLERANCE: f32 = 2.5e-2;

/// The f16 KV cache, see `f16_kv_cache_stays_close_to_transformers`.
const F16_KV_TOLERANCE: f32 = 5e-2;

/// The int8 KV cache, see `int8_kv_cache_stays_close_to_transformers`.
const INT8_KV_TOLERANCE: f32 = 8e-2;

/// Max |logit - transformers| relative to the range with the int4 output layer: measured 8-15%.
const INT4_HEAD_TOLERANCE: f32 = 0.2;

/// The same with `--embedding int8` too: measured up to 8.5%.
const INT8_EMBEDDING_TOLERANCE: f32 = 0.15;

const CASES: [&str; 5] = [
    "gqa-autobitlinear",
    "gqa-bitlinear",
    "mha-autobitlinear",
    "gqa-online-bf16",
    "llama-bitnet-mha-silu",
];

#[derive(Deserialize)]
struct Expected {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct OrtCase {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    last_logits: Vec<f32>,
}

#[derive(Deserialize)]
struct OrtExpected {
    cases: Vec<OrtCase>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    last_logits: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// Exported with the default options, loaded with an f32 KV cache: the path that computes what transformers does.
fn export_and_load(case: &str, threads: usize) -> (tempfile::TempDir, Arc<Model>, Expected) {
    export_with(case, threads, &Default::default(), KvFormat::F32)
}

fn export_with(
    case: &str,
    threads: usize,
    opts: &ExportOptions,
    kv_format: KvFormat,
) -> (tempfile::TempDir, Arc<Model>, Expected) {
    let src = fixtures().join(case);
    let out = tempfile::tempdir().unwrap();
    bitnetd::export::export(&src, out.path(), opts, &mut |_| {}).unwrap();
    // The exact output layer: these tests measure each format's effect on every logit. The screened layer (the
    // default) is checked against it token for token below.
    let load = LoadOptions {
        threads,
        kv_format,
        output_layer: OutputLayer::Exact,
        ..Default::default()
    };
    let model = Model::load(out.path(), &load).unwrap();
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    (out, model, exp)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn check_case(case: &str, threads: usize) {
    let (_dir, model, exp) = export_and_load(case, threads);
    let ort_text = std::fs::read_to_string(fixtures().join(case).join("onnxruntime.json")).unwrap();
    let ort: OrtExpected = serde_json::from_str(&ort_text).unwrap();
    let plan = model.summary();
    assert_eq!(
        plan.attention_layers, model.meta.architecture.layers,
        "every layer runs bitnetd's attention with its own KV cache"
    );
    assert_eq!(
        plan.packed_linears,
        4 * model.meta.architecture.layers,
        "QKV, O, gate-up and down run on 2-bit packed weights, the f32 output layer on f32"
    );
    assert_eq!(plan.linears, plan.packed_linears + 1);
    assert!(model.kernel().is_some_and(|k| k.is_supported()));
    for c in &exp.cases {
        assert_eq!(
            model.encode(&c.prompt, true).unwrap(),
            c.prompt_ids,
            "{case}: tokenization of {:?}",
            c.prompt
        );
        let mut s = model.session().unwrap();
        let mut logits = s.forward(&c.prompt_ids).unwrap();
        let d = max_rel_diff(&logits, &c.last_logits);
        assert!(
            d <= TOLERANCE,
            "{case} {:?}: last-position logits differ by {d} of their range",
            c.prompt
        );
        let mut got = vec![];
        for _ in 0..c.greedy_ids.len() {
            let id = argmax(&logits);
            got.push(id);
            logits = s.forward(&[id]).unwrap();
        }
        assert_eq!(
            got, c.greedy_ids,
            "{case} {:?}: greedy continuation",
            c.prompt
        );
    }
    for o in &ort.cases {
        let logits = model.session().unwrap().forward(&o.prompt_ids).unwrap();
        let d = max_rel_diff(&logits, &o.last_logits);
        assert!(
            d <= ORT_TOLERANCE,
            "{case}: tract and onnxruntime logits differ by {d} of their range"
        );
        let c = exp
            .cases
            .iter()
            .find(|c| c.prompt_ids == o.prompt_ids)
            .unwrap();
        assert_eq!(
            o.greedy_ids, c.greedy_ids,
            "{case}: onnxruntime's greedy continuation"
        );
    }
}

#[test]
fn gqa_autobitlinear_packed_bf16_matches_transformers() {
    check_case("gqa-autobitlinear", 1);
}

#[test]
fn gqa_bitlinear_packed_bf16_matches_transformers() {
    check_case("gqa-bitlinear", 1);
}

#[test]
fn mha_autobitlinear_matches_transformers() {
    check_case("mha-autobitlinear", 2);
}

#[test]
fn float_master_weights_ternarized_online_match_transformers() {
    check_case("gqa-online-bf16", 2);
}

/// `--head int8`: the output layer on int8 weights and activations. Measured on these fixtures: logits within
/// 0.7-1.3% of their range, every greedy continuation unchanged.
#[test]
fn int8_head_stays_close_to_transformers() {
    let tables = TableFormats {
        head: HeadFormat::Int8,
        embedding: EmbeddingFormat::Float,
    };
    for (case, prompt, d, same, n) in effect(tables, KvFormat::F32) {
        assert!(
            d <= INT8_HEAD_TOLERANCE,
            "{case} {prompt:?}: logits off by {d} of their range"
        );
        assert_eq!(same, n, "{case} {prompt:?}: greedy continuation");
    }
}

/// The screened output layer (the default for int8 output layers: a 4-bit screen over every row, exact int8
/// products for the rows that can hold the largest logit) against the exact int8 layer, on the same export:
/// every greedy continuation is the same token for token, and every logit of the prompt's last position is either
/// the exact layer's, bit for bit (the candidates, the largest always among them), or its estimate, within the
/// screen's error (measured: 8-16% of the range on these fixtures, where hidden = 64 makes each row's noise
/// large against its signal; 4-23 of the 320 rows were candidates). Checked: within 20%.
#[test]
fn screened_output_layer_keeps_the_int8_layers_greedy_output() {
    let opts = ExportOptions {
        head: Some(HeadFormat::Int8),
        ..Default::default()
    };
    for case in CASES {
        let src = fixtures().join(case);
        let out = tempfile::tempdir().unwrap();
        bitnetd::export::export(&src, out.path(), &opts, &mut |_| {}).unwrap();
        let load = |output_layer| {
            let opts = LoadOptions {
                threads: 2,
                kv_format: KvFormat::F32,
                output_layer,
                ..Default::default()
            };
            Model::load(out.path(), &opts).unwrap()
        };
        let (screened, exact) = (load(OutputLayer::Screened), load(OutputLayer::Exact));
        // (At these fixtures' hidden size of 64 the screen reads as many bytes as the int8 rows: a plane row is
        // padded to a group of 128 columns. At 2B-4T's 2560 it reads half; benches/decode.rs reports it.)
        assert!(screened.summary().screened_output && !exact.summary().screened_output);
        let exp: Expected =
            serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap())
                .unwrap();
        for c in &exp.cases {
            let (mut s, mut e) = (screened.session().unwrap(), exact.session().unwrap());
            let (mut ls, mut le) = (
                s.forward(&c.prompt_ids).unwrap(),
                e.forward(&c.prompt_ids).unwrap(),
            );
            let same = ls.iter().zip(&le).filter(|(a, b)| a == b).count();
            let d = max_rel_diff(&ls, &le);
            eprintln!(
                "{case} {:?}: {same} of {} logits exact, the rest within {d:.4} of the range",
                c.prompt,
                le.len()
            );
            assert!(same >= 1 && d <= 0.2, "{case} {:?}", c.prompt);
            assert_eq!(ls[argmax(&le) as usize], le[argmax(&le) as usize]);
            for step in 0..c.greedy_ids.len() {
                let (a, b) = (argmax(&ls), argmax(&le));
                assert_eq!(a, b, "{case} {:?}: token {step}", c.prompt);
                ls = s.forward(&[a]).unwrap();
                le = e.forward(&[b]).unwrap();
            }
        }
        let counts = screened.screen_counts().unwrap();
        assert!(counts.steps > 0 && counts.rescored >= counts.steps);
    }
}

/// The int4 output layer (library only, not an export option): 4-bit weights in groups of 128 columns, each
/// with its scale, and int8 activations. Its rounding is ~10% of a weight's spread, which moves these random
/// fixtures' logits by 8-15% of their range (measured) and changes 9 of the 15 greedy continuations (after 1-10
/// tokens; their top logits are close by construction). That is why it is not offered: it needs its best
/// candidates rescored exactly first. Checked: the deviation stays bounded (a broken layout, scale or
/// padding moves logits by the whole range) and the first greedy token of most prompts holds.
#[test]
fn int4_head_effect_is_bounded() {
    let tables = TableFormats {
        head: HeadFormat::Int4,
        embedding: EmbeddingFormat::Float,
    };
    let results = effect(tables, KvFormat::F32);
    for (case, prompt, d, _, _) in &results {
        assert!(
            *d <= INT4_HEAD_TOLERANCE,
            "{case} {prompt:?}: logits off by {d} of their range"
        );
    }
    let first = results.iter().filter(|r| r.3 >= 1).count();
    assert!(
        first * 4 >= results.len() * 3,
        "{first} of {} first tokens held",
        results.len()
    );
}

/// `--head int8 --embedding int8`: one shared int8 table. The embedding's rounding perturbs the input of every
/// layer, which crosses many activation-quantization boundaries: logits move by 3-9% of their range here and
/// greedy continuations of these random models diverge after a few tokens. Reported, and bounded so that a
/// broken table (wrong scale, wrong row) still fails.
#[test]
fn int8_embedding_effect_is_bounded() {
    let tables = TableFormats {
        head: HeadFormat::Int8,
        embedding: EmbeddingFormat::Int8,
    };
    for (case, prompt, d, _, _) in effect(tables, KvFormat::F32) {
        assert!(
            d <= INT8_EMBEDDING_TOLERANCE,
            "{case} {prompt:?}: logits off by {d} of their range"
        );
    }
}

/// The f16 KV cache (`[model] kv_cache = "f16"`), with the default tables. Keys and values are rounded to f16 as they
/// are stored (a relative error of at most 2⁻¹¹); through the activation quantization's boundaries that moves
/// these random fixtures' logits by 0.8-3.3% of their range (measured), like the int8 output layer's 0.7-1.3%.
/// 12 of the 15 greedy continuations are unchanged; the other three (of models whose top logits are near ties)
/// part after 6, 10 and 11 tokens. Checked: within 5%, and the first six tokens of every continuation.
#[test]
fn f16_kv_cache_stays_close_to_transformers() {
    let mut unchanged = 0;
    let results = effect(TableFormats::default(), KvFormat::F16);
    for (case, prompt, d, same, n) in &results {
        assert!(
            *d <= F16_KV_TOLERANCE,
            "{case} {prompt:?}: logits off by {d} of their range"
        );
        assert!(
            *same >= 6.min(*n),
            "{case} {prompt:?}: greedy continuation parts after {same}"
        );
        unchanged += usize::from(same == n);
    }
    assert!(
        unchanged >= results.len() * 3 / 4,
        "{unchanged} of {} continuations unchanged",
        results.len()
    );
}

/// The int8 KV cache (one scale per position and KV head; the daemon's default). Its
/// rounding is at most half a step of 1/127 of a row's largest value, coarser than f16's, and the query is
/// quantized to int8 the same way for the integer score products (as llama.cpp does for its q8_0 cache).
/// Measured on these random fixtures: logits within 2.1-6.0% of their range (f16: 0.8-3.3%), 9 of the 15 greedy
/// continuations unchanged, the others parting after 0-10 tokens (models whose top logits are near ties; two part
/// at their first token). Checked: the 8% bound, 9 continuations whole and 13 first tokens (a wrong scale or
/// layout moves logits by the whole range and changes nearly every token). On the trained default model, whose
/// logits are not near ties, int8 keeps 99% of the top tokens and stays near f16's closeness to f32
/// (tests/default_model.rs).
#[test]
fn int8_kv_cache_stays_close_to_transformers() {
    let results = effect(TableFormats::default(), KvFormat::I8);
    for (case, prompt, d, _, _) in &results {
        assert!(
            *d <= INT8_KV_TOLERANCE,
            "{case} {prompt:?}: logits off by {d} of their range"
        );
    }
    let whole = results.iter().filter(|r| r.3 == r.4).count();
    let first = results.iter().filter(|r| r.3 >= 1).count();
    assert!(
        whole >= 9 && first >= 13,
        "{whole} whole, {first} first tokens of {}",
        results.len()
    );
}

/// For every fixture prompt: (case, prompt, logit error relative to the range, greedy tokens matching before the
/// first difference, greedy tokens expected).
fn effect(tables: TableFormats, kv: KvFormat) -> Vec<(&'static str, String, f32, usize, usize)> {
    let opts = ExportOptions {
        head: Some(tables.head),
        embedding: tables.embedding,
        ..Default::default()
    };
    let mut out = vec![];
    for case in CASES {
        let (_dir, model, exp) = export_with(case, 2, &opts, kv);
        let quantized_head = usize::from(tables.head != HeadFormat::F32);
        assert_eq!(
            model.summary().packed_linears,
            4 * model.meta.architecture.layers + quantized_head,
            "{case}: packed products ({tables:?})"
        );
        for c in &exp.cases {
            let mut s = model.session().unwrap();
            let mut logits = s.forward(&c.prompt_ids).unwrap();
            let d = max_rel_diff(&logits, &c.last_logits);
            let mut same = 0;
            for &want in &c.greedy_ids {
                let id = argmax(&logits);
                if id != want {
                    break;
                }
                same += 1;
                logits = s.forward(&[id]).unwrap();
            }
            eprintln!(
                "{tables:?} {kv} {case} {:?}: logits off by {d:.4} of range, greedy {same}/{} tokens",
                c.prompt,
                c.greedy_ids.len()
            );
            out.push((case, c.prompt.clone(), d, same, c.greedy_ids.len()));
        }
    }
    out
}

/// The test above can fail: reading a `bitlinear` checkpoint with the `autobitlinear` convention (multiply
/// instead of divide by weight_scale) puts the logits far outside the tolerance.
#[test]
fn wrong_scale_convention_is_detected() {
    let src = fixtures().join("gqa-bitlinear");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"bitlinear\"", "\"autobitlinear\"");
    std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
    let out = tempfile::tempdir().unwrap();
    bitnetd::export::export(tmp.path(), out.path(), &Default::default(), &mut |_| {}).unwrap();
    let model = Model::load(
        out.path(),
        &LoadOptions {
            threads: 1,
            kv_format: KvFormat::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let exp: Expected =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let logits = model
        .session()
        .unwrap()
        .forward(&exp.cases[0].prompt_ids)
        .unwrap();
    assert!(max_rel_diff(&logits, &exp.cases[0].last_logits) > 10.0 * TOLERANCE);
}

/// `generate` (sampling loop, streaming, stop handling) gives the reference greedy ids when no stop token
/// intervenes, and streams the same text it returns.
#[test]
fn generate_streams_the_reference_greedy_continuation() {
    let (_dir, model, exp) = export_and_load("gqa-autobitlinear", 2);
    for c in &exp.cases {
        let stops = &model.meta.stop_token_ids;
        let n = c
            .greedy_ids
            .iter()
            .position(|t| stops.contains(t))
            .unwrap_or(c.greedy_ids.len());
        let params = GenerateParams {
            max_tokens: n.max(1),
            sampling: SamplingParams::default(),
            ..Default::default()
        };
        let req = model
            .prepare(&Prompt::Text(c.prompt.clone()), params)
            .unwrap();
        let mut streamed = String::new();
        let g = model
            .session()
            .unwrap()
            .generate(&req, &mut |t: &bitnetd::engine::TokenEvent| {
                streamed.push_str(&t.text);
                ControlFlow::<bitnetd::engine::FinishReason>::Continue(())
            })
            .unwrap();
        assert_eq!(g.token_ids[..n], c.greedy_ids[..n]);
        streamed.push_str(&g.trailing_text);
        assert_eq!(streamed, g.text);
        assert_eq!(g.text, model.decode(&g.token_ids));
    }
}

#[test]
fn llama_style_1bitllm_checkpoint_matches_transformers() {
    check_case("llama-bitnet-mha-silu", 2);
}

/// What the exporter cannot handle is refused with an error that names it.
#[test]
fn unsupported_checkpoints_are_named() {
    let src = fixtures().join("gqa-autobitlinear");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let export = |cfg: &str| {
        std::fs::write(tmp.path().join("config.json"), cfg).unwrap();
        bitnetd::export::export(tmp.path(), out.path(), &Default::default(), &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    std::fs::copy(
        src.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    let e = export(
        &cfg.replace("\"bitnet\"", "\"mistral\"")
            .replace("BitNetForCausalLM", "MistralForCausalLM"),
    );
    assert!(e.contains("mistral") && e.contains("unsupported"), "{e}");
    let e = export(&cfg.replace("\"relu2\"", "\"gelu_new\""));
    assert!(e.contains("gelu_new"), "{e}");
    let e = export(
        &cfg.replace("\"hidden_size\": 64", "\"hidden_size\": 128")
            .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 8"),
    );
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("shape"),
        "a shape mismatch names the tensor: {e}"
    );
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let e = export(&cfg);
    assert!(e.contains("tokenizer.json"), "{e}");
}
