//! The macro that declares [`PerformerConfig`](super::PerformerConfig) and
//! [`PerformerLMConfig`](super::PerformerLMConfig) from one table (`fields.rs`): every field,
//! its documentation and its default are written once, and the structs, their `Default`, their
//! JSON form and `PerformerLMConfig::performer` all come from that row.
//!
//! The JSON form is performer-pytorch's keyword arguments: unknown keys are refused, a key marked
//! `[required]` (a positional argument in Python) must be given, and any other key may be left
//! out, taking the default of its row. A key given as `null` is `None` for an `Option` field, not
//! "absent": the default of `feature_redraw_interval` is `Some(1000)`, and `null` turns redraws
//! off, as `None` does in Python.

use serde::{Deserialize, Deserializer};

/// Deserializes a key that is present, `null` included, as `Some`; with `#[serde(default)]` an
/// absent key stays `None`. (A plain `Option<Option<T>>` reads `null` as absent.)
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `true` for a row marked `[required]`.
macro_rules! is_required {
    () => {
        false
    };
    (required) => {
        true
    };
}
pub(super) use is_required;

/// The value of one field from its given key or its row's default: a missing key of a
/// `[required]` row is serde's "missing field" error.
macro_rules! field_or_default {
    ($given:expr, $default:expr, $name:ident, $($req:ident)?) => {
        match $given {
            Some(v) => v,
            None if $crate::config::table::is_required!($($req)?) => {
                return Err(<D::Error as serde::de::Error>::missing_field(stringify!($name)));
            }
            None => $default,
        }
    };
}
pub(super) use field_or_default;

/// Declares the two configurations from groups of rows `name: type = default`, each row with
/// its doc comment and an optional `[required]` mark:
/// - `shared`: fields of both, with two defaults (Performer's, PerformerLM's), copied from the
///   LM's configuration into the stack's by `PerformerLMConfig::performer`;
/// - `performer_only`: fields of the stack alone, with the expression `performer` builds each
///   from the LM's configuration (`from_lm(lm) = ...`);
/// - `lm_only`: fields of the LM alone.
macro_rules! performer_configs {
    (
        $(#[$perf_meta:meta])*
        pub struct $perf:ident;
        $(#[$lm_meta:meta])*
        pub struct $lm:ident;
        shared {
            $(
                $(#[$s_doc:meta])*
                $([$s_req:ident])? $s_name:ident: $s_ty:ty = $s_perf:expr, $s_lm:expr;
            )*
        }
        performer_only {
            $(
                $(#[$p_doc:meta])*
                $([$p_req:ident])? $p_name:ident: $p_ty:ty = $p_default:expr,
                from_lm($from_var:ident) = $p_from:expr;
            )*
        }
        lm_only {
            $(
                $(#[$l_doc:meta])*
                $([$l_req:ident])? $l_name:ident: $l_ty:ty = $l_default:expr;
            )*
        }
    ) => {
        $(#[$perf_meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize)]
        pub struct $perf {
            $($(#[$s_doc])* pub $s_name: $s_ty,)*
            $($(#[$p_doc])* pub $p_name: $p_ty,)*
        }

        $(#[$lm_meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize)]
        pub struct $lm {
            $($(#[$l_doc])* pub $l_name: $l_ty,)*
            $($(#[$s_doc])* pub $s_name: $s_ty,)*
        }

        impl Default for $perf {
            fn default() -> Self {
                $perf {
                    $($s_name: $s_perf,)*
                    $($p_name: $p_default,)*
                }
            }
        }

        impl Default for $lm {
            fn default() -> Self {
                $lm {
                    $($l_name: $l_default,)*
                    $($s_name: $s_lm,)*
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $perf {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Given {
                    $(
                        #[serde(default, deserialize_with = "crate::config::table::present")]
                        $s_name: Option<$s_ty>,
                    )*
                    $(
                        #[serde(default, deserialize_with = "crate::config::table::present")]
                        $p_name: Option<$p_ty>,
                    )*
                }
                let given = Given::deserialize(d)?;
                Ok($perf {
                    $($s_name: $crate::config::table::field_or_default!(
                        given.$s_name, $s_perf, $s_name, $($s_req)?
                    ),)*
                    $($p_name: $crate::config::table::field_or_default!(
                        given.$p_name, $p_default, $p_name, $($p_req)?
                    ),)*
                })
            }
        }

        impl<'de> serde::Deserialize<'de> for $lm {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Given {
                    $(
                        #[serde(default, deserialize_with = "crate::config::table::present")]
                        $l_name: Option<$l_ty>,
                    )*
                    $(
                        #[serde(default, deserialize_with = "crate::config::table::present")]
                        $s_name: Option<$s_ty>,
                    )*
                }
                let given = Given::deserialize(d)?;
                Ok($lm {
                    $($l_name: $crate::config::table::field_or_default!(
                        given.$l_name, $l_default, $l_name, $($l_req)?
                    ),)*
                    $($s_name: $crate::config::table::field_or_default!(
                        given.$s_name, $s_lm, $s_name, $($s_req)?
                    ),)*
                })
            }
        }

        impl $lm {
            /// The inner Performer's configuration: every shared field as given here.
            pub fn performer(&self) -> $perf {
                $perf {
                    $($s_name: Clone::clone(&self.$s_name),)*
                    $($p_name: {
                        let $from_var = self;
                        $p_from
                    },)*
                }
            }
        }
    };
}
pub(super) use performer_configs;
