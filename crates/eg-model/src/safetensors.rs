//! Memory-mapped safetensors reading and atomic writing, with typed errors.
//!
//! The header is validated completely when a file is opened (length, JSON, dtypes, shapes,
//! byte ranges within the file), so a truncated or corrupt file is an
//! [`Error::Safetensors`] naming the defect, never a panic. Tensor bytes are read from the
//! memory map only when a tensor is loaded.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// What is wrong with a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Defect {
    /// Shorter than the 8-byte header length.
    TooShort {
        /// File length.
        len: u64,
    },
    /// The header length points past the end of the file.
    HeaderPastEnd {
        /// Declared header length.
        header_len: u64,
        /// File length.
        file_len: u64,
    },
    /// The header is not a JSON object.
    HeaderNotJson {
        /// The parser's message.
        message: String,
    },
    /// A header entry lacks a field or has one of the wrong form.
    BadEntry {
        /// The tensor.
        tensor: String,
        /// Which field.
        field: &'static str,
    },
    /// A dtype this crate does not read.
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// The dtype string.
        dtype: String,
    },
    /// The byte range does not match the shape and dtype.
    SizeMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes the shape needs.
        expected_bytes: u64,
        /// Bytes the offsets give.
        found_bytes: u64,
    },
    /// The byte range ends past the end of the file (truncated file).
    Truncated {
        /// The tensor.
        tensor: String,
        /// End of its data, relative to the data section.
        end: u64,
        /// Length of the data section.
        data_len: u64,
    },
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Defect::TooShort { len } => write!(f, "file of {len} bytes has no header"),
            Defect::HeaderPastEnd {
                header_len,
                file_len,
            } => write!(
                f,
                "header of {header_len} bytes does not fit in a file of {file_len} bytes (truncated?)"
            ),
            Defect::HeaderNotJson { message } => write!(f, "header is not JSON: {message}"),
            Defect::BadEntry { tensor, field } => {
                write!(f, "entry {tensor:?} has a missing or invalid `{field}`")
            }
            Defect::UnsupportedDtype { tensor, dtype } => {
                write!(f, "tensor {tensor:?} has unsupported dtype {dtype}")
            }
            Defect::SizeMismatch {
                tensor,
                expected_bytes,
                found_bytes,
            } => write!(
                f,
                "tensor {tensor:?} needs {expected_bytes} bytes but its offsets give {found_bytes}"
            ),
            Defect::Truncated {
                tensor,
                end,
                data_len,
            } => write!(
                f,
                "tensor {tensor:?} ends at byte {end} of a {data_len}-byte data section (truncated)"
            ),
        }
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range in the data section.
    pub range: (usize, usize),
}

/// A memory-mapped safetensors file with a validated header.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
}

fn dtype_from_str(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        _ => return None,
    })
}

fn dtype_to_str(d: DType) -> Option<&'static str> {
    Some(match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        _ => return None,
    })
}

/// Parses and validates a header given the whole file's bytes.
fn parse(bytes: &[u8]) -> std::result::Result<(usize, BTreeMap<String, TensorInfo>), Defect> {
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(Defect::TooShort { len: file_len });
    };
    let mut lb = [0u8; 8];
    lb.copy_from_slice(len_bytes);
    let header_len = u64::from_le_bytes(lb);
    if header_len > file_len.saturating_sub(8) {
        return Err(Defect::HeaderPastEnd {
            header_len,
            file_len,
        });
    }
    let data_start = 8 + header_len as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..data_start]).map_err(|e| Defect::HeaderNotJson {
            message: e.to_string(),
        })?;
    let data_len = file_len - data_start as u64;
    let mut tensors = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |field| Defect::BadEntry {
            tensor: name.clone(),
            field,
        };
        let dtype_s = entry
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("dtype"))?;
        let dtype = dtype_from_str(dtype_s).ok_or_else(|| Defect::UnsupportedDtype {
            tensor: name.clone(),
            dtype: dtype_s.to_string(),
        })?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape"))?;
        let offs: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("data_offsets"))?
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<_>>()
            .ok_or_else(|| bad("data_offsets"))?;
        let [begin, end] = offs[..] else {
            return Err(bad("data_offsets"));
        };
        if end < begin {
            return Err(bad("data_offsets"));
        }
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let expected_bytes = n * dtype.size_in_bytes() as u64;
        if end - begin != expected_bytes {
            return Err(Defect::SizeMismatch {
                tensor: name,
                expected_bytes,
                found_bytes: end - begin,
            });
        }
        if end > data_len {
            return Err(Defect::Truncated {
                tensor: name,
                end,
                data_len,
            });
        }
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                range: (begin as usize, end as usize),
            },
        );
    }
    Ok((data_start, tensors))
}

