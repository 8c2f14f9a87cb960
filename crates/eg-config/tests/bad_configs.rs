//! Distinct bad configurations: each asserts the key path, the source and the wording.

use eg_config::{Error, Origin, Sources};

use crate::{Dir, assert_error, at_file, file_error, single};

#[test]
fn unknown_key_in_file_suggests_the_right_one() {
    let (e, p) = file_error("run.toml", "[train]\nmax_step = 10\n");
    assert_error(
        &e,
        "train.max_step",
        &at_file(&p, 2),
        &["unknown key", "did you mean `max_steps`?", "allowed here:"],
    );
}

#[test]
fn unknown_section() {
    let (e, p) = file_error("run.toml", "[trian]\nmax_steps = 10\n");
    assert_error(
        &e,
        "trian",
        &at_file(&p, 1),
        &["unknown key", "did you mean `train`?"],
    );
}

#[test]
fn unknown_key_from_env_names_the_variable() {
    let e = single(
        Sources::new()
            .env_vars([("EG_TRAIN__OPTIMIZER__LRR", "0.1")])
            .load()
            .unwrap_err(),
    );
    assert_error(
        &e,
        "train.optimizer.lrr",
        &Origin::Env {
            var: "EG_TRAIN__OPTIMIZER__LRR".into(),
        },
        &[
            "environment variable EG_TRAIN__OPTIMIZER__LRR",
            "did you mean `lr`?",
        ],
    );
}

#[test]
fn unknown_key_from_set_names_the_argument() {
    let e = single(Sources::new().set("model.lora.rnak=8").load().unwrap_err());
    assert_error(
        &e,
        "model.lora.rnak",
        &Origin::Set {
            arg: "model.lora.rnak=8".into(),
        },
        &["--set model.lora.rnak=8", "did you mean `rank`?"],
    );
}

#[test]
fn wrong_type_string_for_integer() {
    let (e, p) = file_error("run.toml", "[train]\nmax_steps = \"ten\"\n");
    assert_error(
        &e,
        "train.max_steps",
        &at_file(&p, 2),
        &["wrong type", "\"ten\"", "u64"],
    );
}

#[test]
fn wrong_type_string_for_list_in_yaml() {
    let (e, p) = file_error("run.yaml", "data:\n  source: text\n  paths: corpus.txt\n");
    assert_error(
        &e,
        "data.paths",
        &at_file(&p, 3),
        &["wrong type", "corpus.txt", "a sequence"],
    );
}

#[test]
fn unknown_enum_value_suggests() {
    let (e, p) = file_error("run.toml", "[train.optimizer]\nkind = \"adam\"\n");
    assert_error(
        &e,
        "train.optimizer.kind",
        &at_file(&p, 2),
        &[
            "invalid value",
            "\"adam\"",
            "adamw, sgd, lion",
            "did you mean `adamw`?",
        ],
    );
}

#[test]
fn negative_step_count() {
    let (e, p) = file_error("run.json", "{\"train\": {\"max_steps\": -5}}");
    assert_error(&e, "train.max_steps", &at_file(&p, 1), &["-5", "u64"]);
}

#[test]
fn nan_learning_rate() {
    let (e, p) = file_error("run.toml", "[train.optimizer]\nlr = nan\n");
    assert_error(
        &e,
        "train.optimizer.lr",
        &at_file(&p, 2),
        &["out of range", "NaN", "a finite number in (0, 10]"],
    );
}

#[test]
fn infinite_learning_rate_in_yaml() {
    let (e, p) = file_error("run.yml", "train:\n  optimizer:\n    lr: .inf\n");
    assert_error(
        &e,
        "train.optimizer.lr",
        &at_file(&p, 3),
        &["out of range", "inf"],
    );
}

#[test]
fn zero_learning_rate() {
    let e = single(
        Sources::new()
            .set("train.optimizer.lr=0")
            .load()
            .unwrap_err(),
    );
    assert_error(
        &e,
        "train.optimizer.lr",
        &Origin::Set {
            arg: "train.optimizer.lr=0".into(),
        },
        &["out of range", "(0, 10]"],
    );
}

