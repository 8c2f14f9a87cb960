//! `eg plan`: what fits in memory, before anything runs.
//!
//! Loads the configuration, detects the hardware (cgroup aware), turns the configured model
//! into an [`ModelProfile`] with eg-model's layer analysis, and asks the planner
//! for every strategy (micro-batch dividing the global batch, checkpointing, offload). Prints
//! the ones that fit with their predicted peak and relative throughput, and the choice. When
//! nothing fits, the memory error says by how much and what would help (exit code 7).

use std::path::PathBuf;

use anyhow::Context as _;
use elastic_guardian::config::{self, Config, ModelSource};
use elastic_guardian::hardware as hw;
use elastic_guardian::memory::{self as mem, BlockProfile, ModelProfile};
use elastic_guardian::model::{self, LlamaConfig};

/// Arguments of `eg plan`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PlanArgs {
    /// Configuration files, later ones win.
    #[arg(long = "config", short = 'c', value_name = "FILE")]
    pub(crate) config: Vec<PathBuf>,
    /// Override one key: `key.path=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Print the plan as JSON (every candidate, with the memory breakdown).
    #[arg(long)]
    pub(crate) json: bool,
    /// Also list the strategies that do not fit.
    #[arg(long)]
    pub(crate) all: bool,
    /// Vocabulary size for a `builtin:` model when the data source does not fix it
    /// (the embedded corpus uses bytes: 257).
    #[arg(long, value_name = "N")]
    pub(crate) vocab: Option<usize>,
    /// Where `eg hw --probe` cached measured GEMM throughput (used for throughput estimates
    /// when present).
    #[arg(long, value_name = "DIR", default_value = ".eg-cache/hardware")]
    pub(crate) cache_dir: PathBuf,
    /// Read system files below this directory instead of `/` (fixture trees, for testing).
    #[arg(long, value_name = "DIR", default_value = "/", hide = true)]
    pub(crate) root: PathBuf,
}

/// LoRA targets assumed for suggestions when the configuration has no `[model.lora]`.
const DEFAULT_LORA_TARGETS: &[&str] = &["q_proj", "v_proj"];

