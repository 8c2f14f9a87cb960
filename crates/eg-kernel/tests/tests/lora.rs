//! The trainer trains LoRA/QLoRA adapters (issue 7): `Llama::params()` of an adapted model
//! holds only the adapters, so the loop, its optimizer and its checkpoints see nothing else.

use eg_model::{LoraConfig, QuantKind};

use super::common::*;

#[test]
fn trainer_trains_only_lora_adapters() {
    let base = model();
    let base_before = weights(&base);
    let lcfg = LoraConfig::rank(4).alpha(8.0).targets(["all-linear"]);
    for quant in [None, Some(QuantKind::Nf4 { double_quant: true })] {
        let m = match quant {
            None => base.clone().with_lora(&lcfg, 1).unwrap(),
            Some(q) => base.clone().with_qlora(&lcfg, q, 1).unwrap(),
        };
        assert!(
            weights(&m)
                .iter()
                .all(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B."))
        );
        let mut o = options(12, 2);
        o.eval_every = 12;
        o.schedule.peak = 3e-2; // adapters start at zero: a LoRA-sized learning rate
        let mut t = trainer(m, 4, o);
        let first = t.evaluate().unwrap();
        let before = weights(t.model());
        let r = t.fit().unwrap();
        assert_eq!(r.steps, 12);
        let e = r.eval.unwrap();
        assert!(
            e.loss < first.loss - 0.05,
            "{quant:?}: {} -> {}",
            first.loss,
            e.loss
        );
        for ((n, a), (_, b)) in weights(t.model()).iter().zip(&before) {
            assert_ne!(a, b, "{n} did not move");
        }
    }
    // The base's own storage (shared with the frozen copies) is bitwise unchanged.
    assert_eq!(weights(&base), base_before);
}

/// Evaluation turns adapter dropout off: two evaluations give the same loss, and training
/// (dropout on) still works afterwards.
#[test]
fn evaluation_runs_without_lora_dropout() {
    let lcfg = LoraConfig::rank(4)
        .alpha(8.0)
        .dropout(0.5)
        .targets(["all-linear"]);
    let m = model().with_lora(&lcfg, 1).unwrap();
    let mut o = options(2, 2);
    o.schedule.peak = 3e-2;
    let mut t = trainer(m, 4, o);
    // Move the adapters off zero so dropout would change the output.
    t.fit().unwrap();
    let a = t.evaluate().unwrap();
    let b = t.evaluate().unwrap();
    assert_eq!(
        a.loss.to_bits(),
        b.loss.to_bits(),
        "{} vs {}",
        a.loss,
        b.loss
    );
}