#[test]
fn budget_fraction_above_one() {
    let (e, p) = file_error("run.toml", "[memory]\nbudget_fraction = 1.5\n");
    assert_error(
        &e,
        "memory.budget_fraction",
        &at_file(&p, 2),
        &["out of range", "1.5", "(0, 1]"],
    );
}

#[test]
fn byte_size_with_unknown_unit() {
    let (e, p) = file_error("run.toml", "[memory]\nreserve = \"12 parsecs\"\n");
    assert_error(
        &e,
        "memory.reserve",
        &at_file(&p, 2),
        &["invalid value", "12 parsecs", "KiB, MiB, GiB"],
    );
}

#[test]
fn reserve_not_below_limit() {
    let (e, p) = file_error(
        "run.toml",
        "[memory]\nlimit = \"1GiB\"\nreserve = \"2GiB\"\n",
    );
    assert_error(
        &e,
        "memory.reserve",
        &at_file(&p, 3),
        &[
            "contradicts `memory.limit`",
            "smaller than the memory limit",
        ],
    );
}

#[test]
fn disk_offload_without_directory() {
    let (e, p) = file_error("run.toml", "[memory]\noffload = \"disk\"\n");
    assert_error(
        &e,
        "memory.offload_dir",
        &at_file(&p, 2),
        &["missing value", "needs a directory"],
    );
}

#[test]
fn offload_directory_without_disk_offload() {
    let (e, p) = file_error("run.toml", "[memory]\noffload_dir = \"/nvme\"\n");
    assert_error(
        &e,
        "memory.offload_dir",
        &at_file(&p, 2),
        &[
            "contradicts `memory.offload` (from built-in default)",
            "only used with",
        ],
    );
}

#[test]
fn warmup_longer_than_training() {
    let (e, p) = file_error(
        "run.toml",
        "[train]\nmax_steps = 10\n[train.schedule]\nwarmup_steps = 10\n",
    );
    assert_error(
        &e,
        "train.schedule.warmup_steps",
        &at_file(&p, 4),
        &[
            "contradicts `train.max_steps`",
            "warmup must end before the last step",
        ],
    );
}

#[test]
fn global_batch_smaller_than_a_sequence() {
    let (e, p) = file_error(
        "run.toml",
        "[data]\nseq_len = 512\n[train.batch]\nglobal_tokens = 100\n",
    );
    assert_error(
        &e,
        "train.batch.global_tokens",
        &at_file(&p, 4),
        &["contradicts `data.seq_len`", "at least one whole sequence"],
    );
}

#[test]
fn global_batch_not_whole_sequences() {
    let (e, p) = file_error(
        "run.toml",
        "[data]\nseq_len = 100\n[train.batch]\nglobal_tokens = 250\n",
    );
    assert_error(
        &e,
        "train.batch.global_tokens",
        &at_file(&p, 4),
        &["multiple of data.seq_len"],
    );
}

#[test]
fn micro_batch_larger_than_global_batch() {
    let (e, p) = file_error(
        "run.toml",
        "[data]\nseq_len = 100\n[train.batch]\nglobal_tokens = 200\nmicro_batch = 4\n",
    );
    assert_error(
        &e,
        "train.batch.micro_batch",
        &at_file(&p, 5),
        &["cannot hold more sequences"],
    );
}

#[test]
fn f16_without_loss_scaling() {
    let (e, p) = file_error(
        "run.toml",
        "[train.precision]\ncompute = \"f16\"\nloss_scale = \"none\"\n",
    );
    assert_error(
        &e,
        "train.precision.loss_scale",
        &at_file(&p, 3),
        &["contradicts `train.precision.compute`", "underflow"],
    );
}

