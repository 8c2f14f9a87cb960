//! Hugging Face model directories: loading, saving and the hf-hub cache layout.
//!
//! A directory holds `config.json` and either `model.safetensors` or
//! `model.safetensors.index.json` with its shards. Files are memory-mapped; tensors are
//! converted to the requested dtype as they are copied into the model's variables.
//!
//! The hf-hub cache (`<cache>/models--org--name/snapshots/<commit>/`, with `refs/<branch>`
//! holding the commit of a branch) is resolved by reading directories: no network, no
//! `hf-hub` crate. Which cache directory to use is the caller's choice (only eg-config reads
//! environment variables such as `HF_HOME`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::{LlamaConfig, ModelType};
use crate::llama::Llama;
use crate::safetensors::{SafetensorsFile, write, write_atomic};
use crate::{Error, Result};

/// Name of the single-file weights.
pub const WEIGHTS: &str = "model.safetensors";
/// Name of the sharded-weights index.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// Name of the configuration.
pub const CONFIG: &str = "config.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The safetensors files of a directory, memory-mapped, and which file holds which tensor.
#[derive(Debug)]
pub struct Weights {
    files: Vec<SafetensorsFile>,
    routing: BTreeMap<String, usize>,
}

impl Weights {
    /// Opens `model.safetensors` or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS);
        let index = dir.join(WEIGHTS_INDEX);
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
                    path: index.clone(),
                    source,
                })?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::ConfigMissingField {
                    path: index.clone(),
                    field: "weight_map",
                })?;
            let mut shard_names: Vec<String> = Vec::new();
            let mut claimed: Vec<(String, String)> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::InvalidConfig {
                    field: "weight_map",
                    reason: format!("entry for {tensor} is not a file name"),
                })?;
                if !shard_names.iter().any(|s| s == file) {
                    shard_names.push(file.to_string());
                }
                claimed.push((tensor.clone(), file.to_string()));
            }
            let mut files = Vec::new();
            let mut routing = BTreeMap::new();
            for (i, name) in shard_names.iter().enumerate() {
                let f = SafetensorsFile::open(&dir.join(name))?;
                for t in f.tensors().keys() {
                    routing.insert(t.clone(), i);
                }
                files.push(f);
            }
            // Every tensor the index promises must be in the shard it names.
            let missing: Vec<String> = claimed
                .iter()
                .filter(|(t, file)| {
                    routing
                        .get(t)
                        .is_none_or(|&i| shard_names.get(i) != Some(file))
                })
                .map(|(t, _)| t.clone())
                .collect();
            if !missing.is_empty() {
                return Err(Error::MissingTensors { names: missing });
            }
            Ok(Self { files, routing })
        } else if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            let routing = f.tensors().keys().map(|k| (k.clone(), 0)).collect();
            Ok(Self {
                files: vec![f],
                routing,
            })
        } else {
            Err(Error::NoWeights {
                dir: dir.to_path_buf(),
            })
        }
    }

    /// All tensor names with their shapes.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.routing
            .iter()
            .filter_map(|(n, &i)| {
                self.files
                    .get(i)
                    .and_then(|f| f.tensors().get(n))
                    .map(|info| (n.clone(), info.shape.clone()))
            })
            .collect()
    }

    /// Loads one tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let file = self
            .routing
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| Error::MissingTensors {
                names: vec![name.to_string()],
            })?;
        file.load(name, dtype, device)
    }
}

impl Llama {
    /// Loads a Hugging Face directory (`config.json` + safetensors) with parameters in
    /// `dtype` on `device`.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = LlamaConfig::from_file(&dir.join(CONFIG))?;
        let weights = Weights::open_dir(dir)?;
        // Check names and shapes from the headers before reading any data.
        let shapes: HashMap<String, Vec<usize>> = weights.shapes().into_iter().collect();
        crate::llama::check_names(&cfg, &shapes)?;
        let mut tensors = HashMap::new();
        for name in shapes.keys() {
            tensors.insert(name.clone(), weights.load(name, dtype, device)?);
        }
        Self::from_tensors(&cfg, tensors, dtype)
    }

    /// Saves `config.json` and the parameters as a Hugging Face directory (created if
    /// needed). With `max_shard_bytes`, weights larger than that are split into
    /// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
    /// Every file is written atomically.
    ///
    /// A model with LoRA adapters is refused ([`Error::LoraState`]): save the adapters with
    /// [`Llama::save_lora_adapter`] or the merged model via [`Llama::merge_and_unload`].
    pub fn save_hf_dir(&self, dir: &Path, max_shard_bytes: Option<u64>) -> Result<()> {
        if self.lora_config().is_some() {
            return Err(Error::LoraState {
                op: "save_hf_dir",
                reason: "the model has adapters; save them with save_lora_adapter or merge_and_unload first",
            });
        }
        let mut cfg = self.config().clone();
        cfg.extra.insert(
            "torch_dtype".to_string(),
            serde_json::Value::String(torch_dtype(self.dtype()).to_string()),
        );
        save_dir(
            dir,
            self.params().tensors(),
            &cfg.to_json_string()?,
            max_shard_bytes,
        )
    }
}

