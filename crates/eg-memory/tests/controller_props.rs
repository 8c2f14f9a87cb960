//! Property tests of the controller: whatever the pressure does, the global batch never
//! changes, the strategy never grows beyond the plan, decisions describe the state
//! faithfully, and a serialized controller resumes identically.

use eg_memory::Strategy as Planned;
use eg_memory::{Action, Controller, ControllerConfig, Level, OffloadKind, planner::divisors};
use proptest::prelude::*;

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::Normal),
        Just(Level::Elevated),
        Just(Level::Critical)
    ]
}

/// A global batch, a planned micro-batch dividing it, and a plan's checkpointing flag.
fn setup() -> impl Strategy<Value = (u32, u32, bool)> {
    (1u32..=96).prop_flat_map(|g| {
        let ds = divisors(g);
        (Just(g), proptest::sample::select(ds), any::<bool>())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn global_batch_never_changes(
        (g, m, ckpt) in setup(),
        steps in proptest::collection::vec((0u64..20_000, level()), 1..300),
    ) {
        let planned = Planned {
            micro_batch: m,
            accumulation: g / m,
            checkpointing: ckpt,
            offload: OffloadKind::None,
        };
        let mut c = Controller::new(ControllerConfig::new(g), planned).unwrap();
        let mut t = 0u64;
        let mut last_seq = 0;
        for (dt, lvl) in steps {
            t += dt;
            let before = c.current();
            let d = c.observe(t, lvl);
            let now = c.current();
            prop_assert_eq!(u64::from(now.micro_batch) * u64::from(now.accumulation), u64::from(g));
            prop_assert!(now.micro_batch <= planned.micro_batch);
            prop_assert!(g % now.micro_batch == 0);
            prop_assert!(now.checkpointing || !planned.checkpointing);
            match d {
                Some(d) => {
                    prop_assert_eq!(d.before, before);
                    prop_assert_eq!(d.after, now);
                    prop_assert_eq!(d.seq, last_seq + 1);
                    last_seq = d.seq;
                    if d.action == Action::Exhausted {
                        prop_assert_eq!(before, now);
                    } else {
                        prop_assert_ne!(before, now);
                    }
                }
                None => prop_assert_eq!(before, now),
            }
        }
    }

    #[test]
    fn serialized_controller_resumes_identically(
        (g, m, _ckpt) in setup(),
        head in proptest::collection::vec((0u64..20_000, level()), 0..100),
        tail in proptest::collection::vec((0u64..20_000, level()), 0..100),
    ) {
        let planned = Planned {
            micro_batch: m,
            accumulation: g / m,
            checkpointing: false,
            offload: OffloadKind::None,
        };
        let mut a = Controller::new(ControllerConfig::new(g), planned).unwrap();
        let mut t = 0u64;
        for (dt, lvl) in head {
            t += dt;
            a.observe(t, lvl);
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Controller = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&a, &b);
        for (dt, lvl) in tail {
            t += dt;
            prop_assert_eq!(a.observe(t, lvl), b.observe(t, lvl));
        }
    }
}