#[test]
fn quantized_base_without_lora() {
    let (e, p) = file_error("run.toml", "[model]\nquantization = \"nf4\"\n");
    assert_error(
        &e,
        "model.quantization",
        &at_file(&p, 2),
        &["`model.lora` (not set)", "nothing to train without LoRA"],
    );
}

#[test]
fn ddp_without_a_backend() {
    let (e, p) = file_error(
        "run.toml",
        "[dist]\nbackend = \"single\"\nparallelism = \"ddp\"\n",
    );
    assert_error(
        &e,
        "dist.parallelism",
        &at_file(&p, 3),
        &["contradicts `dist.backend`", "communication backend"],
    );
}

#[test]
fn nccl_on_cpu() {
    let (e, p) = file_error(
        "run.toml",
        "[hardware]\ndevice = \"cpu\"\n[dist]\nbackend = \"nccl\"\n",
    );
    assert_error(
        &e,
        "dist.backend",
        &at_file(&p, 4),
        &["contradicts `hardware.device`", "CUDA"],
    );
}

#[test]
fn quantized_export_needs_gguf() {
    let (e, p) = file_error("run.toml", "[export]\nquantization = \"q4_0\"\n");
    assert_error(
        &e,
        "export.quantization",
        &at_file(&p, 2),
        &["contradicts `export.format`", "GGUF"],
    );
}

#[test]
fn sft_needs_jsonl() {
    let (e, p) = file_error("run.toml", "[train]\nmode = \"sft\"\n");
    assert_error(
        &e,
        "train.mode",
        &at_file(&p, 2),
        &["contradicts `data.source`", "jsonl"],
    );
}

#[test]
fn file_source_without_paths() {
    let (e, p) = file_error("run.toml", "[data]\nsource = \"text\"\n");
    assert_error(
        &e,
        "data.paths",
        &at_file(&p, 2),
        &["missing value", "list them in data.paths"],
    );
}

#[test]
fn embedded_source_with_paths() {
    let (e, p) = file_error("run.toml", "[data]\npaths = [\"a.txt\"]\n");
    assert_error(
        &e,
        "data.paths",
        &at_file(&p, 2),
        &["contradicts `data.source`", "reads no files"],
    );
}

#[test]
fn three_betas() {
    let (e, p) = file_error(
        "run.toml",
        "[train.optimizer]\nbetas = [0.9, 0.99, 0.999]\n",
    );
    assert_error(
        &e,
        "train.optimizer.betas",
        &at_file(&p, 2),
        &["two numbers"],
    );
}

#[test]
fn beta_of_one() {
    let (e, p) = file_error("run.toml", "[train.optimizer]\nbetas = [0.9, 1.0]\n");
    assert_error(
        &e,
        "train.optimizer.betas.1",
        &Origin::File {
            path: p,
            line: Some(2),
        },
        &["[0, 1)"],
    );
}

#[test]
fn unknown_device() {
    let (e, p) = file_error("run.toml", "[hardware]\ndevice = \"tpu\"\n");
    assert_error(
        &e,
        "hardware.device",
        &at_file(&p, 2),
        &["\"tpu\"", "auto, cpu, cuda or cuda:N"],
    );
}

#[test]
fn bad_prometheus_address() {
    let (e, p) = file_error("run.toml", "[monitor]\nprometheus = \"localhost\"\n");
    assert_error(
        &e,
        "monitor.prometheus",
        &at_file(&p, 2),
        &["127.0.0.1:9184"],
    );
}

#[test]
fn bad_log_filter() {
    let e = single(
        Sources::new()
            .env_vars([("EG_MONITOR__LOG", "info,eg_kernel=loud")])
            .load()
            .unwrap_err(),
    );
    assert_error(
        &e,
        "monitor.log",
        &Origin::Env {
            var: "EG_MONITOR__LOG".into(),
        },
        &["RUST_LOG-style filter"],
    );
}

#[test]
fn zero_lora_rank() {
    let (e, p) = file_error("run.toml", "[model.lora]\nrank = 0\n");
    assert_error(&e, "model.lora.rank", &at_file(&p, 2), &["from 1 to 65536"]);
}

