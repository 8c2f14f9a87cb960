//! Timing of the fused ops against their composite candle formulations, and of one training
//! step of a ~6.4M-parameter Llama. Run with `cargo bench -p eg-model --bench train_step`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use eg_model::ops::{self, RopeLayout};
use eg_model::{Llama, LlamaConfig};

fn best_of<F: FnMut()>(n: usize, mut f: F) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..n {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn fwd_bwd(f: &dyn Fn(&Tensor) -> Tensor, x: &Var) -> f64 {
    best_of(5, || {
        let y = f(x.as_tensor());
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
    })
}

fn main() {
    println!("threads: {}", candle_core::utils::get_num_threads());
    let only_step = std::env::args().any(|a| a == "step");
    if std::env::args().any(|a| a == "compare") {
        compare_composite();
        return;
    }
    if !only_step {
        ops_timings();
    }
    train_step();
}

fn ops_timings() {
    // RMSNorm on [8*256, 256].
    let x = Var::from_tensor(&randn(&[2048, 256])).unwrap();
    let w = randn(&[256]);
    let fused = fwd_bwd(&|x| ops::rms_norm(x, &w, 1e-5).unwrap(), &x);
    let comp = fwd_bwd(
        &|x| {
            let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            x.broadcast_mul(&r).unwrap().broadcast_mul(&w).unwrap()
        },
        &x,
    );
    println!(
        "rms_norm [2048,256] fwd+bwd: fused {:.2} ms, composite {:.2} ms",
        fused * 1e3,
        comp * 1e3
    );

    // Causal softmax on scores [8, 8, 256, 256].
    let s = Var::from_tensor(&randn(&[8, 8, 256, 256])).unwrap();
    let mask: Vec<f32> = (0..256 * 256)
        .map(|k| {
            if k % 256 <= k / 256 {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (256, 256), &Device::Cpu).unwrap();
    let fused = fwd_bwd(&|x| ops::causal_softmax(x, 0.125, 256, None).unwrap(), &s);
    let comp = fwd_bwd(
        &|x| {
            let y = (x * 0.125).unwrap().broadcast_add(&mask).unwrap();
            candle_nn::ops::softmax(&y, D::Minus1).unwrap()
        },
        &s,
    );
    println!(
        "causal softmax [8,8,256,256] fwd+bwd: fused {:.2} ms, composite {:.2} ms",
        fused * 1e3,
        comp * 1e3
    );

    // RoPE on [8, 8, 256, 32].
    let q = Var::from_tensor(&randn(&[8, 8, 256, 32])).unwrap();
    let cos = randn(&[256, 16]);
    let sin = randn(&[256, 16]);
    let fused = fwd_bwd(
        &|x| ops::rope(x, &cos, &sin, RopeLayout::HalfSplit).unwrap(),
        &q,
    );
    let comp = fwd_bwd(
        &|x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap(),
        &q,
    );
    println!(
        "rope [8,8,256,32] fwd+bwd: fused {:.2} ms, composite {:.2} ms",
        fused * 1e3,
        comp * 1e3
    );

    // SwiGLU on [2048, 704].
    let g = Var::from_tensor(&randn(&[2048, 704])).unwrap();
    let u = randn(&[2048, 704]);
    let fused = fwd_bwd(&|x| ops::swiglu(x, &u).unwrap(), &g);
    let comp = fwd_bwd(&|x| (x.silu().unwrap() * &u).unwrap(), &g);
    println!(
        "swiglu [2048,704] fwd+bwd: fused {:.2} ms, composite {:.2} ms",
        fused * 1e3,
        comp * 1e3
    );

    // Cross entropy on [2048, 6144].
    let l = Var::from_tensor(&randn(&[2048, 6144])).unwrap();
    let targets: Vec<Option<u32>> = (0..2048).map(|i| Some((i * 7 % 6144) as u32)).collect();
    let labels = Tensor::from_vec(
        targets.iter().map(|t| t.unwrap_or(0)).collect::<Vec<u32>>(),
        2048,
        &Device::Cpu,
    )
    .unwrap();
    let fused = fwd_bwd(&|x| ops::cross_entropy(x, &targets).unwrap(), &l);
    let comp = fwd_bwd(&|x| candle_nn::loss::cross_entropy(x, &labels).unwrap(), &l);
    println!(
        "cross entropy [2048,6144] fwd+bwd: fused {:.2} ms, composite {:.2} ms",
        fused * 1e3,
        comp * 1e3
    );
}

fn train_step() {
    // One training step: h256, 4 layers, 8 heads, vocab 6144, seq 256, batch 8.
    let cfg = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 704,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(8),
        vocab_size: 6144,
        max_position_embeddings: 256,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    println!("model: {} parameters", model.params().num_elements());
    let ids: Vec<u32> = (0..8 * 256u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 6144)
        .collect();
    let ids = Tensor::from_vec(ids, (8, 256), &Device::Cpu).unwrap();
    let mut opt = candle_nn::AdamW::new_lr(model.params().vars(), 1e-3).unwrap();
    let (mut tf, mut tb, mut to) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    let a = model.analyze(256);
    {
        // Activation memory: resident-set growth over one forward (graph kept alive) vs the
        // analysis' prediction.
        let before = rss_bytes();
        let logits = model.forward(&ids).unwrap();
        let loss = model.next_token_loss(&logits, &ids, None).unwrap();
        let after = rss_bytes();
        println!(
            "forward RSS growth {:.1} MiB; analysis predicts {:.1} MiB of activations",
            (after.saturating_sub(before)) as f64 / 1048576.0,
            (a.activation_bytes_per_token * 2048) as f64 / 1048576.0
        );
        drop(loss);
    }
    for step in 0..4 {
        let t0 = Instant::now();
        let logits = model.forward(&ids).unwrap();
        let loss = model.next_token_loss(&logits, &ids, None).unwrap();
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let t2 = Instant::now();
        opt.step(&grads).unwrap();
        let t3 = Instant::now();
        if step > 0 {
            tf = tf.min((t1 - t0).as_secs_f64());
            tb = tb.min((t2 - t1).as_secs_f64());
            to = to.min((t3 - t2).as_secs_f64());
        }
        println!("step {step}: loss {:.4}", loss.to_scalar::<f32>().unwrap());
    }
    let total = tf + tb + to;
    println!(
        "train step (best of 3): forward {:.0} ms, backward {:.0} ms, AdamW {:.0} ms; {:.0} tokens/s",
        tf * 1e3,
        tb * 1e3,
        to * 1e3,
        2048.0 / total
    );
    println!(
        "achieved {:.1} GFLOP/s (training FLOPs {} per token)",
        a.training_flops_per_token as f64 * 2048.0 / total / 1e9,
        a.training_flops_per_token
    );
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The same Llama written with composite candle ops (all differentiable), reading the same
/// parameters: the baseline the fused ops are compared with.
fn composite_forward(model: &Llama, ids: &Tensor) -> Tensor {
    let cfg = model.config();
    let p = |n: &str| model.params().get(n).unwrap().as_tensor().clone();
    let (b, t) = ids.dims2().unwrap();
    let (h, nh, nkv, hd) = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_kv_heads(),
        cfg.head_dim(),
    );
    let rms = |x: &Tensor, w: &Tensor| {
        let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + cfg.rms_norm_eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
    };
    let lin = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t().unwrap()).unwrap();
    let inv: Vec<f32> = cfg.inv_freq().iter().map(|&f| f as f32).collect();
    let ang: Vec<f32> = (0..t)
        .flat_map(|q| inv.iter().map(move |f| q as f32 * f))
        .collect();
    let ang = Tensor::from_vec(ang, (t, hd / 2), &Device::Cpu).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t <= k / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
    let mut x = p("model.embed_tokens.weight")
        .index_select(&ids.flatten_all().unwrap(), 0)
        .unwrap()
        .reshape((b, t, h))
        .unwrap();
    for l in 0..cfg.num_hidden_layers {
        let n = |s: &str| p(&format!("model.layers.{l}.{s}"));
        let hs = rms(&x, &n("input_layernorm.weight"));
        let heads = |y: Tensor, k: usize| {
            y.reshape((b, t, k, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = heads(lin(&hs, &n("self_attn.q_proj.weight")), nh);
        let k = heads(lin(&hs, &n("self_attn.k_proj.weight")), nkv);
        let v = heads(lin(&hs, &n("self_attn.v_proj.weight")), nkv);
        let q = candle_nn::rotary_emb::rope_slow(&q, &cos, &sin).unwrap();
        let k = candle_nn::rotary_emb::rope_slow(&k, &cos, &sin).unwrap();
        let rep = nh / nkv;
        let k = candle_transformers_free_repeat(&k, rep);
        let v = candle_transformers_free_repeat(&v, rep);
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let pr = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let a = pr
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, nh * hd))
            .unwrap();
        x = (x + lin(&a, &n("self_attn.o_proj.weight"))).unwrap();
        let hs = rms(&x, &n("post_attention_layernorm.weight"));
        let g = lin(&hs, &n("mlp.gate_proj.weight")).silu().unwrap();
        let u = lin(&hs, &n("mlp.up_proj.weight"));
        x = (x + lin(&(g * u).unwrap(), &n("mlp.down_proj.weight"))).unwrap();
    }
    let x = rms(&x, &p("model.norm.weight"));
    lin(&x, &p("lm_head.weight"))
}

fn candle_transformers_free_repeat(x: &Tensor, rep: usize) -> Tensor {
    if rep == 1 {
        return x.clone();
    }
    let (b, n, t, d) = x.dims4().unwrap();
    Tensor::cat(&vec![x; rep], 2)
        .unwrap()
        .reshape((b, n * rep, t, d))
        .unwrap()
}

fn compare_composite() {
    let cfg = LlamaConfig {
        hidden_size: 256,
        intermediate_size: 704,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(8),
        vocab_size: 6144,
        max_position_embeddings: 256,
        ..LlamaConfig::tiny_for_tests()
    };
    let model = Llama::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..8 * 256u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 6144)
        .collect();
    let ids = Tensor::from_vec(ids, (8, 256), &Device::Cpu).unwrap();
    let labels = ids.narrow(1, 1, 255).unwrap().flatten_all().unwrap();
    // Same loss value both ways (a correctness check of the comparison itself).
    let fused_loss = {
        let l = model.forward(&ids).unwrap();
        model
            .next_token_loss(&l, &ids, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let comp_loss = {
        let l = composite_forward(&model, &ids).narrow(1, 0, 255).unwrap();
        candle_nn::loss::cross_entropy(&l.reshape((8 * 255, 6144)).unwrap(), &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    println!("loss fused {fused_loss:.6}, composite {comp_loss:.6}");
    let (mut best_f, mut best_c) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        // Alternate so both see the same machine load.
        let t = Instant::now();
        let l = model.forward(&ids).unwrap();
        let g = model
            .next_token_loss(&l, &ids, None)
            .unwrap()
            .backward()
            .unwrap();
        best_f = best_f.min(t.elapsed().as_secs_f64());
        drop(g);
        let t = Instant::now();
        let l = composite_forward(&model, &ids).narrow(1, 0, 255).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&l.reshape((8 * 255, 6144)).unwrap(), &labels).unwrap();
        let g = loss.backward().unwrap();
        best_c = best_c.min(t.elapsed().as_secs_f64());
        drop(g);
    }
    println!(
        "forward+backward, best of 3 alternating: fused {:.0} ms, composite {:.0} ms ({:.2}x)",
        best_f * 1e3,
        best_c * 1e3,
        best_c / best_f
    );
}
