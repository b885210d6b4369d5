//! A module's train/eval mode, as the models read it.

use performer_tensor::{Entry, Module, Visitor};

/// Whether a module is in training mode (the first train/eval flag found; true if none).
pub fn is_training(m: &dyn Module) -> bool {
    let mut found = None;
    let mut f = |_: &str, e: Entry<'_>| {
        if let Entry::Training(t) = e
            && found.is_none()
        {
            found = Some(t.get());
        }
    };
    m.visit(&mut Visitor::new(&mut f));
    found.unwrap_or(true)
}