#[test]
fn zero_sequence_length() {
    let (e, p) = file_error(
        "run.toml",
        "[data]\nseq_len = 0\n[train.batch]\nglobal_tokens = 1\n",
    );
    // seq_len 0 is reported; the batch check then uses the smallest legal length.
    assert_error(&e, "data.seq_len", &at_file(&p, 2), &["from 1 to 1048576"]);
}

#[test]
fn keep_no_checkpoints() {
    let (e, p) = file_error("run.toml", "[train.checkpoints]\nkeep_last = 0\n");
    assert_error(
        &e,
        "train.checkpoints.keep_last",
        &at_file(&p, 2),
        &["from 1 to"],
    );
}

#[test]
fn empty_builtin_model_name() {
    let (e, p) = file_error("run.toml", "[model]\nsource = \"builtin:\"\n");
    assert_error(&e, "model.source", &at_file(&p, 2), &["builtin:NAME"]);
}

#[test]
fn best_fit_packing_for_pretraining() {
    let (e, p) = file_error("run.toml", "[data]\npacking = \"best-fit\"\n");
    assert_error(
        &e,
        "data.packing",
        &at_file(&p, 2),
        &["contradicts `train.mode`", "concat"],
    );
}

#[test]
fn zero_threads() {
    let (e, p) = file_error("run.yaml", "hardware:\n  threads: 0\n");
    assert_error(&e, "hardware.threads", &at_file(&p, 2), &["from 1 to 4096"]);
}

#[test]
fn huge_integer_in_json() {
    let (e, p) = file_error(
        "run.json",
        "{\"train\": {\"max_steps\": 123456789012345678901234567890}}",
    );
    assert_error(
        &e,
        "train.max_steps",
        &at_file(&p, 1),
        &["wrong type", "float", "u64"],
    );
}

#[test]
fn several_errors_are_reported_together() {
    let dir = Dir::new();
    let p = dir.write(
        "run.toml",
        "[train]\nmax_steps = 0\n[train.optimizer]\nlr = -1.0\n[memory]\nbudget_fraction = 0\n",
    );
    let err = Sources::new().file(&p).load().unwrap_err();
    let keys: Vec<_> = err
        .iter()
        .filter_map(|e| e.key().map(str::to_string))
        .collect();
    assert_eq!(
        keys,
        [
            "memory.budget_fraction",
            "train.max_steps",
            "train.optimizer.lr"
        ]
    );
    assert!(
        err.to_string().starts_with("3 configuration errors:"),
        "{err}"
    );
}

#[test]
fn override_without_equals() {
    let err = Sources::new().set("train.max_steps").load().unwrap_err();
    assert!(
        matches!(&err, Error::BadOverride { arg, .. } if arg == "train.max_steps"),
        "{err:?}"
    );
    assert!(err.to_string().contains("no `=`"), "{err}");
}

#[test]
fn env_with_empty_component() {
    let err = Sources::new()
        .env_vars([("EG_TRAIN____LR", "1")])
        .load()
        .unwrap_err();
    assert!(
        matches!(&err, Error::BadEnv { var, .. } if var == "EG_TRAIN____LR"),
        "{err:?}"
    );
}

#[test]
fn every_unknown_key_is_reported_at_once() {
    let dir = Dir::new();
    let p = dir.write(
        "run.toml",
        "[train]\nmax_step = 1\n[train.optimizer]\nlrr = 1\n[modle]\nx = 1\n",
    );
    let err = Sources::new()
        .file(&p)
        .set("data.seqlen=4")
        .load()
        .unwrap_err();
    let keys: Vec<_> = err
        .iter()
        .filter_map(|e| e.key().map(str::to_string))
        .collect();
    assert_eq!(
        keys,
        [
            "data.seqlen",
            "modle",
            "train.max_step",
            "train.optimizer.lrr"
        ]
    );
    assert!(err.iter().all(|e| matches!(e, Error::UnknownKey { .. })));
    assert!(err.to_string().contains("did you mean `seq_len`?"), "{err}");
}

