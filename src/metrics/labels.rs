//! Calls counted per value of the application's user label (feature `prometheus`,
//! opt-in): the application maps each call's user to a value it bounds itself (a
//! tenant, a plan, the ids of a few known users). Still bounded here: at most
//! [`MAX_VALUES`] values of at most [`MAX_LEN`] bytes; the calls of any other value
//! count under [`OTHER`].

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{PoisonError, RwLock};

use super::STATUSES;
use crate::event::Status;
use crate::user::UserContext;

/// Distinct values counted; past them, calls count under [`OTHER`].
pub(crate) const MAX_VALUES: usize = 1000;
/// Longest value counted as itself.
pub(crate) const MAX_LEN: usize = 128;
/// The value of calls whose value is empty, too long, one too many, or whose hook
/// panicked (OpenTelemetry's name for "another value").
pub(crate) const OTHER: &str = "_OTHER";

/// Maps a call's user to its label value; `None` leaves the call out of the family.
pub(crate) type Hook = dyn for<'a> Fn(&'a UserContext) -> Option<&'a str> + Send + Sync;

/// One value's counters: a row per tool (and one for calls of no tool), a counter per
/// status.
type Rows = Box<[[AtomicU64; STATUSES]]>;

pub(crate) struct UserLabels {
    pub(crate) name: String,
    hook: Box<Hook>,
    rows: usize,
    values: RwLock<HashMap<Box<str>, Rows>>,
    other: Rows,
    hook_panicked: AtomicBool,
}

fn rows(n: usize) -> Rows {
    (0..n)
        .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
        .collect()
}

impl UserLabels {
    pub(crate) fn new(name: String, hook: Box<Hook>, rows: usize) -> Self {
        UserLabels {
            name,
            hook,
            rows,
            values: RwLock::default(),
            other: self::rows(rows),
            hook_panicked: AtomicBool::new(false),
        }
    }

    /// Counts one ended call of `user` in `row` (a tool's, or the last).
    pub(crate) fn record(&self, user: &UserContext, status: Status, row: usize) {
        let asked = catch_unwind(AssertUnwindSafe(|| (self.hook)(user))).map_err(drop);
        let value = match asked {
            Ok(None) => return,
            Ok(Some(v)) => v,
            Err(()) => {
                if !self.hook_panicked.swap(true, Relaxed) {
                    tracing::error!(label = %self.name, "the user label hook panicked; its calls count under {OTHER}");
                }
                OTHER
            }
        };
        let bump = |rows: &Rows| rows[row][status.index()].fetch_add(1, Relaxed);
        if value.is_empty() || value.len() > MAX_LEN {
            bump(&self.other);
            return;
        }
        {
            let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(rows) = values.get(value) {
                bump(rows);
                return;
            }
        }
        let mut values = self.values.write().unwrap_or_else(PoisonError::into_inner);
        let rows = self.rows;
        match values.get(value) {
            Some(r) => bump(r),
            None if values.len() >= MAX_VALUES => bump(&self.other),
            None => bump(
                values
                    .entry(value.into())
                    .or_insert_with(|| self::rows(rows)),
            ),
        };
    }

    /// Every value with its counts per row and status (rows in tool order, then the
    /// calls of no tool), [`OTHER`] last.
    pub(crate) fn read(&self) -> Vec<(String, Vec<[u64; STATUSES]>)> {
        let load = |rows: &Rows| -> Vec<[u64; STATUSES]> {
            rows.iter()
                .map(|r| std::array::from_fn(|i| r[i].load(Relaxed)))
                .collect()
        };
        let values = self.values.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, Vec<[u64; STATUSES]>)> = values
            .iter()
            .map(|(v, rows)| (v.to_string(), load(rows)))
            .collect();
        drop(values);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.push((OTHER.to_owned(), load(&self.other)));
        out
    }
}