/// Writes weights (single file or shards + index) and `config.json` into `dir`, atomically
/// file by file.
pub(crate) fn save_dir(
    dir: &Path,
    tensors: BTreeMap<String, Tensor>,
    config_json: &str,
    max_shard_bytes: Option<u64>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let total: u64 = tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    match max_shard_bytes {
        Some(limit) if total > limit => {
            let mut shards: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new()];
            let mut size = 0u64;
            for (name, t) in tensors {
                let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
                if size > 0 && size + bytes > limit {
                    shards.push(BTreeMap::new());
                    size = 0;
                }
                size += bytes;
                if let Some(last) = shards.last_mut() {
                    last.insert(name, t);
                }
            }
            let n = shards.len();
            let mut weight_map = BTreeMap::new();
            for (i, shard) in shards.iter().enumerate() {
                let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
                for name in shard.keys() {
                    weight_map.insert(name.clone(), file.clone());
                }
                write(&dir.join(&file), shard, &meta)?;
            }
            let index = serde_json::json!({
                "metadata": {"total_size": total},
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).map_err(Error::Json)?;
            write_atomic(&dir.join(WEIGHTS_INDEX), |w| {
                std::io::Write::write_all(w, text.as_bytes())
            })?;
            remove_if_exists(&dir.join(WEIGHTS))?;
        }
        _ => {
            write(&dir.join(WEIGHTS), &tensors, &meta)?;
            remove_if_exists(&dir.join(WEIGHTS_INDEX))?;
        }
    }
    write_atomic(&dir.join(CONFIG), |w| {
        std::io::Write::write_all(w, config_json.as_bytes())
    })
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

pub(crate) fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Finds a model's snapshot directory in an hf-hub cache, offline.
///
/// `revision` is a branch or tag with a `refs/<revision>` file, or a commit hash with a
/// `snapshots/<hash>` directory; `None` means `main`.
pub fn resolve_hf_cache(cache_dir: &Path, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let not_found = |path: PathBuf| Error::NotInCache {
        repo: repo.to_string(),
        revision: revision.to_string(),
        path,
    };
    if !repo_dir.is_dir() {
        return Err(not_found(repo_dir));
    }
    let ref_file = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(s) => s.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit == ".." {
        return Err(not_found(ref_file));
    }
    let snap = repo_dir.join("snapshots").join(&commit);
    if snap.is_dir() {
        Ok(snap)
    } else {
        Err(not_found(snap))
    }
}

/// One tensor as a safetensors header describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorSummary {
    /// Name.
    pub name: String,
    /// Element type (`f32`, `bf16`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// What `eg model inspect DIR` shows: the real tensors (read from the headers only, no
/// data), their totals, and for the Llama family the per-module analysis.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Inspection {
    /// `model_type` from `config.json`.
    pub model_type: String,
    /// Every tensor in the weights, sorted by name.
    pub tensors: Vec<TensorSummary>,
    /// Total number of elements.
    pub params: u64,
    /// Bytes by element type.
    pub bytes_by_dtype: BTreeMap<String, u64>,
    /// Per-module analysis at `seq_len` (Llama family only).
    pub analysis: Option<crate::analysis::Analysis>,
}

/// Inspects a Hugging Face directory without loading tensor data.
pub fn inspect_dir(dir: &Path, seq_len: usize) -> Result<Inspection> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::ConfigParse {
            path: path.clone(),
            source,
        })?;
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::ConfigMissingField {
            path: path.clone(),
            field: "model_type",
        })?
        .to_string();
    let weights = Weights::open_dir(dir)?;
    let mut tensors = Vec::new();
    let mut params = 0u64;
    let mut bytes_by_dtype = BTreeMap::new();
    let mut dtypes: HashMap<DType, u64> = HashMap::new();
    for file in &weights.files {
        for (name, info) in file.tensors() {
            let n: u64 = info.shape.iter().map(|&d| d as u64).product();
            params += n;
            let dt = info.dtype.as_str().to_string();
            *bytes_by_dtype.entry(dt.clone()).or_insert(0) += n * info.dtype.size_in_bytes() as u64;
            *dtypes.entry(info.dtype).or_insert(0) += n;
            tensors.push(TensorSummary {
                name: name.clone(),
                dtype: dt,
                shape: info.shape.clone(),
            });
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let analysis = if ModelType::SUPPORTED.contains(&model_type.as_str()) {
        let cfg = LlamaConfig::from_json_str(&text, &path)?;
        // The dtype holding most parameters.
        let dtype = dtypes
            .iter()
            .max_by_key(|(d, n)| (**n, d.as_str()))
            .map_or(DType::F32, |(d, _)| *d);
        Some(crate::analysis::analyze_llama(&cfg, dtype, seq_len))
    } else {
        None
    };
    Ok(Inspection {
        model_type,
        tensors,
        params,
        bytes_by_dtype,
        analysis,
    })
}
