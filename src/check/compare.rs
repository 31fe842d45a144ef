//! The tolerance check every float comparison with the reference goes through: it fails on any
//! non-finite value in either tensor (a max over `|a - b|` would skip NaN) and names the worst
//! element by its index.

use candle_core::{DType, Device, Tensor};

/// Where two tensors of the same shape differ most.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Largest `|got - want|`.
    pub max_abs_diff: f32,
    /// Index of that element (one coordinate per dimension).
    pub worst_index: Vec<usize>,
    pub got: f32,
    pub want: f32,
}

/// Why a comparison failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CloseError {
    #[error("shape {got:?} vs reference {want:?}")]
    Shape { got: Vec<usize>, want: Vec<usize> },
    #[error("{side} value {value} at index {index:?} (the other side has {other})")]
    NonFinite {
        side: &'static str,
        index: Vec<usize>,
        value: f32,
        other: f32,
    },
    #[error(
        "max abs diff {:e} > {atol:e} at index {:?} (got {}, reference {})",
        .diff.max_abs_diff, .diff.worst_index, .diff.got, .diff.want
    )]
    TooFar { diff: Difference, atol: f32 },
    #[error("cannot read the tensors: {0}")]
    Tensor(String),
}

/// The element-wise difference of `got` and `want` (any dtype, any device), or why they cannot
/// be compared: different shapes, or a NaN / infinity on either side.
pub fn difference(got: &Tensor, want: &Tensor) -> Result<Difference, CloseError> {
    if got.dims() != want.dims() {
        return Err(CloseError::Shape {
            got: got.dims().to_vec(),
            want: want.dims().to_vec(),
        });
    }
    let host = |t: &Tensor| -> Result<Vec<f32>, CloseError> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| CloseError::Tensor(e.to_string()))
    };
    let (a, b) = (host(got)?, host(want)?);
    let dims = got.dims();
    let mut worst = (0usize, 0f32);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        for (side, value, other) in [("got", x, y), ("reference", y, x)] {
            if !value.is_finite() {
                return Err(CloseError::NonFinite {
                    side,
                    index: unravel(i, dims),
                    value,
                    other,
                });
            }
        }
        let d = (x - y).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    let (i, max_abs_diff) = worst;
    Ok(Difference {
        max_abs_diff,
        worst_index: unravel(i, dims),
        got: a.get(i).copied().unwrap_or(0.0),
        want: b.get(i).copied().unwrap_or(0.0),
    })
}

/// `Ok(difference)` when every element of `got` is within `atol` of `want` and both are
/// finite everywhere.
pub fn check_close(got: &Tensor, want: &Tensor, atol: f32) -> Result<Difference, CloseError> {
    let diff = difference(got, want)?;
    if diff.max_abs_diff <= atol {
        Ok(diff)
    } else {
        Err(CloseError::TooFar { diff, atol })
    }
}

/// The indices along dimension `dim` (a sequence's positions) holding an element of `got` more
/// than `atol` from `want`'s, with the difference over everything.
pub fn positions_beyond(
    got: &Tensor,
    want: &Tensor,
    atol: f32,
    dim: usize,
) -> Result<(Vec<usize>, Difference), CloseError> {
    let diff = difference(got, want)?;
    let dims = got.dims();
    if dim >= dims.len() {
        return Err(CloseError::Tensor(format!(
            "no dimension {dim} in a tensor of shape {dims:?}"
        )));
    }
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| CloseError::Tensor(e.to_string()))
    };
    let (a, b) = (host(got)?, host(want)?);
    let inner: usize = dims[dim + 1..].iter().product();
    let len = dims[dim];
    let mut beyond = vec![false; len];
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        if (x - y).abs() > atol {
            beyond[(i / inner.max(1)) % len] = true;
        }
    }
    let positions = (0..len).filter(|&p| beyond[p]).collect();
    Ok((positions, diff))
}

/// The row-major index of flat element `i` of a tensor of shape `dims`.
fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (slot, &d) in index.iter_mut().zip(dims).rev() {
        if d > 0 {
            *slot = i % d;
            i /= d;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(values: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn positions_beyond_names_the_rows_that_are_off() {
        let want = Tensor::zeros((1, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let got = Tensor::from_slice(
            &[0.0f32, 0.1, 0.0, 0.0, 0.0, 0.9, 0.5, 0.0],
            (1, 4, 2),
            &Device::Cpu,
        )
        .unwrap();
        let (positions, diff) = positions_beyond(&got, &want, 0.2, 1).unwrap();
        assert_eq!(positions, vec![2, 3]);
        assert_eq!(diff.max_abs_diff, 0.9);
        assert!(positions_beyond(&got, &want, 0.2, 3).is_err());
    }

    #[test]
    fn close_tensors_pass_and_report_the_worst_element() {
        let want = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3));
        let got = t(&[1.0, 2.0, 3.0, 4.0, 5.25, 6.0], (2, 3));
        let diff = check_close(&got, &want, 0.5).unwrap();
        assert_eq!(diff.max_abs_diff, 0.25);
        assert_eq!(diff.worst_index, vec![1, 1]);
        let err = check_close(&got, &want, 0.1).unwrap_err();
        assert!(matches!(err, CloseError::TooFar { .. }));
        let message = err.to_string();
        assert!(
            message.contains("[1, 1]") && message.contains("5.25"),
            "{message}"
        );
    }

    /// A planted NaN fails the check even where every other element agrees exactly, which a
    /// max over `|a - b|` would not see.
    #[test]
    fn a_planted_nan_fails_with_its_index() {
        let want = t(&[0.5; 6], (3, 2));
        let mut values = [0.5f32; 6];
        values[3] = f32::NAN;
        let err = check_close(&t(&values, (3, 2)), &want, 1e3).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, CloseError::NonFinite { side: "got", index, .. } if index == &[1, 1]),
            "{message}"
        );
        assert!(
            message.contains("NaN") && message.contains("[1, 1]"),
            "{message}"
        );
        // On the reference side, and infinities, too.
        values[3] = f32::INFINITY;
        let err = check_close(&want, &t(&values, (3, 2)), 1e3).unwrap_err();
        assert!(
            matches!(
                err,
                CloseError::NonFinite {
                    side: "reference",
                    ..
                }
            ),
            "{err}"
        );
        // Most of the tensor NaN: still a failure (the old max skipped NaN elements).
        let nans = t(
            &[f32::NAN, f32::NAN, f32::NAN, 0.5, f32::NAN, f32::NAN],
            (3, 2),
        );
        assert!(check_close(&nans, &want, 1e3).is_err());
    }

    #[test]
    fn shape_mismatch_is_named() {
        let err = check_close(&t(&[0.0; 6], (2, 3)), &t(&[0.0; 6], (3, 2)), 1.0).unwrap_err();
        assert_eq!(err.to_string(), "shape [2, 3] vs reference [3, 2]");
    }

    #[test]
    fn bf16_and_empty_tensors_compare() {
        let want = t(&[1.0, -2.0], (1, 2));
        let got = want.to_dtype(DType::BF16).unwrap();
        assert_eq!(check_close(&got, &want, 0.0).unwrap().max_abs_diff, 0.0);
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(check_close(&empty, &empty, 0.0).unwrap().max_abs_diff, 0.0);
    }
}
