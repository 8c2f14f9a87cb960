//! Fused ops: backward against central finite differences (f64) and against the composite
//! candle formulation (f32), plus the issue-4 regression (candle's fused ops drop gradients).

use candle_core::{D, DType, Device, Tensor, Var};
use eg_model::ops::{self, RopeLayout};

use crate::common::{max_abs_diff, rand_t, rand_vec};

pub(crate) type Op<'a> = dyn Fn(&[Tensor]) -> Tensor + 'a;

/// Checks d(sum(f(inputs) * r))/d(inputs[i]) for every `i` in `diff` against central
/// differences, element by element.
pub(crate) fn fd_check(f: &Op<'_>, inputs: &[Tensor], diff: &[usize]) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = rand_t(99, y.dims(), DType::F64);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let eval = |ins: &[Tensor]| -> f64 {
        (f(ins) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for &i in diff {
        let g: Vec<f64> = grads
            .get(&ts[i])
            .unwrap_or_else(|| panic!("input {i} got no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g.len(), base.len());
        let h = 1e-5;
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut ins = inputs.to_vec();
                ins[i] = Tensor::from_vec(v, inputs[i].shape(), &Device::Cpu).unwrap();
                eval(&ins)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - g[j]).abs();
            assert!(
                err <= 1e-6 * (1.0 + numeric.abs()),
                "input {i} element {j}: analytic {} numeric {numeric}",
                g[j]
            );
        }
    }
}

/// Forward and every input's gradient of `fused` equal those of `composite` (f32).
fn composite_check(
    fused: &Op<'_>,
    composite: &Op<'_>,
    inputs: &[Tensor],
    diff: &[usize],
    tol: f64,
) {
    let run = |f: &Op<'_>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = rand_t(7, y.dims(), y.dtype());
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = diff
            .iter()
            .map(|&i| grads.get(&ts[i]).expect("gradient").clone())
            .collect();
        (y, gs)
    };
    let (y1, g1) = run(fused);
    let (y2, g2) = run(composite);
    let d = max_abs_diff(&y1, &y2);
    assert!(d < tol, "forward differs by {d}");
    for (k, (a, b)) in g1.iter().zip(&g2).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < tol, "gradient of input {} differs by {d}", diff[k]);
    }
}

fn rms_composite(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let r = (ms + eps).unwrap().sqrt().unwrap().recip().unwrap();
    x.broadcast_mul(&r).unwrap().broadcast_mul(w).unwrap()
}

fn ln_composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mu = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mu).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let r = (var + eps).unwrap().sqrt().unwrap().recip().unwrap();
    xc.broadcast_mul(&r)
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

