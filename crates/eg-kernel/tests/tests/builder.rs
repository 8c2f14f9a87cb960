//! The builder: checks in `build()`, trains, resumes.

use eg_config::{SeqLen, Steps, Tokens};
use eg_kernel::{Checkpoints, Error, OptimizerSpec, ScheduleSpec, Trainer};

use super::common::*;

#[test]
fn build_reports_bad_settings() {
    let bad = |b: eg_kernel::TrainerBuilder<eg_model::Llama>, option: &str| match b.build() {
        Err(Error::InvalidOption { option: o, .. }) => assert_eq!(o, option),
        other => panic!("{option}: {other:?}"),
    };
    let b = || Trainer::builder(model(), dataset(0)).seq_len(SeqLen(16));
    bad(
        b().optimizer(OptimizerSpec::adamw(f64::NAN)),
        "optimizer.lr",
    );
    bad(b().global_batch(Tokens(8)), "global_batch");
    bad(b().global_batch(Tokens(64)).micro_batch(5), "micro_batch");
    bad(
        b().max_steps(Steps(10))
            .schedule(ScheduleSpec::cosine().warmup(Steps(20))),
        "schedule.warmup",
    );
}

#[test]
fn builder_trains_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let build = |steps: u64| {
        Trainer::builder(model(), dataset(0))
            .optimizer(OptimizerSpec::lion(3e-4))
            .schedule(ScheduleSpec::wsd(0.2).warmup(Steps(1)))
            .seq_len(SeqLen(16))
            .global_batch(Tokens(64))
            .micro_batch(2)
            .max_steps(Steps(steps))
            .eos(0)
            .eval(dataset(1))
            .checkpoints(
                Checkpoints::dir(dir.path().join("ck"))
                    .every(Steps(2))
                    .keep(2),
            )
            .run_dir(dir.path())
            .build()
            .unwrap()
    };
    let r = build(4).fit().unwrap();
    assert_eq!(r.steps, 4);
    assert!(r.eval.is_some());
    let mut t = build(6);
    assert_eq!(t.state().step, 4);
    assert_eq!(t.fit().unwrap().steps, 6);
}
