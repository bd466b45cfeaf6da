//! Tracked tensors must not share bytes: an update or a swap of one would change the other,
//! and two swaps would no longer restore them.

use crate::error::{Error, Result};
use crate::tensors::{ParamDtype, TensorSpec};

/// Checks that no two of `tensors` (spec, buffer, byte offset, dtype) share a byte of one
/// buffer. O(n log n).
pub(crate) fn check<'a>(
    tensors: impl Iterator<Item = (&'a TensorSpec, &'a wgpu::Buffer, u64, ParamDtype)>,
) -> Result<()> {
    let mut spans: Vec<(&wgpu::Buffer, u64, u64, &str)> = tensors
        .filter_map(|(spec, buffer, offset, dtype)| {
            let bytes = spec.numel().saturating_mul(dtype.size());
            // Empty tensors hold no bytes.
            (bytes > 0).then(|| {
                (
                    buffer,
                    offset,
                    offset.saturating_add(bytes),
                    spec.name.as_str(),
                )
            })
        })
        .collect();
    spans.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for w in spans.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.0 == b.0 && a.2 > b.1 {
            return Err(Error::Overlap {
                first: a.3.to_string(),
                second: b.3.to_string(),
                first_range: a.1..a.2,
                second_range: b.1..b.2,
            });
        }
    }
    Ok(())
}