impl SafetensorsFile {
    /// Memory-maps `path` and validates its header.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only. Another process truncating or rewriting the file
        // while it is mapped is undefined behaviour; model files are written atomically
        // (temp name + rename) by this crate, which replaces rather than modifies them.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(io)?;
        let (data_start, tensors) = parse(&mmap).map_err(|defect| Error::Safetensors {
            path: path.to_path_buf(),
            defect,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names and entries, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    /// Loads one tensor (copied out of the map) on `device`, converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensors {
                names: vec![name.to_string()],
            })?;
        let (b, e) = info.range;
        let bytes = &self.mmap[self.data_start + b..self.data_start + e];
        let t = Tensor::from_raw_buffer(bytes, info.dtype, &info.shape, device)?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Little-endian bytes of a tensor's elements in row-major order.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    macro_rules! le {
        ($ty:ty) => {
            t.to_vec1::<$ty>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
    }
    Ok(match t.dtype() {
        DType::F32 => le!(f32),
        DType::F64 => le!(f64),
        DType::BF16 => le!(half::bf16),
        DType::F16 => le!(half::f16),
        DType::U8 => le!(u8),
        DType::U32 => le!(u32),
        DType::I64 => le!(i64),
        other => {
            return Err(Error::UnsupportedDType {
                op: "safetensors write",
                dtype: other,
            });
        }
    })
}

/// Writes `tensors` as a safetensors file at `path`, atomically (temp name, fsync, rename,
/// fsync of the directory). `metadata` goes to the header's `__metadata__`.
pub fn write(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".to_string(),
            serde_json::to_value(metadata).map_err(Error::Json)?,
        );
    }
    let mut blobs = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in tensors {
        let dtype = dtype_to_str(t.dtype()).ok_or(Error::UnsupportedDType {
            op: "safetensors write",
            dtype: t.dtype(),
        })?;
        let bytes = tensor_bytes(t)?;
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.dims(),
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
        blobs.push(bytes);
    }
    let mut head = serde_json::to_vec(&header).map_err(Error::Json)?;
    // Pad with spaces so the data section starts 8-byte aligned, as the format recommends.
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(head.len() as u64).to_le_bytes())?;
        w.write_all(&head)?;
        for b in &blobs {
            w.write_all(b)?;
        }
        Ok(())
    })
}

/// Writes a file atomically: `write` fills a temporary file next to `path`, which is synced,
/// renamed over `path`, and the directory synced.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w).map_err(io(&tmp))?;
        let file = w.into_inner().map_err(|e| Error::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Directory fsync is best effort (not all platforms allow opening directories).
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_defects_are_typed() {
        assert_eq!(parse(b"abc"), Err(Defect::TooShort { len: 3 }));
        let mut b = 100u64.to_le_bytes().to_vec();
        b.extend(b"{}");
        assert!(matches!(parse(&b), Err(Defect::HeaderPastEnd { .. })));
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend(b"{{{{");
        assert!(matches!(parse(&b), Err(Defect::HeaderNotJson { .. })));
        let h = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend([0u8; 4]);
        assert!(matches!(parse(&b), Err(Defect::Truncated { .. })));
        let h = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend([0u8; 8]);
        assert!(matches!(parse(&b), Err(Defect::SizeMismatch { .. })));
        let h = br#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#;
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend([0u8; 8]);
        assert!(matches!(parse(&b), Err(Defect::UnsupportedDtype { .. })));
    }
}
