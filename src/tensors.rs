//! Named tensors: what is tracked ([`TensorSpec`]) and values on the host ([`HostTensors`]).

use crate::error::{Error, Result};

/// The element type of parameters in a user buffer. Shadows are always f32: at decay 0.999
/// alpha is below half an ulp of a bf16 value, and a bf16 shadow would never move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ParamDtype {
    /// 32-bit floats.
    #[default]
    F32,
    /// IEEE half precision, read with WGSL's `unpack2x16float` (no `SHADER_F16` needed).
    F16,
    /// bfloat16 (the top 16 bits of an f32).
    BF16,
}

impl ParamDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            ParamDtype::F32 => 4,
            ParamDtype::F16 | ParamDtype::BF16 => 2,
        }
    }
}

/// A tracked tensor: its name and shape. Elements are f32.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// The parameter's name, e.g. `layers.0.weight`.
    pub name: String,
    /// Its shape; `[]` for a scalar.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A tensor named `name` of shape `shape`.
    ///
    /// ```
    /// let w = wgpu_ema::TensorSpec::new("weight", [2, 1]);
    /// assert_eq!(w.numel(), 2);
    /// assert_eq!(w.shadow_name(), "weight/ExponentialMovingAverage");
    /// ```
    pub fn new(name: impl Into<String>, shape: impl AsRef<[usize]>) -> Self {
        Self {
            name: name.into(),
            shape: shape.as_ref().to_vec(),
        }
    }

    /// The number of elements (1 for a scalar). Saturates at `u64::MAX` when the shape's
    /// product overflows, which every size check then refuses ([`try_numel`](Self::try_numel)
    /// says so).
    pub fn numel(&self) -> u64 {
        self.try_numel().unwrap_or(u64::MAX)
    }

    /// The number of elements, or `None` when the shape's product overflows a `u64`.
    pub fn try_numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
    }

    /// The shadow's name as TensorFlow saves it: `<name>/ExponentialMovingAverage`.
    pub fn shadow_name(&self) -> String {
        crate::names::ema_shadow_name(&self.name, 0)
    }
}

/// The position of the tensor named `name` in `specs`, or [`Error::UnknownName`].
pub(crate) fn index_of(specs: &[TensorSpec], name: &str) -> Result<usize> {
    specs
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| Error::UnknownName {
            name: name.to_string(),
        })
}

/// Tensors on the host, by name, in a fixed order (the tracking order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensors {
    entries: Vec<(TensorSpec, Vec<f32>)>,
}

impl HostTensors {
    /// From (spec, values) pairs; the caller guarantees the lengths match the shapes.
    pub(crate) fn from_parts(entries: Vec<(TensorSpec, Vec<f32>)>) -> Self {
        Self { entries }
    }

    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor; its values must match its shape and its name must be new.
    pub fn insert(&mut self, spec: TensorSpec, values: Vec<f32>) -> Result<()> {
        if values.len() as u64 != spec.numel() {
            return Err(Error::LengthMismatch {
                expected: spec.numel(),
                got: values.len() as u64,
                name: spec.name,
            });
        }
        if self.get(&spec.name).is_some() {
            return Err(Error::DuplicateName { name: spec.name });
        }
        self.entries.push((spec, values));
        Ok(())
    }

    /// The values of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries
            .iter()
            .find(|(s, _)| s.name == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The values of `name`, or [`Error::UnknownName`].
    pub fn try_get(&self, name: &str) -> Result<&[f32]> {
        self.get(name).ok_or_else(|| Error::UnknownName {
            name: name.to_string(),
        })
    }

    /// (spec, values) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        self.entries.iter().map(|(s, v)| (s, v.as_slice()))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The values as slices, in order (what [`CpuEma::update`](crate::cpu::CpuEma::update) takes).
    pub fn slices(&self) -> Vec<&[f32]> {
        self.entries.iter().map(|(_, v)| v.as_slice()).collect()
    }
}
