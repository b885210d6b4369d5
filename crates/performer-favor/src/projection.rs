//! Gaussian orthogonal random features (the "OR" of FAVOR+).
//!
//! Blocks of `d` orthonormal rows come from the QR decomposition of Gaussian `d x d`
//! matrices; blocks are stacked and cut to `nb_rows`, then each row is scaled so that its norm
//! has the distribution of a Gaussian vector's norm (`scaling = 0`) or is exactly `sqrt(d)`
//! (`scaling = 1`), as performer-pytorch's `gaussian_orthogonal_random_matrix`.

use ndarray::{Array2, s};
use performer_tensor::rng::Generator;
use performer_tensor::{Error, Result};

/// How rows of the projection are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OrthoScaling {
    /// Norms drawn as the norms of Gaussian vectors (chi distribution with d degrees).
    #[default]
    Gaussian,
    /// Every row has norm `sqrt(d)`.
    Fixed,
}

impl OrthoScaling {
    /// performer-pytorch's integer code: 0 or 1.
    pub fn from_code(code: i64) -> Result<Self> {
        match code {
            0 => Ok(OrthoScaling::Gaussian),
            1 => Ok(OrthoScaling::Fixed),
            other => Err(Error::invalid(
                "gaussian_orthogonal_random_matrix",
                "scaling",
                other,
                "must be 0 or 1",
            )),
        }
    }

    /// The integer code.
    pub fn code(self) -> i64 {
        match self {
            OrthoScaling::Gaussian => 0,
            OrthoScaling::Fixed => 1,
        }
    }
}

/// `Q^T` of the QR decomposition of a standard Gaussian `cols x cols` matrix.
fn orthogonal_block(cols: usize, rng: &mut Generator) -> Result<Array2<f32>> {
    let gauss = Array2::from_shape_simple_fn((cols, cols), || rng.normal() as f64);
    let q = qr_q(&gauss)?;
    Ok(q.t().mapv(|v| v as f32))
}

#[cfg(not(feature = "lapack"))]
fn qr_q(a: &Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let m = faer::Mat::<f64>::from_fn(n, a.ncols(), |i, j| a[[i, j]]);
    let q = m.qr().compute_thin_Q();
    Ok(Array2::from_shape_fn((q.nrows(), q.ncols()), |(i, j)| {
        q[(i, j)]
    }))
}

#[cfg(feature = "lapack")]
fn qr_q(a: &Array2<f64>) -> Result<Array2<f64>> {
    use ndarray_linalg::QR;
    let (q, _r) = a
        .qr()
        .map_err(|e| Error::Other(format!("LAPACK QR failed: {e}")))?;
    Ok(q)
}

/// A `(nb_rows, nb_columns)` matrix of orthogonal random features, drawn from `rng`.
pub fn gaussian_orthogonal_random_matrix_with(
    nb_rows: usize,
    nb_columns: usize,
    scaling: OrthoScaling,
    rng: &mut Generator,
) -> Result<Array2<f32>> {
    if nb_columns == 0 {
        return Err(Error::invalid(
            "gaussian_orthogonal_random_matrix",
            "nb_columns",
            0,
            "must be positive",
        ));
    }
    let mut out = Array2::<f32>::zeros((nb_rows, nb_columns));
    let mut row = 0;
    while row < nb_rows {
        let block = orthogonal_block(nb_columns, rng)?;
        let take = (nb_rows - row).min(nb_columns);
        out.slice_mut(s![row..row + take, ..])
            .assign(&block.slice(s![..take, ..]));
        row += take;
    }
    let multiplier: Vec<f32> = match scaling {
        OrthoScaling::Gaussian => (0..nb_rows)
            .map(|_| {
                (0..nb_columns)
                    .map(|_| (rng.normal() as f64).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .collect(),
        OrthoScaling::Fixed => vec![(nb_columns as f32).sqrt(); nb_rows],
    };
    for (mut r, m) in out.rows_mut().into_iter().zip(multiplier) {
        r.mapv_inplace(|v| v * m);
    }
    Ok(out)
}

/// [`gaussian_orthogonal_random_matrix_with`] drawing from the thread's global generator
/// (seed it with [`performer_tensor::rng::manual_seed`] for reproducible features).
pub fn gaussian_orthogonal_random_matrix(
    nb_rows: usize,
    nb_columns: usize,
    scaling: OrthoScaling,
) -> Result<Array2<f32>> {
    performer_tensor::rng::with_rng(|g| {
        gaussian_orthogonal_random_matrix_with(nb_rows, nb_columns, scaling, g)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_orthogonal_and_rows_scaled() {
        let mut g = Generator::seeded(1);
        let m = gaussian_orthogonal_random_matrix_with(20, 8, OrthoScaling::Fixed, &mut g).unwrap();
        assert_eq!(m.dim(), (20, 8));
        for r in m.rows() {
            let n: f32 = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 8f32.sqrt()).abs() < 1e-4);
        }
        // rows within one block are orthogonal
        for (a, b) in [(0, 1), (3, 7), (8, 15), (16, 19)] {
            let dot: f32 = m.row(a).iter().zip(m.row(b)).map(|(x, y)| x * y).sum();
            assert!(dot.abs() < 1e-4, "rows {a} and {b}: {dot}");
        }
        // rows of different blocks are not (almost surely)
        let dot: f32 = m.row(0).iter().zip(m.row(8)).map(|(x, y)| x * y).sum();
        assert!(dot.abs() > 1e-3);
    }

    #[test]
    fn gaussian_scaling_has_chi_norms() {
        let mut g = Generator::seeded(2);
        let d = 16;
        let m = gaussian_orthogonal_random_matrix_with(4000, d, OrthoScaling::Gaussian, &mut g)
            .unwrap();
        // E[|x|^2] = d for a standard Gaussian vector
        let mean_sq: f64 = m
            .rows()
            .into_iter()
            .map(|r| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>())
            .sum::<f64>()
            / 4000.0;
        assert!((mean_sq - d as f64).abs() < 0.5, "{mean_sq}");
    }

    #[test]
    fn seeded_draws_repeat() {
        let a = gaussian_orthogonal_random_matrix_with(
            10,
            4,
            OrthoScaling::Gaussian,
            &mut Generator::seeded(5),
        )
        .unwrap();
        let b = gaussian_orthogonal_random_matrix_with(
            10,
            4,
            OrthoScaling::Gaussian,
            &mut Generator::seeded(5),
        )
        .unwrap();
        assert_eq!(a, b);
        assert!(OrthoScaling::from_code(2).is_err());
    }
}