/// The weight matrices of one Llama block: (name, in, out).
fn block_matrices(cfg: &LlamaConfig) -> [(&'static str, u64, u64); 7] {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_dim()) as u64;
    let kv = (cfg.num_kv_heads() * cfg.head_dim()) as u64;
    [
        ("q_proj", h, q),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", q, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]
}

/// The block index of a module name `model.layers.{i}.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Converts eg-model's layer analysis of `cfg` into the memory planner's profile. The
/// analysis is run at `seq_len` and `2·seq_len`; the difference separates what grows with
/// the context (attention scores and their FLOPs) from what does not. Activation bytes are
/// analysed at f32 and divided by 4 to get elements. With `chunked` attention (online
/// softmax, `model.attention`), no score-sized tensor is kept: the per-position terms are 0.
pub(crate) fn profile_of(
    cfg: &LlamaConfig,
    seq_len: usize,
    lora_targets: &[String],
    chunked: bool,
) -> anyhow::Result<ModelProfile> {
    let seq_len = seq_len.max(1);
    let f32_dtype = "f32".parse().context("naming the f32 dtype")?;
    let a1 = model::analyze_llama(cfg, f32_dtype, seq_len);
    let a2 = model::analyze_llama(cfg, f32_dtype, 2 * seq_len);
    let layers = cfg.num_hidden_layers;
    let mut at1 = vec![0u64; layers];
    let mut at2 = vec![0u64; layers];
    for (m1, m2) in a1.modules.iter().zip(&a2.modules) {
        if let Some(i) = layer_of(&m1.name).filter(|i| *i < layers) {
            at1[i] += m1.activation_bytes_per_token / 4;
            at2[i] += m2.activation_bytes_per_token / 4;
        }
    }
    let s = seq_len as u64;
    let blocks: Vec<BlockProfile> = at1
        .iter()
        .zip(&at2)
        .map(|(&x1, &x2)| {
            let per_pos = x2.saturating_sub(x1) / s;
            BlockProfile {
                activation_elems_per_token: x1.saturating_sub(per_pos * s),
                activation_elems_per_token_per_position: if chunked { 0 } else { per_pos },
            }
        })
        .collect();
    let in_blocks: u64 = at1.iter().sum();
    let head = (a1.activation_bytes_per_token / 4).saturating_sub(in_blocks);
    let flops_per_pos = a2
        .forward_flops_per_token
        .saturating_sub(a1.forward_flops_per_token)
        / s;
    let mats = block_matrices(cfg);
    let l = layers as u64;
    let quantizable: u64 = l * mats.iter().map(|(_, i, o)| i * o).sum::<u64>();
    let largest = mats.iter().map(|(_, i, o)| i * o).max().unwrap_or(0);
    let targeted: Vec<_> = mats
        .iter()
        .filter(|(n, _, _)| lora_targets.iter().any(|t| t == n))
        .collect();
    if targeted.is_empty() && !lora_targets.is_empty() {
        tracing::warn!(
            ?lora_targets,
            "no LoRA target matches a Llama projection (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        );
    }
    Ok(ModelProfile {
        params: a1.params,
        quantizable_params: quantizable.min(a1.params),
        largest_matrix_params: largest.min(quantizable),
        hidden_size: cfg.hidden_size as u64,
        blocks,
        head_activation_elems_per_token: head,
        vocab_size: cfg.vocab_size as u64,
        lora_params_per_rank: l * targeted.iter().map(|(_, i, o)| i + o).sum::<u64>(),
        lora_activation_elems_per_token_per_rank: l * targeted.len() as u64,
        forward_flops_per_token: a1.forward_flops_per_token.saturating_sub(flops_per_pos * s),
        forward_flops_per_token_per_position: flops_per_pos,
        fused: fused_step_applies(cfg, seq_len, chunked).then(|| fused_profile(cfg)),
    })
}

/// Whether `eg train` runs eg-model's fused training step (`Llama::fused_step`) for full
/// training in f32 of `cfg` at `seq_len`: the model-side conditions of
/// `Llama::fused_step_unavailable` (no sliding window shorter than the sequence, no chunked
/// attention, no projection biases). The setup-side ones (no LoRA, f32 compute) are
/// checked by the memory model itself ([`ModelProfile::fused`]).
pub(crate) fn fused_step_applies(cfg: &LlamaConfig, seq_len: usize, chunked: bool) -> bool {
    let window_shorter = cfg.attention_window().is_some_and(|w| w < seq_len);
    !window_shorter && !chunked && !cfg.qkv_bias() && !cfg.o_bias()
}

/// What eg-model's fused training step keeps and allocates per token, counted from
/// `crates/eg-model/src/fused.rs` (`h` hidden, `i` intermediate, `nh`/`nkv` query and
/// key/value heads of width `hd`):
///
/// - per block (`Saved`): the input, both norms' outputs and the attention residual
///   (`4h`), the rotated queries and the merged attention output (`2·nh·hd`), keys and
///   values (`2·nkv·hd`), gate, up and their SwiGLU (`3i`); per position the attention
///   probabilities (`nh`);
/// - outside the blocks: the final hidden state and its norm (`2h`) and the logits (`V`),
///   whose gradient overwrites them;
/// - transient, the larger phase of `layer_backward` plus the incoming gradient `h`: the
///   MLP's (`d_act` with SwiGLU's two-wide gradient, `3i`, and `dhs2`, `h`) or the
///   attention's (`dx1`, `dhs1`, `2h`; `dq`/`dk`/`dv` and their un-rotated copies,
///   `2·(nh + 2·nkv)·hd`); per position one probability gradient per query group of a
///   sequence (`nh / nkv`: the groups run on the compute threads, at most about one
///   sequence's worth at a time on a small machine).
pub(crate) fn fused_profile(cfg: &LlamaConfig) -> mem::FusedProfile {
    let h = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let nh = cfg.num_attention_heads as u64;
    let nkv = (cfg.num_kv_heads() as u64).max(1);
    let hd = cfg.head_dim() as u64;
    let mlp = 3 * i + h;
    let attn = 2 * h + 2 * (nh + 2 * nkv) * hd;
    mem::FusedProfile {
        block_activation_elems_per_token: 4 * h + 2 * nh * hd + 2 * nkv * hd + 3 * i,
        block_activation_elems_per_token_per_position: nh,
        head_activation_elems_per_token: 2 * h + cfg.vocab_size as u64,
        transient_elems_per_token: h + mlp.max(attn),
        transient_elems_per_token_per_position: nh.div_ceil(nkv),
    }
}

/// The Llama configuration of the configured model, and a label for it.
fn model_config(cfg: &Config, vocab: Option<usize>) -> anyhow::Result<(LlamaConfig, String)> {
    let seq = cfg.data.seq_len.0 as usize;
    match &cfg.model.source {
        ModelSource::Builtin(name) => {
            let vocab = match (vocab, cfg.data.source) {
                (Some(v), _) => v,
                (None, config::wire::DataSource::Embedded) => {
                    elastic_guardian::data::embedded::ByteTokenizer::VOCAB
                }
                (None, other) => anyhow::bail!(
                    "the vocabulary of builtin:{name} comes from the tokenizer of data source `{other}`, which `eg plan` does not load: pass --vocab N"
                ),
            };
            let lc = model::builtin::config(name, vocab, seq.max(16))?;
            Ok((lc, format!("builtin:{name}")))
        }
        _ => {
            let dir =
                crate::model_cmd::model_dir(cfg)?.context("model.source names no directory")?;
            let file = dir.join("config.json");
            let lc = LlamaConfig::from_file(&file)
                .with_context(|| format!("reading the model configuration {}", file.display()))?;
            Ok((lc, dir.display().to_string()))
        }
    }
}

/// Whether `model.attention` runs the chunked kernel at this sequence length.
pub(crate) fn uses_chunked_attention(cfg: &Config, lc: &LlamaConfig) -> bool {
    model::attention::AttentionKind::from_config(cfg.model.attention)
        .use_chunked(cfg.data.seq_len.0 as usize, lc.attention_window())
}

fn yes_no(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Runs `eg plan`.
pub(crate) fn run(args: PlanArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = config::Sources::new()
        .files(&args.config)
        .process_env()
        .sets(&args.set)
        .load()?;
    let (lc, label) = model_config(&cfg, args.vocab)?;
    let targets: Vec<String> = match &cfg.model.lora {
        Some(l) => l.targets.clone(),
        None => DEFAULT_LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    let mut profile = profile_of(
        &lc,
        cfg.data.seq_len.0 as usize,
        &targets,
        uses_chunked_attention(&cfg, &lc),
    )?;
    // Only pre-training's causal LM takes the fused step (SFT's packed rows need document
    // masks; DPO and classification have their own objectives).
    if cfg.train.mode != config::wire::Mode::Pretrain {
        profile.fused = None;
    }

    let storage = match &cfg.memory.offload {
        config::Offload::Disk(d) => d.clone(),
        _ => PathBuf::from("."),
    };
    let root = hw::Root::new(&args.root);
    let mut report = hw::Detector::new(root)
        .gpu(hw::GpuQuery::Skip)
        .storage_path(storage)
        .detect();
    if report.capacity.is_none() {
        let fp = hw::capacity::machine_fingerprint(&report);
        // A missing or unreadable cache only means throughput uses assumed speeds.
        report.capacity = hw::capacity::read_cache(&args.cache_dir, &fp)
            .ok()
            .flatten();
    }
    let budget = mem::Budget::from_config(&report, &cfg.memory)?;
    let features = report.cpu.features.clone().unwrap_or_default();
    let request = mem::PlanRequest::from_config(&cfg, profile, &features);
    let speed = mem::SpeedModel::from_report(&report);
    let plan = mem::plan(&request, &budget, &mem::MemoryModel::default(), &speed)?;

    if args.json {
        let text = serde_json::to_string_pretty(&plan).context("serializing the plan")?;
        println!("{text}");
        return Ok(std::process::ExitCode::SUCCESS);
    }

    println!(
        "model      {label}: {:.2}M parameters, {} blocks, hidden {}, vocab {}",
        request.profile.params as f64 / 1e6,
        request.profile.blocks.len(),
        request.profile.hidden_size,
        request.profile.vocab_size
    );
    println!(
        "training   {}, {}, optimizer {:?}, seq_len {}, global batch {} tokens = {} sequences",
        request.precision,
        request.adapters,
        request.optimizer,
        request.seq_len,
        request.global_tokens,
        plan.global_sequences
    );
    let cg = &report.memory.cgroup;
    println!(
        "budget     {} (cgroup {}{})",
        plan.budget,
        match cg.version {
            hw::memory::CgroupVersion::V1 => "v1",
            hw::memory::CgroupVersion::V2 => "v2",
            _ => "none",
        },
        match cg.limit.bytes() {
            Some(b) => format!(", limit {}", mem::HumanBytes(b)),
            None => String::new(),
        }
    );
    println!(
        "speeds     {}",
        if plan.assumed_speeds {
            format!(
                "partly assumed ({} GFLOP/s, {} MB/s disk when unmeasured; run `eg hw --probe` to measure)",
                mem::SpeedModel::ASSUMED_GFLOPS,
                mem::SpeedModel::ASSUMED_DISK_MB_S
            )
        } else {
            "measured".to_string()
        }
    );
    println!();
    println!(
        "  {:>5} {:>5} {:>5} {:>7} {:>12} {:>7} {:>10} {:>5}",
        "micro", "accum", "ckpt", "offload", "peak", "budget", "throughput", "fits"
    );
    let usable = plan.budget.usable.0.max(1) as f64;
    for c in plan.candidates.iter().filter(|c| args.all || c.fits) {
        let s = c.strategy;
        let mark = if *c == plan.chosen { "*" } else { " " };
        println!(
            "{mark} {:>5} {:>5} {:>5} {:>7} {:>12} {:>6.0}% {:>10.2} {:>5}",
            s.micro_batch,
            s.accumulation,
            yes_no(s.checkpointing),
            s.offload.to_string(),
            mem::HumanBytes::from(c.estimate.peak).to_string(),
            100.0 * c.estimate.peak.0 as f64 / usable,
            c.relative_throughput,
            if c.fits { "yes" } else { "no" }
        );
    }
    println!();
    println!(
        "chosen     {}{}",
        plan.chosen.strategy,
        if plan.tight {
            " (tight: less than 10% headroom)"
        } else {
            ""
        }
    );
    println!("           {}", plan.chosen.estimate);
    if plan.chosen.strategy.offload == mem::OffloadKind::Disk
        && !matches!(cfg.memory.offload, config::Offload::Disk(_))
    {
        println!(
            "           needs memory.offload=\"disk\" and memory.offload_dir (fast local disk)"
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    /// A cgroup v2 container limited to `limit` bytes.
    fn container(dir: &std::path::Path, limit: u64) {
        let w = |rel: &str, text: &str| {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w("proc/self/cgroup", "0::/job\n");
        w(
            "proc/self/mountinfo",
            "1 0 0:1 / / rw - overlay overlay rw\n2 1 0:2 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        );
        w(
            "proc/meminfo",
            "MemTotal: 16777216 kB\nMemAvailable: 16000000 kB\n",
        );
        w("sys/fs/cgroup/cgroup.controllers", "memory\n");
        w("sys/fs/cgroup/job/memory.max", &format!("{limit}\n"));
        w("sys/fs/cgroup/job/memory.high", "max\n");
        w("sys/fs/cgroup/job/memory.current", "0\n");
    }

    fn args(root: &std::path::Path, set: &[&str]) -> PlanArgs {
        PlanArgs {
            config: Vec::new(),
            set: set.iter().map(|s| s.to_string()).collect(),
            json: false,
            all: false,
            vocab: None,
            cache_dir: root.join("no-cache"),
            root: root.to_path_buf(),
        }
    }

    #[test]
    fn default_config_plans_in_a_roomy_container() {
        let t = tempfile::tempdir().unwrap();
        container(t.path(), 8 << 30);
        let code = run(args(t.path(), &[])).unwrap();
        assert_eq!(code, std::process::ExitCode::SUCCESS);
    }

    #[test]
    fn a_small_container_is_a_memory_error_with_exit_code_7() {
        let t = tempfile::tempdir().unwrap();
        container(t.path(), 400 << 20);
        let a = args(
            t.path(),
            &[
                "model.source=builtin:small-llama",
                "data.seq_len=512",
                "train.batch.global_tokens=16384",
                "memory.reserve=\"256MiB\"",
                "memory.activation_checkpointing=off",
            ],
        );
        let err = run(a).unwrap_err();
        assert_eq!(exit::code_of(&err), 7, "{err:#}");
        assert!(err.to_string().contains("would help"), "{err:#}");
    }

    #[test]
    fn profile_matches_the_analysis() {
        let cfg = model::builtin::config("tiny-llama", 257, 256).unwrap();
        let p = profile_of(&cfg, 128, &["q_proj".into(), "v_proj".into()], false).unwrap();
        let f32_dtype = "f32".parse().unwrap();
        let a = model::analyze_llama(&cfg, f32_dtype, 128);
        assert_eq!(p.params, a.params);
        assert_eq!(p.blocks.len(), 4);
        // Reassembled at the same sequence length, activations equal the analysis.
        let total: u64 = p.blocks.iter().map(|b| b.elems_per_token(128)).sum::<u64>()
            + p.head_activation_elems_per_token;
        assert_eq!(total * 4, a.activation_bytes_per_token);
        // Attention scores and probabilities: 2 × heads per position.
        assert_eq!(p.blocks[0].activation_elems_per_token_per_position, 2 * 4);
        assert_eq!(p.forward_flops(128), a.forward_flops_per_token);
        // q_proj 128→128, v_proj 128→64, 4 layers.
        assert_eq!(p.lora_params_per_rank, 4 * ((128 + 128) + (128 + 64)));
        p.validate().unwrap();
    }

    #[test]
    fn fused_counts_of_small_llama_by_hand() {
        // small-llama: h 256, i 688, 8 heads / 4 KV heads of 32, byte vocabulary 257.
        let cfg = model::builtin::config("small-llama", 257, 512).unwrap();
        let f = fused_profile(&cfg);
        // x, hs1, x1, hs2 (4·256) + q, attn (2·8·32) + k, v (2·4·32) + gate, up, act (3·688).
        assert_eq!(f.block_activation_elems_per_token, 1024 + 512 + 256 + 2064);
        // The probabilities: one per head and position.
        assert_eq!(f.block_activation_elems_per_token_per_position, 8);
        // x, xf and the logits.
        assert_eq!(f.head_activation_elems_per_token, 512 + 257);
        // dy + max(MLP 3·688 + 256 = 2320, attention 2·256 + 2·(8 + 8)·32 = 1536).
        assert_eq!(f.transient_elems_per_token, 256 + 2320);
        assert_eq!(f.transient_elems_per_token_per_position, 2);
        let p = profile_of(&cfg, 256, &[], false).unwrap();
        assert_eq!(p.fused, Some(f));
        // Chunked attention runs candle's autograd: no fused counts.
        assert_eq!(profile_of(&cfg, 256, &[], true).unwrap().fused, None);
    }

    #[test]
    fn fused_decision_agrees_with_the_model() {
        use candle_core::{DType, Device};
        use model::attention::AttentionKind;
        let base = model::builtin::config("micro-llama", 64, 64).unwrap();
        let mut window = base.clone();
        window.model_type = model::ModelType::Mistral;
        window.sliding_window = Some(16);
        let mut biased = base.clone();
        biased.model_type = model::ModelType::Qwen2;
        let cases = [
            (&base, 32, AttentionKind::Auto, true),
            (&base, 32, AttentionKind::Chunked, false),
            (&window, 32, AttentionKind::Auto, false),
            (&window, 16, AttentionKind::Auto, true),
            (&biased, 32, AttentionKind::Auto, false),
        ];
        for (cfg, seq, kind, expected) in cases {
            let mut m = model::Llama::init(cfg, 1, DType::F32, &Device::Cpu).unwrap();
            m.set_attention(kind);
            let chunked = kind.use_chunked(seq, cfg.attention_window());
            let ours = fused_step_applies(cfg, seq, chunked);
            assert_eq!(ours, expected, "{:?} {seq} {kind:?}", cfg.model_type);
            assert_eq!(ours, m.fused_step_unavailable(seq).is_none(), "{kind:?}");
        }
    }
}
