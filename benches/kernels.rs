//! The ternary kernels against tract's own products on the BitNet b1.58 2B-4T layer shapes, at decode (M = 1)
//! and prefill (M = 64): every kernel this CPU runs (`ternary/<kernel>`), tract's int8 `MatMulInteger` with the
//! same weights as an int8 constant (`tract-int8`, what bitnetd exported before 2-bit packing), and tract's f32
//! `MatMul` (`tract-f32`). Weights are random ternary; activations random int8.
//!
//!   cargo bench --bench kernels                      # 1 thread
//!   BENCH_THREADS=2 cargo bench --bench kernels      # rows split across 2 threads (ours and tract's)
//!   cargo bench --bench kernels -- 2560x6912/m1      # one shape
//!
//! Throughput is in weights (k·n·m multiply-adds) per second; the figures are in benches/README.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::prelude::*;

use bitnetd::kernels::{pack, ternary_matmul, Kernel, TernaryWeights};
use bitnetd::onnx::builder::{value_info, Dim, GraphBuilder};

/// (input features k, output features n): q/o, k/v, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)];
const MS: [usize; 2] = [1, 64];

fn executor() -> Executor {
    match std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        Some(n) if n > 1 => Executor::multithread(n),
        _ => Executor::SingleThread,
    }
}

/// A one-node tract plan: `y = x · w` with `w` a `[k, n]` constant, as `MatMulInteger` (int8) or `MatMul` (f32).
fn tract_plan(
    dir: &std::path::Path,
    op: &str,
    dt: DataType,
    x: [usize; 2],
    w: &[u8],
    n: usize,
) -> Arc<TypedSimplePlan> {
    let mut g = GraphBuilder::new(dir, "w.data").unwrap();
    let wname = g.initializer("w", dt, &[x[1], n], w).unwrap();
    g.op_into(op, "y", &["x", &wname], &["y".to_string()], vec![]);
    let dims = [Dim::Fixed(x[0] as i64), Dim::Fixed(x[1] as i64)];
    let out = if dt == DataType::Float {
        DataType::Float
    } else {
        DataType::Int32
    };
    let model = g
        .finish(
            13,
            &[],
            vec![],
            vec![value_info("x", dt, Some(&dims))],
            vec![value_info("y", out, None)],
            "",
        )
        .unwrap();
    let path = dir.join(format!("{op}.onnx"));
    std::fs::write(&path, prost::Message::encode_to_vec(&model)).unwrap();
    tract_onnx::onnx()
        .model_for_path(&path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let exec = executor();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    for (k, n) in SHAPES {
        let w: Vec<i8> = (0..k * n).map(|_| rng.random_range(-1..=1)).collect();
        let packed = pack::pack(&w, n, k).unwrap();
        let tw = TernaryWeights::new(&packed, n, k).unwrap();
        // tract's operand is `[k, n]`.
        let mut wt = vec![0i8; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let w8: Vec<u8> = wt.iter().map(|&v| v as u8).collect();
        let wf: Vec<u8> = wt.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
        for m in MS {
            let x: Vec<i8> = (0..m * k).map(|_| rng.random_range(-127..=127)).collect();
            let mut group = c.benchmark_group(format!("{k}x{n}/m{m}"));
            group.throughput(Throughput::Elements((m * k * n) as u64));
            group.sample_size(if m == 1 { 50 } else { 10 });
            for kernel in Kernel::available() {
                let mut out = vec![0i32; m * n];
                group.bench_function(BenchmarkId::new("ternary", kernel.name()), |b| {
                    b.iter(|| {
                        multithread_tract_scope(exec.clone(), || {
                            ternary_matmul(kernel, tw, &x, m, &mut out).unwrap()
                        })
                    })
                });
            }
            let xi8 = tensor1(&x).into_shape(&[m, k]).unwrap().into_tvalue();
            let plan = tract_plan(dir.path(), "MatMulInteger", DataType::Int8, [m, k], &w8, n);
            group.bench_function("tract-int8", |b| {
                b.iter(|| {
                    multithread_tract_scope(exec.clone(), || plan.run(tvec![xi8.clone()]).unwrap())
                })
            });
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let xf = tensor1(&xf).into_shape(&[m, k]).unwrap().into_tvalue();
            let plan = tract_plan(dir.path(), "MatMul", DataType::Float, [m, k], &wf, n);
            group.bench_function("tract-f32", |b| {
                b.iter(|| {
                    multithread_tract_scope(exec.clone(), || plan.run(tvec![xf.clone()]).unwrap())
                })
            });
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
