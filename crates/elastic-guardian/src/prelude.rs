//! The types a training script needs, in one `use`.
//!
//! Re-exports only: each type lives in the crate that owns it.

pub use candle_core::{DType, Device};
pub use eg_config::{Bytes, Config, Ratio, SeqLen, Sources, Steps, Tokens};
pub use eg_data::{InMemoryDataset, Loader, LoaderOptions, Packing, Placement, TokenDataset};
pub use eg_hardware::HardwareReport;
pub use eg_kernel::{
    Callback, Checkpoints, FitReport, OptimizerSpec, ScheduleSpec, TrainModel, Trainer,
    TrainerBuilder,
};
pub use eg_model::{Bert, CausalLm, Gpt2, Llama, LlamaConfig, ParamStore};

pub use crate::{Error, Result};
