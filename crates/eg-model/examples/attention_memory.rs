//! Peak memory of one attention forward + backward: reference vs chunked (issue 7).
//!
//! ```text
//! cargo run --release -p eg-model --example attention_memory -- chunked 4096
//! cargo run --release -p eg-model --example attention_memory -- reference 4096
//! ```
//! Run each kind in its own process: the figure is the process's peak RSS (`VmHWM`), with
//! the baseline (inputs allocated, before attention) printed alongside.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use eg_model::attention::{AttentionMask, chunked_attention, reference_attention};

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("chunked", String::as_str).to_string();
    let t: usize = args.get(2).map_or(Ok(4096), |s| s.parse())?;
    let (b, h, hkv, d) = (1usize, 8usize, 8usize, 64usize);
    let dev = Device::Cpu;
    let q = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?))?;
    let k = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev)?))?;
    let v = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, hkv, t, d), &dev)?))?;
    let base = status_kb("VmRSS:");
    let mask = AttentionMask::causal();
    let scale = 1.0 / (d as f64).sqrt();
    let start = Instant::now();
    let y = match kind.as_str() {
        "reference" => reference_attention(&q, &k, &v, &mask, scale)?,
        _ => chunked_attention(&q, &k, &v, &mask, scale)?,
    };
    let loss = y.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    let gq = grads.get(q.as_tensor()).map(|g| g.dims().to_vec());
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{kind} seq {t} (batch {b}, heads {h}, head_dim {d}, causal, f32): forward+backward {secs:.2} s, \
         peak RSS {:.1} MiB, baseline {:.1} MiB, dq {gq:?}",
        status_kb("VmHWM:") as f64 / 1024.0,
        base as f64 / 1024.0
    );
    Ok(())
}
