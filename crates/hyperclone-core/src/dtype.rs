//! Floating-point storage types of safetensors files and bulk conversion to and from f64.
//!
//! Growth arithmetic runs in f64: it is exact for f64 checkpoints, and for f32/bf16/f16 it
//! gives the correctly rounded result of `w / r` after a single rounding to the output type
//! (stricter than the f32 arithmetic the design asks for, at no cost: the kernels are
//! memory-bound).

use half::{bf16, f16};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F64,
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name used in safetensors headers ("F32", "BF16", ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
        }
    }

    /// Parses a safetensors header dtype. Integer and quantised types are not weights we grow.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        match name {
            "F64" => Some(DType::F64),
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::BF16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }

    /// The name transformers writes in config.json (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Parses a user-facing name: f32, float32, bf16, bfloat16, f16, float16, half, f64.
    pub fn parse(name: &str) -> Option<DType> {
        match name.to_ascii_lowercase().as_str() {
            "f64" | "float64" | "double" => Some(DType::F64),
            "f32" | "float32" | "float" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f16" | "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// Decodes little-endian elements of this dtype into `out` (`bytes.len() == out.len() * size`).
    /// How many of the little-endian values in `bytes` are NaN or infinite (the exponent
    /// bits all set), without converting them.
    pub fn count_nonfinite(self, bytes: &[u8]) -> usize {
        fn count<const N: usize>(bytes: &[u8], mask: u64) -> usize {
            bytes
                .chunks_exact(N)
                .filter(|c| {
                    let mut v = [0u8; 8];
                    v[..N].copy_from_slice(c);
                    u64::from_le_bytes(v) & mask == mask
                })
                .count()
        }
        match self {
            DType::F64 => count::<8>(bytes, 0x7ff0_0000_0000_0000),
            DType::F32 => count::<4>(bytes, 0x7f80_0000),
            DType::BF16 => count::<2>(bytes, 0x7f80),
            DType::F16 => count::<2>(bytes, 0x7c00),
        }
    }

    pub fn decode(self, bytes: &[u8], out: &mut [f64]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::F64 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                    *o = f64::from_le_bytes(c.try_into().expect("chunk of 8"));
                }
            }
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes(c.try_into().expect("chunk of 4")) as f64;
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64();
                }
            }
        }
    }

    /// Encodes `values` little-endian into `out`, rounding to nearest (ties to even).
    pub fn encode(self, values: &[f64], out: &mut [u8]) {
        debug_assert_eq!(out.len(), values.len() * self.size());
        match self {
            DType::F64 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(8)) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F32 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(4)) {
                    c.copy_from_slice(&(*v as f32).to_le_bytes());
                }
            }
            DType::BF16 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                    c.copy_from_slice(&bf16::from_f64(*v).to_bits().to_le_bytes());
                }
            }
            DType::F16 => {
                for (v, c) in values.iter().zip(out.chunks_exact_mut(2)) {
                    c.copy_from_slice(&f16::from_f64(*v).to_bits().to_le_bytes());
                }
            }
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nonfinite_values() {
        for d in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let values = [
                1.0,
                f64::NAN,
                -0.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
                65504.0,
                -3.5e-3,
            ];
            let mut b = vec![0u8; values.len() * d.size()];
            d.encode(&values, &mut b);
            assert_eq!(d.count_nonfinite(&b), 3, "{d:?}");
        }
    }

    #[test]
    fn round_trip_every_dtype() {
        let values = [0.0, 1.0, -2.5, 0.1, 3.0e-3, -65504.0];
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let mut bytes = vec![0u8; values.len() * dtype.size()];
            dtype.encode(&values, &mut bytes);
            let mut back = vec![0.0; values.len()];
            dtype.decode(&bytes, &mut back);
            for (a, b) in values.iter().zip(&back) {
                // bf16 keeps 8 significant bits, f16 11: relative error <= 2^-8.
                assert!(
                    (a - b).abs() <= a.abs() * 2f64.powi(-8),
                    "{dtype}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn names_parse_back() {
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            assert_eq!(
                DType::from_safetensors_name(dtype.safetensors_name()),
                Some(dtype)
            );
            assert_eq!(DType::parse(dtype.torch_name()), Some(dtype));
        }
        assert_eq!(DType::from_safetensors_name("I64"), None);
    }
}
