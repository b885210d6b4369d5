//! Activation functions, with the exact forms PyTorch uses (GELU in its erf form, softplus
//! with beta 1 and threshold 20, ELU with alpha 1, leaky ReLU with a chosen slope).

use super::elementwise::{UnaryKernels, unary, unary_vectorized};
use crate::Tensor;

pub(crate) use crate::fast_math::{gelu as gelu_scalar, gelu_grad as gelu_grad_scalar};

/// The logistic function, stable for large |x|.
pub(crate) fn sigmoid_scalar(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log(1 + e^x)` with PyTorch's linear cut-off above 20.
pub(crate) fn softplus_scalar(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

impl Tensor {
    /// `max(x, 0)`.
    pub fn relu(&self) -> Tensor {
        unary(
            self,
            "relu",
            |x| x.max(0.0),
            |x, _| if x > 0.0 { 1.0 } else { 0.0 },
        )
    }

    /// GELU, erf form (as `torch.nn.GELU()`).
    pub fn gelu(&self) -> Tensor {
        unary_vectorized(
            self,
            "gelu",
            UnaryKernels {
                forward: crate::fast_math::gelu_into,
                backward: crate::fast_math::gelu_backward_into,
                f: gelu_scalar,
                df: gelu_grad_scalar,
            },
        )
    }

    /// ELU with alpha 1.
    pub fn elu(&self) -> Tensor {
        unary(
            self,
            "elu",
            |x| if x > 0.0 { x } else { x.exp_m1() },
            |x, y| if x > 0.0 { 1.0 } else { y + 1.0 },
        )
    }

    /// Softplus with beta 1 and threshold 20 (as `torch.nn.Softplus()`).
    pub fn softplus(&self) -> Tensor {
        unary(self, "softplus", softplus_scalar, |x, _| {
            if x > 20.0 { 1.0 } else { sigmoid_scalar(x) }
        })
    }

    /// The logistic sigmoid.
    pub fn sigmoid(&self) -> Tensor {
        unary(self, "sigmoid", sigmoid_scalar, |_, y| y * (1.0 - y))
    }

    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Tensor {
        unary(self, "tanh", f32::tanh, |_, y| 1.0 - y * y)
    }

    /// SiLU (swish): `x * sigmoid(x)`.
    pub fn silu(&self) -> Tensor {
        unary(
            self,
            "silu",
            |x| x * sigmoid_scalar(x),
            |x, _| {
                let s = sigmoid_scalar(x);
                s * (1.0 + x * (1.0 - s))
            },
        )
    }

    /// Leaky ReLU with the given negative slope (PyTorch's default is 0.01).
    pub fn leaky_relu(&self, negative_slope: f32) -> Tensor {
        on_device!(crate::cuda::ops::unary_with(
            self,
            "leaky_relu",
            performer_cuda::tensor_ops::Unary::LeakyRelu(negative_slope)
        ));
        unary(
            self,
            "leaky_relu",
            move |x| if x > 0.0 { x } else { negative_slope * x },
            move |x, _| if x > 0.0 { 1.0 } else { negative_slope },
        )
    }
}

/// An element-wise activation by name, for layers and kernels configured at run time
/// (performer-pytorch's `kernel_fn`, the feed-forward activation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// GELU, erf form.
    Gelu,
    /// ELU with alpha 1.
    Elu,
    /// Softplus with beta 1, threshold 20.
    Softplus,
    /// Logistic sigmoid.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// `x * sigmoid(x)`.
    Silu,
    /// Leaky ReLU with the given negative slope.
    LeakyRelu(f32),
}

impl Activation {
    /// Parses PyTorch's module names in snake case (`relu`, `gelu`, `elu`, `softplus`,
    /// `sigmoid`, `tanh`, `silu`, `leaky_relu` with slope 0.01).
    pub fn from_name(name: &str) -> crate::Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "elu" => Activation::Elu,
            "softplus" => Activation::Softplus,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "silu" | "swish" => Activation::Silu,
            "leaky_relu" | "leakyrelu" => Activation::LeakyRelu(0.01),
            other => {
                return Err(crate::Error::invalid(
                    "Activation::from_name",
                    "name",
                    other,
                    "expected one of relu, gelu, elu, softplus, sigmoid, tanh, silu, leaky_relu",
                ));
            }
        })
    }

    /// The name `from_name` accepts.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
            Activation::Elu => "elu",
            Activation::Softplus => "softplus",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Silu => "silu",
            Activation::LeakyRelu(_) => "leaky_relu",
        }
    }

    /// The function at one point.
    #[inline]
    pub fn f(&self, x: f32) -> f32 {
        match *self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => gelu_scalar(x),
            Activation::Elu => {
                if x > 0.0 {
                    x
                } else {
                    x.exp_m1()
                }
            }
            Activation::Softplus => softplus_scalar(x),
            Activation::Sigmoid => sigmoid_scalar(x),
            Activation::Tanh => x.tanh(),
            Activation::Silu => x * sigmoid_scalar(x),
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    s * x
                }
            }
        }
    }

    /// Its derivative at one point.
    #[inline]
    pub fn df(&self, x: f32) -> f32 {
        match *self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Gelu => gelu_grad_scalar(x),
            Activation::Elu => {
                if x > 0.0 {
                    1.0
                } else {
                    x.exp()
                }
            }
            Activation::Softplus => {
                if x > 20.0 {
                    1.0
                } else {
                    sigmoid_scalar(x)
                }
            }
            Activation::Sigmoid => {
                let s = sigmoid_scalar(x);
                s * (1.0 - s)
            }
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Activation::Silu => {
                let s = sigmoid_scalar(x);
                s * (1.0 + x * (1.0 - s))
            }
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s
                }
            }
        }
    }

    /// Applies it to every element of a slice in place (no gradients; GELU vectorized).
    pub fn apply_inplace(&self, xs: &mut [f32]) {
        match *self {
            Activation::Gelu => crate::fast_math::gelu_inplace(xs),
            act => xs.iter_mut().for_each(|x| *x = act.f(*x)),
        }
    }

    /// Applies it to a tensor (differentiable).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match *self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu(),
            Activation::Elu => x.elu(),
            Activation::Softplus => x.softplus(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Tanh => x.tanh(),
            Activation::Silu => x.silu(),
            Activation::LeakyRelu(s) => x.leaky_relu(s),
        }
    }
}
