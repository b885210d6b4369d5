//! Named tensors in safetensors files (the format PyTorch users already have), and atomic
//! file writes: the data goes to a temporary file in the same directory, is synced, then
//! renamed over the target, so a crash at any moment leaves either the old or the new file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors, View};

use crate::dtype::{DType, to_bf16};
use crate::param::StateValue;
use crate::{Error, Result};

/// A tensor as stored in a file: float, integer or boolean.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// float32 (f64, f16 and bf16 files are converted to it on load).
    F32(ArrayD<f32>),
    /// int64 (int32 and uint8 files are widened on load).
    I64(ArrayD<i64>),
    /// bool.
    Bool(ArrayD<bool>),
}

impl TensorData {
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            TensorData::F32(a) => a.shape(),
            TensorData::I64(a) => a.shape(),
            TensorData::Bool(a) => a.shape(),
        }
    }

    /// The float array, or an error naming `name` and the actual dtype.
    pub fn into_f32(self, name: &str) -> Result<ArrayD<f32>> {
        match self {
            TensorData::F32(a) => Ok(a),
            other => Err(Error::Other(format!(
                "tensor `{name}` is {}, expected float32",
                other.dtype_name()
            ))),
        }
    }

    /// The integer array, or an error.
    pub fn into_i64(self, name: &str) -> Result<ArrayD<i64>> {
        match self {
            TensorData::I64(a) => Ok(a),
            other => Err(Error::Other(format!(
                "tensor `{name}` is {}, expected int64",
                other.dtype_name()
            ))),
        }
    }

    /// The boolean array, or an error.
    pub fn into_bool(self, name: &str) -> Result<ArrayD<bool>> {
        match self {
            TensorData::Bool(a) => Ok(a),
            other => Err(Error::Other(format!(
                "tensor `{name}` is {}, expected bool",
                other.dtype_name()
            ))),
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "float32",
            TensorData::I64(_) => "int64",
            TensorData::Bool(_) => "bool",
        }
    }
}

impl From<StateValue> for TensorData {
    fn from(v: StateValue) -> Self {
        match v {
            StateValue::F32(a) => TensorData::F32(a.into_owned()),
            StateValue::I64(a) => TensorData::I64(a),
        }
    }
}

impl TryFrom<TensorData> for StateValue {
    type Error = Error;
    fn try_from(v: TensorData) -> Result<Self> {
        match v {
            TensorData::F32(a) => Ok(StateValue::F32(a.into_shared())),
            TensorData::I64(a) => Ok(StateValue::I64(a)),
            TensorData::Bool(_) => Err(Error::Other("a bool tensor cannot be module state".into())),
        }
    }
}

/// Little-endian bytes of one tensor, for the safetensors writer.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `t`'s bytes; a float tensor as `floats` (bfloat16: each value rounded to nearest even, the
/// bytes PyTorch writes for a `torch.bfloat16` tensor).
fn encode(t: &TensorData, floats: DType) -> Encoded {
    let (dtype, bytes) = match t {
        TensorData::F32(a) if floats == DType::BF16 => (
            Dtype::BF16,
            a.iter()
                .flat_map(|&v| to_bf16(v).to_bits().to_le_bytes())
                .collect(),
        ),
        TensorData::F32(a) => (Dtype::F32, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorData::I64(a) => (Dtype::I64, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
        TensorData::Bool(a) => (Dtype::BOOL, a.iter().map(|&v| v as u8).collect()),
    };
    Encoded {
        dtype,
        shape: t.shape().to_vec(),
        bytes,
    }
}

/// Serializes named tensors (and optional string metadata) to safetensors bytes.
pub fn to_safetensors_bytes(
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    to_safetensors_bytes_as(tensors, metadata, &|_| DType::F32)
}

/// [`to_safetensors_bytes`] with each float tensor written as `float_dtype(name)`: float32, or
/// bfloat16 (values rounded to nearest even; exact for values that came from bfloat16).
/// Integer and boolean tensors are written as they are.
pub fn to_safetensors_bytes_as(
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
    float_dtype: &dyn Fn(&str) -> DType,
) -> Result<Vec<u8>> {
    let encoded: Vec<(String, Encoded)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), encode(v, float_dtype(k))))
        .collect();
    let views = encoded.iter().map(|(k, e)| (k.as_str(), e));
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::Other(format!("safetensors serialize: {e}")))
}

