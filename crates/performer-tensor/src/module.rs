//! The [`Module`] trait: a uniform way to visit a model's parameters, buffers and train/eval
//! flags by the dotted names performer-pytorch uses, so that state dicts move between the two.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::param::{Buffer, Param, StateValue};
use crate::{Error, Result};

/// Whether a module is in training mode (dropout active, projection redraw counting).
/// Modules start in training mode, as in PyTorch. Cheap to clone; clones share the flag.
#[derive(Clone, Debug)]
pub struct TrainingFlag(Arc<AtomicBool>);

impl Default for TrainingFlag {
    fn default() -> Self {
        TrainingFlag(Arc::new(AtomicBool::new(true)))
    }
}

impl TrainingFlag {
    /// Whether training mode is on.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the mode.
    pub fn set(&self, training: bool) {
        self.0.store(training, Ordering::Relaxed)
    }
}

/// What a [`Visitor`] is shown.
pub enum Entry<'a> {
    /// A trainable parameter.
    Param(&'a Param),
    /// A buffer (saved in state dicts, not trained).
    Buffer(&'a Buffer),
    /// A train/eval flag (not saved).
    Training(&'a TrainingFlag),
}

/// Walks a module tree, keeping track of the dotted path.
pub struct Visitor<'a> {
    path: String,
    f: &'a mut dyn FnMut(&str, Entry<'_>),
}

impl<'a> Visitor<'a> {
    /// A visitor calling `f` with each entry's full dotted name.
    pub fn new(f: &'a mut dyn FnMut(&str, Entry<'_>)) -> Self {
        Visitor {
            path: String::new(),
            f,
        }
    }

    fn full(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    /// Shows a parameter named `name` under the current path.
    pub fn param(&mut self, name: &str, p: &Param) {
        let full = self.full(name);
        (self.f)(&full, Entry::Param(p));
    }

    /// Shows a buffer.
    pub fn buffer(&mut self, name: &str, b: &Buffer) {
        let full = self.full(name);
        (self.f)(&full, Entry::Buffer(b));
    }

    /// Shows a train/eval flag.
    pub fn training(&mut self, flag: &TrainingFlag) {
        let path = self.path.clone();
        (self.f)(&path, Entry::Training(flag));
    }

    /// Visits a child module under `name`.
    pub fn child(&mut self, name: &str, m: &dyn Module) {
        let saved = std::mem::take(&mut self.path);
        self.path = if saved.is_empty() {
            name.to_string()
        } else {
            format!("{saved}.{name}")
        };
        m.visit(self);
        self.path = saved;
    }
}

/// A building block of a model.
pub trait Module: Send + Sync {
    /// Shows every parameter, buffer and training flag of this module and its children, in
    /// registration order, to `v` (children through [`Visitor::child`]).
    fn visit(&self, v: &mut Visitor<'_>);

    /// Parameters with their dotted names. A parameter shared by two children is listed once,
    /// under its first name (as PyTorch's `named_parameters`).
    fn named_parameters(&self) -> Vec<(String, Param)> {
        let mut out: Vec<(String, Param)> = Vec::new();
        let mut f = |name: &str, e: Entry<'_>| {
            if let Entry::Param(p) = e
                && !out.iter().any(|(_, q)| q.same_as(p))
            {
                out.push((name.to_string(), p.clone()));
            }
        };
        self.visit(&mut Visitor::new(&mut f));
        out
    }

    /// The parameters, without names.
    fn parameters(&self) -> Vec<Param> {
        self.named_parameters()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    /// Total number of trainable scalars.
    fn num_parameters(&self) -> usize {
        self.parameters().iter().map(Param::numel).sum()
    }

    /// Buffers with their dotted names.
    fn named_buffers(&self) -> Vec<(String, Buffer)> {
        let mut out = Vec::new();
        let mut f = |name: &str, e: Entry<'_>| {
            if let Entry::Buffer(b) = e {
                out.push((name.to_string(), b.clone()));
            }
        };
        self.visit(&mut Visitor::new(&mut f));
        out
    }