/// Additive causal mask `[rows, cols]` (0 or -1e9) for rows stacked in blocks of `q_len`.
fn causal_mask(rows: usize, cols: usize, q_len: usize, window: Option<usize>, dt: DType) -> Tensor {
    let mut m = vec![0f64; rows * cols];
    for r in 0..rows {
        let pos = r % q_len + cols - q_len;
        for j in 0..cols {
            let visible = j <= pos && window.is_none_or(|w| pos - j < w);
            if !visible {
                m[r * cols + j] = -1e9;
            }
        }
    }
    Tensor::from_vec(m, (rows, cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn rope_tables(t: usize, d: usize, dt: DType) -> (Tensor, Tensor) {
    let ang: Vec<f64> = (0..t)
        .flat_map(|p| {
            (0..d / 2).map(move |i| p as f64 * 10000f64.powf(-(2.0 * i as f64) / d as f64))
        })
        .collect();
    let cos: Vec<f64> = ang.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = ang.iter().map(|a| a.sin()).collect();
    (
        Tensor::from_vec(cos, (t, d / 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap(),
        Tensor::from_vec(sin, (t, d / 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap(),
    )
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let x = rand_t(1, &[3, 2, 5], DType::F64);
    let w = rand_t(2, &[5], DType::F64);
    fd_check(
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        &[x, w],
        &[0, 1],
    );
}

#[test]
fn rms_norm_matches_composite() {
    // 70 rows: more than one row block, so the blocked weight-gradient reduction is covered.
    let x = rand_t(3, &[70, 16], DType::F32);
    let w = rand_t(4, &[16], DType::F32);
    composite_check(
        &|t| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
        &|t| rms_composite(&t[0], &t[1], 1e-6),
        &[x, w],
        &[0, 1],
        1e-5,
    );
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let x = rand_t(5, &[4, 6], DType::F64);
    let w = rand_t(6, &[6], DType::F64);
    let b = rand_t(7, &[6], DType::F64);
    fd_check(
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &[x, w, b],
        &[0, 1, 2],
    );
}

#[test]
fn layer_norm_matches_composite() {
    let x = rand_t(8, &[2, 35, 16], DType::F32);
    let w = rand_t(9, &[16], DType::F32);
    let b = rand_t(10, &[16], DType::F32);
    composite_check(
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &|t| ln_composite(&t[0], &t[1], &t[2], 1e-5),
        &[x, w, b],
        &[0, 1, 2],
        1e-5,
    );
}

#[test]
fn softmax_backward_matches_finite_differences() {
    let x = rand_t(11, &[2, 3, 7], DType::F64);
    fd_check(&|t| ops::softmax_last_dim(&t[0]).unwrap(), &[x], &[0]);
}

#[test]
fn softmax_matches_composite() {
    let x = (rand_t(12, &[4, 9, 33], DType::F32) * 5.0).unwrap();
    composite_check(
        &|t| ops::softmax_last_dim(&t[0]).unwrap(),
        &|t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
        &[x],
        &[0],
        1e-6,
    );
}

#[test]
fn causal_softmax_backward_matches_finite_differences() {
    // 2 heads of 3 queries stacked along the rows, 5 keys, window 2.
    let x = rand_t(13, &[2, 6, 5], DType::F64);
    fd_check(
        &|t| ops::causal_softmax(&t[0], 0.7, 3, Some(2)).unwrap(),
        std::slice::from_ref(&x),
        &[0],
    );
    fd_check(
        &|t| ops::causal_softmax(&t[0], 0.7, 3, None).unwrap(),
        &[x],
        &[0],
    );
}

#[test]
fn causal_softmax_matches_composite() {
    for window in [None, Some(3)] {
        let x = rand_t(14, &[2, 2, 12, 6], DType::F32);
        composite_check(
            &|t| ops::causal_softmax(&t[0], 0.5, 6, window).unwrap(),
            &|t| {
                let m = causal_mask(12, 6, 6, window, DType::F32);
                let s = (&t[0] * 0.5).unwrap().broadcast_add(&m).unwrap();
                candle_nn::ops::softmax(&s, D::Minus1).unwrap()
            },
            &[x],
            &[0],
            1e-6,
        );
    }
}

#[test]
fn rope_backward_matches_finite_differences() {
    let (cos, sin) = rope_tables(4, 6, DType::F64);
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let x = rand_t(15, &[2, 2, 4, 6], DType::F64);
        fd_check(
            &|t| ops::rope(&t[0], &t[1], &t[2], layout).unwrap(),
            &[x, cos.clone(), sin.clone()],
            &[0],
        );
    }
}

#[test]
fn rope_layouts_match_candle_composites() {
    // candle's `rope` is the half-split layout (what candle-transformers' llama uses) and
    // `rope_i` the interleaved one; their `_slow` versions are composite and differentiable.
    let (cos, sin) = rope_tables(5, 8, DType::F32);
    let x = rand_t(16, &[2, 3, 5, 8], DType::F32);
    let ins = [x, cos, sin];
    composite_check(
        &|t| ops::rope(&t[0], &t[1], &t[2], RopeLayout::HalfSplit).unwrap(),
        &|t| candle_nn::rotary_emb::rope_slow(&t[0], &t[1], &t[2]).unwrap(),
        &ins,
        &[0],
        1e-6,
    );
    composite_check(
        &|t| ops::rope(&t[0], &t[1], &t[2], RopeLayout::Interleaved).unwrap(),
        &|t| candle_nn::rotary_emb::rope_i_slow(&t[0], &t[1], &t[2]).unwrap(),
        &ins,
        &[0],
        1e-6,
    );
}

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let x = rand_t(17, &[5, 7], DType::F64);
    let targets = [Some(3), None, Some(0), Some(6), None];
    fd_check(
        &|t| ops::cross_entropy(&t[0], &targets).unwrap(),
        &[x],
        &[0],
    );
}

#[test]
fn cross_entropy_matches_candle_composite() {
    let x = (rand_t(18, &[6, 11], DType::F32) * 3.0).unwrap();
    let targets = [Some(3u32), None, Some(0), Some(10), None, Some(5)];
    let keep: Vec<u32> = (0..6u32)
        .filter(|&i| targets[i as usize].is_some())
        .collect();
    let labels: Vec<u32> = targets.iter().flatten().copied().collect();
    composite_check(
        &|t| ops::cross_entropy(&t[0], &targets).unwrap(),
        &|t| {
            let idx = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
            let rows = t[0].index_select(&idx, 0).unwrap();
            let lab = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
            candle_nn::loss::cross_entropy(&rows, &lab).unwrap()
        },
        &[x],
        &[0],
        1e-6,
    );
}

#[test]
fn cross_entropy_all_ignored_is_zero_not_nan() {
    let x = Var::from_tensor(&rand_t(19, &[2, 4], DType::F32)).unwrap();
    let loss = ops::cross_entropy(x.as_tensor(), &[None, None]).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let g = loss.backward().unwrap();
    let g = g.get(x.as_tensor()).unwrap();
    assert_eq!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}

#[test]
fn cross_entropy_rejects_out_of_range_targets() {
    let x = rand_t(20, &[2, 4], DType::F32);
    let err = ops::cross_entropy(&x, &[Some(4), None]).unwrap_err();
    assert!(matches!(
        err,
        eg_model::Error::TargetOutOfRange {
            target: 4,
            vocab: 4
        }
    ));
}

#[test]
fn half_precision_inputs_are_converted() {
    let x = Var::from_tensor(&rand_t(21, &[3, 8], DType::BF16)).unwrap();
    let w = rand_t(22, &[8], DType::BF16);
    let y = ops::rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(g.get(x.as_tensor()).unwrap().dtype(), DType::BF16);
}

#[test]
fn next_token_targets_shift_and_mask() {
    let ids = Tensor::new(&[[5i64, 6, -100, 8], [1, 2, 3, 4]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 1, 1], [1, 0, 1, 1]], &Device::Cpu).unwrap();
    let t = ops::next_token_targets(&ids, Some(-100), Some(&mask)).unwrap();
    assert_eq!(
        t,
        vec![Some(6), None, Some(8), None, None, Some(3), Some(4), None]
    );
}

/// Regression for issue 4: candle's fused inference ops leave the autograd graph, so an
/// input that goes through them receives no gradient at all; ours give the gradient.
#[test]
fn issue_4_candle_fused_ops_drop_gradients_ours_do_not() {
    let x = Var::from_tensor(&rand_t(23, &[1, 2, 3, 8], DType::F32)).unwrap();
    let xt = x.as_tensor();
    let w = Var::from_tensor(&rand_t(24, &[8], DType::F32)).unwrap();
    let b = rand_t(25, &[8], DType::F32);
    let (cos, sin) = rope_tables(3, 8, DType::F32);
    let has_grad = |y: Tensor, t: &Tensor| {
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        g.get(t).is_some()
    };

    // candle: every one of these drops the gradient silently (no error).
    assert!(!has_grad(
        candle_nn::ops::rms_norm(xt, &w, 1e-5).unwrap(),
        xt
    ));
    assert!(!has_grad(
        candle_nn::ops::rms_norm(xt, &w, 1e-5).unwrap(),
        w.as_tensor()
    ));
    assert!(!has_grad(
        candle_nn::ops::layer_norm(xt, &w, &b, 1e-5).unwrap(),
        xt
    ));
    assert!(!has_grad(candle_nn::ops::softmax_last_dim(xt).unwrap(), xt));
    assert!(!has_grad(
        candle_nn::rotary_emb::rope(xt, &cos, &sin).unwrap(),
        xt
    ));
    assert!(!has_grad(
        candle_nn::rotary_emb::rope_i(xt, &cos, &sin).unwrap(),
        xt
    ));

    // ours: the gradient arrives.
    assert!(has_grad(ops::rms_norm(xt, &w, 1e-5).unwrap(), xt));
    assert!(has_grad(
        ops::rms_norm(xt, &w, 1e-5).unwrap(),
        w.as_tensor()
    ));
    assert!(has_grad(ops::layer_norm(xt, &w, &b, 1e-5).unwrap(), xt));
    assert!(has_grad(ops::softmax_last_dim(xt).unwrap(), xt));
    assert!(has_grad(
        ops::rope(xt, &cos, &sin, RopeLayout::HalfSplit).unwrap(),
        xt
    ));
    assert!(has_grad(
        ops::rope(xt, &cos, &sin, RopeLayout::Interleaved).unwrap(),
        xt
    ));

    // And candle's composite cross entropy does have a backward (checked, not assumed).
    let logits = Var::from_tensor(&rand_t(26, &[3, 5], DType::F32)).unwrap();
    let labels = Tensor::new(&[1u32, 0, 4], &Device::Cpu).unwrap();
    let ce = candle_nn::loss::cross_entropy(logits.as_tensor(), &labels).unwrap();
    assert!(ce.backward().unwrap().get(logits.as_tensor()).is_some());
    let _ = rand_vec(0, 1);
}

#[test]
fn empty_inputs_are_errors_not_panics() {
    let x = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    assert!(ops::rms_norm(&x, &w, 1e-5).is_err());
    assert!(ops::layer_norm(&x, &w, &w, 1e-5).is_err());
    assert!(ops::softmax_last_dim(&x).is_err());
    assert!(ops::causal_softmax(&x, 1.0, 3, None).is_err());
    assert!(ops::cross_entropy(&x, &[None, None, None]).is_err());
    let e = Tensor::zeros((1, 1, 0, 4), DType::F32, &Device::Cpu).unwrap();
    let cs = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(ops::rope(&e, &cs, &cs, RopeLayout::HalfSplit).is_err());
    // Wrong shapes are typed errors too.
    let x = rand_t(30, &[2, 4], DType::F32);
    assert!(matches!(
        ops::rms_norm(&x, &rand_t(31, &[3], DType::F32), 1e-5),
        Err(eg_model::Error::ShapeMismatch { .. })
    ));
    let q = rand_t(32, &[1, 1, 3, 4], DType::F32);
    assert!(matches!(
        ops::rope(
            &q,
            &rand_t(33, &[3, 3], DType::F32),
            &rand_t(34, &[3, 3], DType::F32),
            RopeLayout::Interleaved
        ),
        Err(eg_model::Error::ShapeMismatch { .. })
    ));
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let g = (rand_t(40, &[3, 5], DType::F64) * 3.0).unwrap();
    let u = rand_t(41, &[3, 5], DType::F64);
    fd_check(&|t| ops::swiglu(&t[0], &t[1]).unwrap(), &[g, u], &[0, 1]);
}

#[test]
fn swiglu_matches_composite() {
    // More than one 4096-element chunk.
    let g = (rand_t(42, &[9, 1000], DType::F32) * 4.0).unwrap();
    let u = rand_t(43, &[9, 1000], DType::F32);
    composite_check(
        &|t| ops::swiglu(&t[0], &t[1]).unwrap(),
        &|t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        &[g, u],
        &[0, 1],
        1e-5,
    );
}

#[test]
fn rope_with_per_sequence_tables_matches_finite_differences_and_shared_tables() {
    let (cos, sin) = rope_tables(4, 6, DType::F64);
    // Sequence 0 at positions 0..4, sequence 1 at 2..4 then 0..2 (a packed row).
    let idx = Tensor::new(&[0u32, 1, 2, 3, 2, 3, 0, 1], &Device::Cpu).unwrap();
    let bc = cos
        .index_select(&idx, 0)
        .unwrap()
        .reshape((2, 4, 3))
        .unwrap();
    let bs = sin
        .index_select(&idx, 0)
        .unwrap()
        .reshape((2, 4, 3))
        .unwrap();
    for layout in [RopeLayout::HalfSplit, RopeLayout::Interleaved] {
        let x = rand_t(50, &[2, 3, 4, 6], DType::F64);
        fd_check(
            &|t| ops::rope(&t[0], &t[1], &t[2], layout).unwrap(),
            &[x.clone(), bc.clone(), bs.clone()],
            &[0],
        );
        // Sequence 0's rows equal the shared-table result.
        let a = ops::rope(&x, &bc, &bs, layout)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        let b = ops::rope(&x, &cos, &sin, layout)
            .unwrap()
            .narrow(0, 0, 1)
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }
}

#[test]
fn issue_9_linear_backward_matches_finite_differences() {
    let x = rand_t(60, &[2, 3, 4], DType::F64);
    let w = rand_t(61, &[5, 4], DType::F64);
    fd_check(&|t| ops::linear(&t[0], &t[1]).unwrap(), &[x, w], &[0, 1]);
}

#[test]
fn issue_9_linear_matches_composite() {
    let x = rand_t(62, &[2, 7, 33], DType::F32);
    let w = rand_t(63, &[19, 33], DType::F32);
    composite_check(
        &|t| ops::linear(&t[0], &t[1]).unwrap(),
        &|t| {
            t[0].reshape((14, 33))
                .unwrap()
                .matmul(&t[1].t().unwrap())
                .unwrap()
                .reshape((2, 7, 19))
                .unwrap()
        },
        &[x, w],
        &[0, 1],
        1e-5,
    );
    let bad = rand_t(64, &[2, 7, 32], DType::F32);
    assert!(ops::linear(&bad, &rand_t(63, &[19, 33], DType::F32)).is_err());
}

#[test]
fn issue_9_split_and_merge_heads_match_finite_differences_and_composite() {
    let x = rand_t(65, &[2, 3, 8], DType::F64);
    fd_check(&|t| ops::split_heads(&t[0], 2).unwrap(), &[x], &[0]);
    let y = rand_t(66, &[2, 2, 3, 4], DType::F64);
    fd_check(&|t| ops::merge_heads(&t[0]).unwrap(), &[y], &[0]);
    let x = rand_t(67, &[2, 5, 12], DType::F32);
    composite_check(
        &|t| ops::split_heads(&t[0], 3).unwrap(),
        &|t| {
            t[0].reshape((2, 5, 3, 4))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        },
        std::slice::from_ref(&x),
        &[0],
        1e-7,
    );
    let heads = ops::split_heads(&x, 3).unwrap();
    assert_eq!(max_abs_diff(&ops::merge_heads(&heads).unwrap(), &x), 0.0);
    assert!(ops::split_heads(&x, 5).is_err());
}
