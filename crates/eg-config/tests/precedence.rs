//! Layer precedence: default < file < env < `--set`, later files over earlier, `extends`.

use eg_config::{Origin, Sources};

use crate::Dir;

#[test]
fn default_file_env_set_precedence() {
    let dir = Dir::new();
    let f = dir.write("run.toml", "[train.optimizer]\nlr = 0.001\n");
    let env = [("EG_TRAIN__OPTIMIZER__LR", "0.002")];
    let set = "train.optimizer.lr=0.003";

    let r = Sources::new().resolve().unwrap();
    assert_eq!(r.origin("train.optimizer.lr"), Origin::Default);

    let r = Sources::new().file(&f).resolve().unwrap();
    assert_eq!(r.validate().unwrap().train.optimizer.lr(), 0.001);
    assert_eq!(
        r.origin("train.optimizer.lr"),
        Origin::File {
            path: f.clone(),
            line: Some(2)
        }
    );

    let r = Sources::new().file(&f).env_vars(env).resolve().unwrap();
    assert_eq!(r.validate().unwrap().train.optimizer.lr(), 0.002);
    assert_eq!(
        r.origin("train.optimizer.lr"),
        Origin::Env {
            var: env[0].0.into()
        }
    );

    let r = Sources::new()
        .file(&f)
        .env_vars(env)
        .set(set)
        .resolve()
        .unwrap();
    assert_eq!(r.validate().unwrap().train.optimizer.lr(), 0.003);
    assert_eq!(
        r.origin("train.optimizer.lr"),
        Origin::Set { arg: set.into() }
    );
    // Untouched keys keep their own origin.
    assert_eq!(r.origin("train.max_steps"), Origin::Default);
}

#[test]
fn later_files_win_and_merge_tables() {
    let dir = Dir::new();
    let a = dir.write(
        "a.toml",
        "[train]\nmax_steps = 10\n[train.optimizer]\nlr = 0.5\n",
    );
    let b = dir.write("b.json", "{\"train\": {\"max_steps\": 20}}");
    let c = Sources::new().file(&a).file(&b).load().unwrap();
    assert_eq!(c.train.max_steps.0, 20);
    assert_eq!(
        c.train.optimizer.lr(),
        0.5,
        "a table is merged key by key, not replaced"
    );
}

#[test]
fn extends_base_is_overridden_by_child() {
    let dir = Dir::new();
    dir.write(
        "base.yaml",
        "train:\n  max_steps: 10\n  optimizer:\n    lr: 0.5\n",
    );
    let child = dir.write(
        "child.toml",
        "extends = \"base.yaml\"\n[train]\nmax_steps = 30\n",
    );
    let r = Sources::new().file(&child).resolve().unwrap();
    let c = r.validate().unwrap();
    assert_eq!(c.train.max_steps.0, 30);
    assert_eq!(c.train.optimizer.lr(), 0.5);
    assert_eq!(
        r.origin("train.optimizer.lr"),
        Origin::File {
            path: dir.path().join("base.yaml"),
            line: Some(4)
        }
    );
    assert_eq!(
        r.origin("train.max_steps"),
        Origin::File {
            path: child,
            line: Some(3)
        }
    );
}

#[test]
fn env_and_set_values_are_typed() {
    let c = Sources::new()
        .env_vars([
            ("EG_DATA__SHUFFLE", "false"),
            ("EG_LOG", "debug"),
            ("EG_RUN__NAME", "from env"),
        ])
        .set("model.lora={ rank = 4, targets = [\"all-linear\"] }")
        .set("memory.limit=8GiB")
        .load()
        .unwrap();
    assert!(!c.data.shuffle);
    assert_eq!(c.run.name, "from env");
    let lora = c.model.lora.expect("lora set");
    assert_eq!(lora.rank.get(), 4);
    assert_eq!(lora.targets, ["all-linear"]);
    assert_eq!(c.memory.limit, Some(eg_config::Bytes(8 << 30)));
}

#[test]
fn show_lists_every_value_with_its_origin() {
    let dir = Dir::new();
    let f = dir.write("run.toml", "[run]\nseed = 7\n");
    let r = Sources::new()
        .file(&f)
        .set("train.max_steps=5")
        .resolve()
        .unwrap();
    let entries = r.entries();
    let get = |k: &str| {
        entries
            .iter()
            .find(|e| e.key == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    assert_eq!(get("run.seed").value, serde_json::json!(7));
    assert_eq!(
        get("run.seed").origin,
        Origin::File {
            path: f,
            line: Some(2)
        }
    );
    assert_eq!(
        get("train.max_steps").origin,
        Origin::Set {
            arg: "train.max_steps=5".into()
        }
    );
    assert_eq!(get("train.optimizer.kind").origin, Origin::Default);
    assert!(entries.len() > 60, "{} entries", entries.len());
}

#[test]
fn defaults_are_valid_and_round_trip_through_toml() {
    let c = eg_config::Config::defaults().unwrap();
    let dir = Dir::new();
    let f = dir.write("resolved.toml", &c.to_toml().unwrap());
    let again = Sources::new().file(f).load().unwrap();
    assert_eq!(c, again);
}

#[test]
fn schema_describes_every_section() {
    let schema = eg_config::json_schema();
    let props = schema["properties"].as_object().expect("properties");
    for s in [
        "run", "hardware", "memory", "data", "model", "train", "dist", "monitor", "export",
    ] {
        assert!(props.contains_key(s), "schema lacks {s}");
    }
}