    /// Moves every parameter and float buffer to `device` ([`Param::to_device`],
    /// [`Buffer::to_device`]); stops at the first failure (out of device memory), leaving the
    /// entries visited so far moved.
    fn to_device(&self, device: crate::Device) -> Result<()> {
        let mut result = Ok(());
        let mut f = |_: &str, e: Entry<'_>| {
            if result.is_err() {
                return;
            }
            result = match e {
                Entry::Param(p) => p.to_device(device),
                Entry::Buffer(b) => b.to_device(device),
                Entry::Training(_) => Ok(()),
            };
        };
        self.visit(&mut Visitor::new(&mut f));
        result
    }

    /// Sets training (true) or evaluation (false) mode on the whole tree.
    fn set_training(&self, training: bool) {
        let mut f = |_: &str, e: Entry<'_>| {
            if let Entry::Training(t) = e {
                t.set(training);
            }
        };
        self.visit(&mut Visitor::new(&mut f));
    }

    /// Every parameter and buffer by name (shared parameters under each of their names, as
    /// PyTorch's `state_dict`).
    fn state_dict(&self) -> BTreeMap<String, StateValue> {
        let mut out = BTreeMap::new();
        let mut f = |name: &str, e: Entry<'_>| match e {
            Entry::Param(p) => {
                out.insert(name.to_string(), StateValue::F32(p.value()));
            }
            Entry::Buffer(b) => {
                out.insert(name.to_string(), b.get());
            }
            Entry::Training(_) => {}
        };
        self.visit(&mut Visitor::new(&mut f));
        out
    }

    /// Loads values by name. Every parameter and buffer must be present with its shape and
    /// kind; a key the module does not have is an error. Nothing is changed unless all keys
    /// check out.
    fn load_state_dict(&self, state: &BTreeMap<String, StateValue>) -> Result<()> {
        let mut targets: Vec<(String, Target)> = Vec::new();
        let mut f = |name: &str, e: Entry<'_>| match e {
            Entry::Param(p) => targets.push((name.to_string(), Target::Param(p.clone()))),
            Entry::Buffer(b) => targets.push((name.to_string(), Target::Buffer(b.clone()))),
            Entry::Training(_) => {}
        };
        self.visit(&mut Visitor::new(&mut f));
        let known: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
        let missing: Vec<&str> = known
            .iter()
            .copied()
            .filter(|n| !state.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::StateDict(format!(
                "missing keys: {}",
                missing.join(", ")
            )));
        }
        let unexpected: Vec<&str> = state
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::StateDict(format!(
                "unexpected keys: {}",
                unexpected.join(", ")
            )));
        }
        for (name, target) in &targets {
            let value = &state[name];
            let (shape, ok_kind) = match (target, value) {
                (Target::Param(p), StateValue::F32(_)) => (p.shape(), true),
                (Target::Param(p), StateValue::I64(_)) => (p.shape(), false),
                (Target::Buffer(b), v) => {
                    let cur = b.get();
                    let same = std::mem::discriminant(&cur) == std::mem::discriminant(v);
                    (cur.shape().to_vec(), same)
                }
            };
            if !ok_kind {
                return Err(Error::StateDict(format!("`{name}` has the wrong dtype")));
            }
            if shape != value.shape() {
                return Err(Error::StateDict(format!(
                    "`{name}` has shape {:?} in the file, {:?} in the model",
                    value.shape(),
                    shape
                )));
            }
        }
        for (name, target) in targets {
            match (target, &state[&name]) {
                (Target::Param(p), StateValue::F32(v)) => p.set(v.clone())?,
                (Target::Buffer(b), v) => b.set(v.clone())?,
                _ => return Err(Error::StateDict(format!("`{name}` has the wrong dtype"))),
            }
        }
        Ok(())
    }
}

/// A shared module is the module it shares (a wrapper holds its net in an `Arc` so that
/// several wrappers, or a Python object and a trainer, use the same weights).
impl<M: Module + ?Sized> Module for std::sync::Arc<M> {
    fn visit(&self, v: &mut Visitor<'_>) {
        (**self).visit(v);
    }
}

enum Target {
    Param(Param),
    Buffer(Buffer),
}
