#![cfg_attr(not(feature = "fuel"), allow(dead_code))]
//! Mayfly patch: a budget for the text made from lists and maps while a template with
//! fuel is evaluated.
//!
//! Fuel is charged for a container's slots when the container is made, and for the text
//! of a container only after that text exists (`~`, the `string` and `pprint` filters) or
//! not at all (a filter argument converted to a string).  A container's text can be far
//! larger than what was paid for it: a lazily repeated list (`100000000 * [x]`), a lazy
//! concatenation, or a list holding the same large string many times costs a few slots,
//! and writing it out walks every item and copies every string.  While the outermost
//! evaluation of a fueled template runs, this module keeps a per-thread budget of text
//! bytes (the fuel left when it starts, at the fuel's price for serialized bytes); every
//! item and every string written while formatting a container takes from it.  Once it
//! runs out, formatting stops writing and stops walking items, and the fuel tracker fails
//! at the next instruction (or the evaluation fails at its end) with `OutOfFuel`: the
//! text made in the meantime is never seen.
use std::cell::Cell;

thread_local! {
    // Bytes of container text that may still be written, or `None` outside a fueled
    // evaluation (no limit, as upstream).
    static BUDGET: Cell<Option<u64>> = const { Cell::new(None) };
    // Set once the budget ran out during the current evaluation.
    static OVERRUN: Cell<bool> = const { Cell::new(false) };
}

/// The text one item of a container costs besides its own (a separator).
pub(crate) const ITEM_TEXT: usize = 2;

/// Takes `bytes` from the budget.  Returns `false` (and remembers the overrun) if the
/// budget cannot pay for them: the caller must then stop writing.
#[inline]
pub(crate) fn charge(bytes: usize) -> bool {
    BUDGET.with(|budget| match budget.get() {
        None => true,
        Some(left) => match left.checked_sub(bytes as u64) {
            Some(left) => {
                budget.set(Some(left));
                true
            }
            None => {
                budget.set(Some(0));
                OVERRUN.with(|o| o.set(true));
                false
            }
        },
    })
}

/// Whether the budget ran out during the current evaluation.
#[inline]
pub(crate) fn overrun() -> bool {
    OVERRUN.with(|o| o.get())
}

/// Keeps a budget for as long as it lives; only the outermost scope sets and clears it.
pub(crate) struct Scope {
    outermost: bool,
}

impl Scope {
    /// Opens a scope with `bytes` of budget, unless one is open already (a macro, an
    /// include or a block evaluated inside the render keeps the render's budget).
    pub(crate) fn enter(bytes: u64) -> Scope {
        let outermost = BUDGET.with(|budget| {
            if budget.get().is_none() {
                budget.set(Some(bytes));
                OVERRUN.with(|o| o.set(false));
                true
            } else {
                false
            }
        });
        Scope { outermost }
    }

    /// Whether this scope opened the budget.
    pub(crate) fn is_outermost(&self) -> bool {
        self.outermost
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.outermost {
            BUDGET.with(|budget| budget.set(None));
            OVERRUN.with(|o| o.set(false));
        }
    }
}
