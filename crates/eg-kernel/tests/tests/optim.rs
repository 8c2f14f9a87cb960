//! Optimizer update rules against f64 references, parameter groups, state round trip.

use candle_core::{Device, Tensor, Var};
use eg_kernel::optim::decays;
use eg_kernel::{Optimizer, OptimizerKind};

fn var(v: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

const W0: [f32; 4] = [0.5, -0.25, 1.0, 0.1];
const GRADS: [[f32; 4]; 3] = [
    [0.1, -0.2, 0.3, 0.0],
    [0.05, 0.4, -0.1, 0.2],
    [-0.3, 0.1, 0.2, -0.1],
];

fn run(kind: OptimizerKind, wd: f64, lr: f64) -> Vec<f32> {
    let w = var(&W0, &[2, 2]);
    let mut opt = Optimizer::new(kind, wd, &[("layer.weight".into(), vec![2, 2])]).unwrap();
    for g in GRADS {
        opt.step(std::slice::from_ref(&w), &[g.to_vec()], lr, 1.0)
            .unwrap();
    }
    values(&w)
}

fn close(a: &[f32], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((f64::from(*x) - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

#[test]
fn adamw_matches_pytorch_formula() {
    let (lr, wd, b1, b2, eps) = (0.01, 0.1, 0.9, 0.999, 1e-8);
    let mut w: Vec<f64> = W0.iter().map(|&x| f64::from(x)).collect();
    let (mut m, mut v) = (vec![0.0; 4], vec![0.0; 4]);
    for (t, g) in GRADS.iter().enumerate() {
        let t = t as i32 + 1;
        for k in 0..4 {
            let gk = f64::from(g[k]);
            w[k] *= 1.0 - lr * wd;
            m[k] = b1 * m[k] + (1.0 - b1) * gk;
            v[k] = b2 * v[k] + (1.0 - b2) * gk * gk;
            let mh = m[k] / (1.0 - b1.powi(t));
            let vh = v[k] / (1.0 - b2.powi(t));
            w[k] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    let got = run(
        OptimizerKind::AdamW {
            beta1: b1,
            beta2: b2,
            eps,
        },
        wd,
        lr,
    );
    close(&got, &w);
}

#[test]
fn sgd_momentum_matches_reference() {
    let (lr, wd, mu) = (0.1, 0.01, 0.9);
    let mut w: Vec<f64> = W0.iter().map(|&x| f64::from(x)).collect();
    let mut buf = [0.0; 4];
    for g in GRADS {
        for k in 0..4 {
            let gk = f64::from(g[k]) + wd * w[k];
            buf[k] = mu * buf[k] + gk;
            w[k] -= lr * buf[k];
        }
    }
    close(&run(OptimizerKind::Sgd { momentum: mu }, wd, lr), &w);
}

#[test]
fn lion_matches_reference() {
    let (lr, wd, b1, b2) = (0.01, 0.1, 0.9, 0.99);
    let mut w: Vec<f64> = W0.iter().map(|&x| f64::from(x)).collect();
    let mut m = [0.0; 4];
    for g in GRADS {
        for k in 0..4 {
            let gk = f64::from(g[k]);
            let c: f64 = b1 * m[k] + (1.0 - b1) * gk;
            w[k] = w[k] * (1.0 - lr * wd) - lr * if c == 0.0 { 0.0 } else { c.signum() };
            m[k] = b2 * m[k] + (1.0 - b2) * gk;
        }
    }
    close(
        &run(
            OptimizerKind::Lion {
                beta1: b1,
                beta2: b2,
            },
            wd,
            lr,
        ),
        &w,
    );
}

#[test]
fn no_weight_decay_on_norms_and_biases() {
    assert!(decays("model.layers.0.mlp.up_proj.weight", 2));
    assert!(!decays("model.layers.0.input_layernorm.weight", 1));
    assert!(!decays("model.norm.weight", 1));
    assert!(!decays("model.layers.0.self_attn.q_proj.bias", 1));
    // With zero gradients only weight decay moves parameters.
    let mat = var(&W0, &[2, 2]);
    let norm = var(&[1.0, 1.0], &[2]);
    let kind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    };
    let mut opt = Optimizer::new(
        kind,
        0.5,
        &[
            ("a.weight".into(), vec![2, 2]),
            ("a.norm.weight".into(), vec![2]),
        ],
    )
    .unwrap();
    assert!(opt.is_decayed(0) && !opt.is_decayed(1));
    opt.step(
        &[mat.clone(), norm.clone()],
        &[vec![0.0; 4], vec![0.0; 2]],
        0.1,
        1.0,
    )
    .unwrap();
    assert_eq!(values(&norm), vec![1.0, 1.0]);
    close(
        &values(&mat),
        &W0.iter().map(|&x| f64::from(x) * 0.95).collect::<Vec<_>>(),
    );
}

#[test]
fn state_round_trip_continues_identically() {
    for kind in [
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        },
        OptimizerKind::Sgd { momentum: 0.9 },
        OptimizerKind::Lion {
            beta1: 0.9,
            beta2: 0.99,
        },
    ] {
        let shapes = [("w".to_string(), vec![2, 2])];
        let a = var(&W0, &[2, 2]);
        let mut oa = Optimizer::new(kind, 0.01, &shapes).unwrap();
        oa.step(std::slice::from_ref(&a), &[GRADS[0].to_vec()], 0.01, 1.0)
            .unwrap();
        let saved = oa.export_state().unwrap();
        let b = var(&values(&a), &[2, 2]);
        let mut ob = Optimizer::new(kind, 0.01, &shapes).unwrap();
        ob.import_state(&saved).unwrap();
        assert_eq!(ob.steps(), 1);
        for g in &GRADS[1..] {
            oa.step(std::slice::from_ref(&a), &[g.to_vec()], 0.01, 1.0)
                .unwrap();
            ob.step(std::slice::from_ref(&b), &[g.to_vec()], 0.01, 1.0)
                .unwrap();
        }
        assert_eq!(values(&a), values(&b), "{kind:?}");
        // A mismatching kind is refused.
        let mut other = Optimizer::new(OptimizerKind::Sgd { momentum: 0.5 }, 0.0, &shapes).unwrap();
        if !matches!(kind, OptimizerKind::Sgd { .. }) {
            assert!(other.import_state(&saved).is_err());
        }
    }
}

#[test]
fn clipping_factor_scales_gradients() {
    let kind = OptimizerKind::Sgd { momentum: 0.0 };
    let a = var(&W0, &[2, 2]);
    let b = var(&W0, &[2, 2]);
    let shapes = [("w".to_string(), vec![2, 2])];
    let mut oa = Optimizer::new(kind, 0.0, &shapes).unwrap();
    let mut ob = Optimizer::new(kind, 0.0, &shapes).unwrap();
    let g = GRADS[0].to_vec();
    let half: Vec<f32> = g.iter().map(|x| x * 0.5).collect();
    oa.step(std::slice::from_ref(&a), &[g], 0.1, 0.5).unwrap();
    ob.step(std::slice::from_ref(&b), &[half], 0.1, 1.0)
        .unwrap();
    assert_eq!(values(&a), values(&b));
}

#[test]
fn snapshot_reusing_a_spare_equals_a_fresh_export() {
    use eg_kernel::optim::OptimizerSnapshot;
    // One buffer large enough for the parallel copy (≥ 2^18 elements), one small.
    let shapes = [
        ("big".to_string(), vec![600, 500]),
        ("small".to_string(), vec![2, 2]),
    ];
    let kind = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
    };
    let n = 600 * 500;
    let big = var(&vec![0.5; n], &[600, 500]);
    let small = var(&W0, &[2, 2]);
    let vars = [big, small];
    let mut opt = Optimizer::new(kind, 0.01, &shapes).unwrap();
    let grads = |k: usize| {
        vec![
            (0..n)
                .map(|i| ((i * 7 + k) % 13) as f32 - 6.0)
                .collect::<Vec<_>>(),
            GRADS[k % GRADS.len()].to_vec(),
        ]
    };
    opt.step(&vars, &grads(0), 0.01, 1.0).unwrap();
    let OptimizerSnapshot::Ram(first) = opt.snapshot().unwrap() else {
        panic!("a RAM store exports its snapshot");
    };
    let first = std::sync::Arc::try_unwrap(first).unwrap();
    opt.step(&vars, &grads(1), 0.01, 1.0).unwrap();
    let want = opt.export_state().unwrap();
    assert_ne!(
        first, want,
        "the state must have moved for the test to mean anything"
    );
    // A spare with the right buffers, one with a wrong length and a foreign name, none.
    let mut odd = first.clone();
    if let Some((_, v)) = odd.buffers.get_mut("small.exp_avg") {
        v.push(1.0);
    }
    odd.buffers
        .insert("other.exp_avg".into(), (vec![1], vec![3.0]));
    for spare in [Some(first), Some(odd), None] {
        let OptimizerSnapshot::Ram(got) = opt.snapshot_reusing(spare).unwrap() else {
            panic!("a RAM store exports its snapshot");
        };
        assert_eq!(*got, want);
    }
}