#[test]
fn one_type_error_per_section_is_reported() {
    let dir = Dir::new();
    let p = dir.write(
        "run.toml",
        "[run]\nseed = \"x\"\n[train]\nmax_steps = \"y\"\n[data]\nshuffle = 3\n",
    );
    let err = Sources::new().file(&p).load().unwrap_err();
    let keys: Vec<_> = err
        .iter()
        .filter_map(|e| e.key().map(str::to_string))
        .collect();
    assert_eq!(keys, ["run.seed", "data.shuffle", "train.max_steps"]);
}

#[test]
fn unknown_key_inside_an_array_of_tables() {
    let (e, p) = file_error(
        "run.toml",
        "[data]\nsource = \"text\"\npaths = [\"a.txt\"]\n\n[[data.mix]]\npaths = [\"b.txt\"]\nwieght = 2.0\n",
    );
    let located = e.located().unwrap();
    assert_eq!(located.key, "data.mix.0.wieght", "{e}");
    let msg = e.to_string();
    assert!(msg.contains("did you mean `weight`?"), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
}

#[test]
fn augmentation_probability_out_of_range_names_the_entry() {
    let (e, _) = file_error(
        "run.toml",
        "[data]\nsource = \"text\"\npaths = [\"a.txt\"]\n\n[[data.mix]]\npaths = [\"b.txt\"]\n\n[[data.mix.augment]]\nkind = \"span-corruption\"\nprobability = 1.5\n",
    );
    let located = e.located().unwrap();
    assert_eq!(located.key, "data.mix.0.augment.0.probability", "{e}");
    assert!(e.to_string().contains("[0, 1]"), "{e}");
}

#[test]
fn mixed_source_must_read_files() {
    let (e, _) = file_error(
        "run.toml",
        "[data]\nsource = \"text\"\npaths = [\"a.txt\"]\n\n[[data.mix]]\nsource = \"embedded\"\npaths = [\"b.txt\"]\n",
    );
    let located = e.located().unwrap();
    assert_eq!(located.key, "data.mix.0.source", "{e}");
    assert!(e.to_string().contains("main source"), "{e}");
}

#[test]
fn per_source_augmentations_validate() {
    let dir = crate::Dir::new();
    let p = dir.write(
        "run.toml",
        "[data]\nsource = \"text\"\npaths = [\"a.txt\"]\nweight = 3.0\n\n[[data.augment]]\nkind = \"token-dropout\"\nprobability = 0.05\ntoken = 7\n\n[[data.mix]]\nsource = \"jsonl\"\npaths = [\"b.jsonl\"]\nweight = 1.0\n\n[[data.mix.augment]]\nkind = \"random-truncation\"\nprobability = 0.5\n",
    );
    let c = Sources::new().file(&p).load().unwrap();
    assert_eq!(c.data.weight, 3.0);
    assert_eq!(c.data.augment.len(), 1);
    assert_eq!(c.data.augment[0].token, Some(7));
    assert_eq!(c.data.mix.len(), 1);
    assert_eq!(c.data.mix[0].weight, 1.0);
    assert_eq!(c.data.mix[0].augment[0].probability.get(), 0.5);
    assert_eq!(c.data.mix[0].augment[0].token, None);
}

#[test]
fn mixing_into_the_embedded_corpus_is_a_conflict() {
    let (e, _) = file_error(
        "run.toml",
        "[[data.mix]]\nsource = \"text\"\npaths = [\"b.txt\"]\n",
    );
    assert!(
        e.to_string()
            .contains("embedded corpus uses its own byte tokens"),
        "{e}"
    );
}

#[test]
fn dpo_beta_must_be_positive() {
    let (e, p) = file_error("run.toml", "[train.dpo]\nbeta = 0.0\n");
    assert_error(&e, "train.dpo.beta", &at_file(&p, 2), &["(0, 1000]"]);
}