/// Writes named tensors to `path` atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = to_safetensors_bytes(tensors, metadata)?;
    write_atomic(path, &bytes)
}

/// [`save_safetensors`] with each float tensor written as `float_dtype(name)` (see
/// [`to_safetensors_bytes_as`]).
pub fn save_safetensors_as(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, TensorData>,
    metadata: Option<HashMap<String, String>>,
    float_dtype: &dyn Fn(&str) -> DType,
) -> Result<()> {
    let bytes = to_safetensors_bytes_as(tensors, metadata, float_dtype)?;
    write_atomic(path, &bytes)
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads every tensor of a safetensors file.
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<BTreeMap<String, TensorData>> {
    let path = path.as_ref();
    let bytes = read_all(path)?;
    from_safetensors_bytes(&bytes).map_err(|e| match e {
        Error::Other(detail) => Error::format(path, detail),
        other => other,
    })
}

/// Reads the string metadata of a safetensors file.
pub fn load_safetensors_metadata(path: impl AsRef<Path>) -> Result<HashMap<String, String>> {
    let path = path.as_ref();
    let bytes = read_all(path)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Parses safetensors bytes.
///
/// Nothing is allocated beyond what the buffer justifies: the safetensors crate checks the
/// header (at most 100 MB) against the buffer first — offsets contiguous and inside the data,
/// each tensor's byte length equal to its shape's product (computed with overflow checks) times
/// its dtype's size — and only then is each tensor copied out, so every allocation is bounded
/// by the bytes actually present. Shapes whose zero-sized axes hide an element count beyond
/// `isize::MAX` are refused by name, as are unsupported dtypes.
pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<BTreeMap<String, TensorData>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Other(format!("invalid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let bad = |what: String| Error::Other(format!("tensor `{name}`: {what}"));
        let dtype = view.dtype();
        let width = match dtype {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::U8 | Dtype::BOOL => 1,
            other => {
                return Err(bad(format!(
                    "unsupported dtype {other:?} (float32/64, float16, bfloat16, int64/32, \
                     uint8 and bool are read)"
                )));
            }
        };
        let shape = view.shape().to_vec();
        if shape.len() > MAX_RANK {
            return Err(bad(format!(
                "rank {} is above the {MAX_RANK} axes a tensor may have",
                shape.len()
            )));
        }
        // ndarray also bounds the product of the non-zero axes (a shape like [0, 2^40, 2^40]
        // holds no element but cannot be an array).
        let dim = IxDyn(&shape);
        let nonzero = shape
            .iter()
            .filter(|&&s| s != 0)
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .filter(|&p| p <= isize::MAX as usize);
        let n = match nonzero {
            None => {
                return Err(bad(format!(
                    "shape {shape:?} has more elements than an array can address"
                )));
            }
            Some(_) if shape.contains(&0) => 0,
            Some(p) => p,
        };
        let data = view.data();
        if n.checked_mul(width) != Some(data.len()) {
            return Err(bad(format!(
                "{} bytes do not hold {shape:?} elements of {dtype:?}",
                data.len()
            )));
        }
        let array_err = |e: ndarray::ShapeError| bad(format!("shape {shape:?}: {e}"));
        let floats = |f: &dyn Fn(&[u8]) -> f32| -> Result<ArrayD<f32>> {
            ArrayD::from_shape_vec(dim.clone(), data.chunks_exact(width).map(f).collect())
                .map_err(array_err)
        };
        let ints = |f: &dyn Fn(&[u8]) -> i64| -> Result<ArrayD<i64>> {
            ArrayD::from_shape_vec(dim.clone(), data.chunks_exact(width).map(f).collect())
                .map_err(array_err)
        };
        // `chunks_exact(width)` yields slices of exactly `width` bytes.
        let le4 = |c: &[u8]| [c[0], c[1], c[2], c[3]];
        let le8 = |c: &[u8]| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
        let t = match dtype {
            Dtype::F32 => TensorData::F32(floats(&|c| f32::from_le_bytes(le4(c)))?),
            Dtype::F64 => TensorData::F32(floats(&|c| f64::from_le_bytes(le8(c)) as f32)?),
            Dtype::BF16 => TensorData::F32(floats(&|c| {
                f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)
            })?),
            Dtype::F16 => {
                TensorData::F32(floats(&|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))?)
            }
            Dtype::I64 => TensorData::I64(ints(&|c| i64::from_le_bytes(le8(c)))?),
            Dtype::I32 => TensorData::I64(ints(&|c| i32::from_le_bytes(le4(c)) as i64)?),
            Dtype::U8 => TensorData::I64(ints(&|c| c[0] as i64)?),
            // BOOL, the only dtype left after the width match above.
            _ => {
                if data.iter().any(|&b| b > 1) {
                    return Err(bad("bool tensor holds bytes other than 0 and 1".into()));
                }
                TensorData::Bool(
                    ArrayD::from_shape_vec(dim.clone(), data.iter().map(|&b| b == 1).collect())
                        .map_err(array_err)?,
                )
            }
        };
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// The most axes a tensor read from a file may have (PyTorch allows 64; nothing here uses
/// more than 6).
pub const MAX_RANK: usize = 64;

/// IEEE half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalize it.
            let shift = f.leading_zeros() - 21;
            let f = (f << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (f << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one:
/// temp file in the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::format(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Persist the rename itself; not every platform can sync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_files_hold_the_bits_pytorch_writes_and_read_back() {
        // `torch.tensor([...]).to(torch.bfloat16)` saved by safetensors.torch (torch 2.15 in
        // the reference environment) stores these bits: ties to even, subnormals kept.
        let values = [
            1.0 + 3.0 * 2f32.powi(-8),
            1.0 + 2f32.powi(-8),
            -2.5,
            3.0e38,
            1e-40,
            0.1,
        ];
        let torch_bits: [u16; 6] = [0x3f82, 0x3f80, 0xc020, 0x7f62, 0x0001, 0x3dcd];
        let tensors = BTreeMap::from([
            (
                "w".to_string(),
                TensorData::F32(ArrayD::from_shape_vec(IxDyn(&[6]), values.to_vec()).unwrap()),
            ),
            (
                "c".to_string(),
                TensorData::I64(ArrayD::from_elem(IxDyn(&[]), 3)),
            ),
        ]);
        let bytes = to_safetensors_bytes_as(&tensors, None, &|_| DType::BF16).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("w").unwrap();
        assert_eq!(w.dtype(), Dtype::BF16);
        let bits: Vec<u16> = w
            .data()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(bits, torch_bits);
        assert_eq!(st.tensor("c").unwrap().dtype(), Dtype::I64);
        // Read back: the bf16 values, widened exactly; the counter as it was.
        let back = from_safetensors_bytes(&bytes).unwrap();
        let w = back["w"].clone().into_f32("w").unwrap();
        for ((&got, &bits), &orig) in w.iter().zip(&torch_bits).zip(&values) {
            assert_eq!(got.to_bits(), (bits as u32) << 16, "{orig}");
        }
        assert_eq!(back["c"], tensors["c"]);
        // NaN stays NaN.
        let nan = BTreeMap::from([(
            "n".to_string(),
            TensorData::F32(ArrayD::from_elem(IxDyn(&[1]), f32::NAN)),
        )]);
        let bytes = to_safetensors_bytes_as(&nan, None, &|_| DType::BF16).unwrap();
        let back = from_safetensors_bytes(&bytes).unwrap();
        assert!(back["n"].clone().into_f32("n").unwrap()[0].is_nan());
    }
}
