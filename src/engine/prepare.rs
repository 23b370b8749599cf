//! The synchronous half of a call: where it enters (by name, typed), its id, and the
//! checks that come before anything waits (shutting down, unknown tool, duplicate id,
//! size, depth, the tool's input type). What they refuse ends in
//! [`InFlight::refuse`](super::in_flight::InFlight).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use super::Inner;
use super::codec::{Json, Typed};
use super::in_flight::{
    Admission, Args, InFlight, MAX_NAME_SHOWN, Occurrence, Prepared, Refusal, Start,
};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::call::{Arguments, ToolCall, ToolOutput};
use crate::contain::{contained, panic_message};
use crate::delivery::Outbox;
use crate::error::DispatchError;
use crate::json::{self, cut, drop_deep, exceeds_depth};
use crate::registry::{Entry, InputError};
use crate::state::WithUser;
use crate::tool::{Tool, ToolContext, ToolError};
use crate::user::MAX_ID_LEN;

/// A tool's body, boxed: one small allocation instead of its state copied through
/// every step of the call's future.
type Body<'a, T> = futures_util::future::BoxFuture<'a, Result<T, ToolError>>;

impl Inner {
    /// Dispatch by name with JSON arguments.
    ///
    /// The call starts here, not at the first poll: it is counted in flight at once,
    /// and dropping the future unpolled completes its pair as `cancelled`. (These are
    /// plain functions returning a future, so that a caller's future holds the call's
    /// state once rather than once per layer.)
    pub(crate) fn dispatch_json<'a>(
        self: &'a Arc<Self>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        call: ToolCall,
        occurrence: Occurrence,
    ) -> impl Future<Output = Result<ToolOutput, DispatchError>> + Send + 'a {
        let entry = self.registry.get(&call.name).map(|e| &**e);
        let (start, arguments) = Start::json(entry, call, occurrence, Admission::CALL);
        self.run_json(outbox, user, start, arguments)
    }

    /// A call by name of `entry` (a registered tool, `None` for an unknown name, or
    /// the health probe's).
    pub(super) fn run_json<'a>(
        self: &'a Arc<Self>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        start: Start<'a>,
        arguments: Arguments,
    ) -> impl Future<Output = Result<ToolOutput, DispatchError>> + Send + 'a {
        let mut c = InFlight::new(self, outbox, user, start);
        let span = c.span.clone();
        async move {
            let p = match c.prepare_json(arguments) {
                Ok(p) => p,
                Err(r) => return Err(Box::pin(c.refuse(r)).await),
            };
            c.execute::<Json, _>(p).await
        }
        .instrument(span)
    }

    /// Typed dispatch: no JSON round trip for the input.
    pub(crate) fn dispatch_typed<'a, T: Tool>(
        self: &'a Arc<Self>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        input: T::Input,
        id: Option<String>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<ToolOutput<T::Output>, DispatchError>> + Send + 'a {
        let found = self.registry.typed::<T>();
        let start = Start {
            occurrence: Occurrence::First,
            entry: found.map(|(e, _)| &**e),
            tool: found.map_or_else(|| Arc::from(T::NAME), |(e, _)| Arc::clone(&e.name)),
            id,
            timeout,
            admission: Admission::CALL,
        };
        let mut c = InFlight::new(self, outbox, user, start);
        let span = c.span.clone();
        async move {
            let p = match c.prepare_typed(found.map(|(_, t)| t), input) {
                Ok(p) => p,
                Err(r) => return Err(Box::pin(c.refuse(r)).await),
            };
            c.execute::<Typed<T::Output>, _>(p).await
        }
        .instrument(span)
    }

    pub(super) fn call_id(&self, given: Option<String>) -> (Arc<str>, Option<Arc<str>>) {
        match given {
            Some(id) if !id.trim().is_empty() && id.len() <= MAX_ID_LEN => {
                let id: Arc<str> = Arc::from(id);
                (Arc::clone(&id), Some(id))
            }
            _ => (self.generated_id(), None),
        }
    }

    /// `call_{prefix:08x}{n:x}` without the formatting machinery (it is on every call).
    pub(super) fn generated_id(&self) -> Arc<str> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let (prefix, n) = (self.id_prefix, self.next_id.fetch_add(1, Relaxed));
        let mut buf = [0u8; 5 + 8 + 16];
        buf[..5].copy_from_slice(b"call_");
        for (i, b) in buf[5..13].iter_mut().enumerate() {
            *b = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
        }
        let digits = (64 - n.leading_zeros() as usize).div_ceil(4).max(1);
        for (i, b) in buf[13..13 + digits].iter_mut().enumerate() {
            *b = HEX[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
        }
        match std::str::from_utf8(&buf[..13 + digits]) {
            Ok(s) => Arc::from(s),
            Err(_) => Arc::from(format!("call_{prefix:08x}{n:x}")), // unreachable: ASCII
        }
    }
}

impl<'a> InFlight<'a> {
    /// Checks that come before anything waits; the same for every kind of call.
    pub(super) fn refusal(&self, shown: impl FnOnce() -> Value) -> Option<Refusal> {
        let error = if !self.inner.accepting.load(Relaxed) {
            DispatchError::Unavailable
        } else if self.entry.is_none() {
            DispatchError::UnknownTool {
                name: self.scope.tool_name.to_string(),
            }
        } else if let Some(id) = &self.duplicate {
            self.invalid(
                ".",
                format!("call id `{id}` is already used by a call in flight; ids must be unique"),
            )
        } else {
            return None;
        };
        Some(Refusal {
            error,
            shown: shown(),
        })
    }

    pub(super) fn prepare_json(
        &mut self,
        arguments: Arguments,
    ) -> Result<Prepared<'a, Body<'a, Value>>, Refusal> {
        let max_depth = self.inner.config.max_depth;
        let args = match arguments {
            Arguments::Value(v) if exceeds_depth(&v, max_depth) => {
                drop_deep(v);
                Args::TooDeep
            }
            Arguments::Value(v) => Args::Value(v),
            Arguments::Text(t) => Args::Text(t),
        };
        let max_bytes = self.inner.config.max_argument_bytes;
        if let Some(r) = self.refusal(|| shown(&args, max_bytes)) {
            return Err(r);
        }
        let too_deep = || format!("arguments are nested more than {max_depth} levels deep");
        let args = match args {
            Args::Value(v) => v,
            Args::TooDeep => return Err(self.refuse_input(too_deep(), hidden("nested too deep"))),
            Args::Text(t) if t.len() > max_bytes => {
                let msg = format!(
                    "arguments are {} bytes; at most {max_bytes} are accepted",
                    t.len()
                );
                return Err(self.refuse_input(msg, hidden_text(&t)));
            }
            Args::Text(t) => match serde_json::from_str::<Value>(&t) {
                Ok(v) if exceeds_depth(&v, max_depth) => {
                    drop_deep(v);
                    return Err(self.refuse_input(too_deep(), hidden_text(&t)));
                }
                Ok(v) => v,
                Err(e) => {
                    let msg = format!("arguments are not valid JSON: {e}");
                    return Err(self.refuse_input(msg, hidden_text(&t)));
                }
            },
        };
        let Some(entry) = self.entry else {
            unreachable!("refusal() returned None, so the tool is known")
        };
        let cx = self.context();
        // The tool's input type decides what its arguments mean: its `Deserialize`
        // is code we call, so a panic in it (or in a destructor it runs) costs this
        // call only.
        let invoked = catch_unwind(AssertUnwindSafe(|| entry.invoker.invoke(&args, cx)));
        match invoked {
            Ok(Ok(body)) => Ok(Prepared { entry, args, body }),
            Ok(Err(e)) => Err(Refusal {
                error: self.invalid_input(entry, &e),
                shown: args,
            }),
            Err(p) => {
                let detail = panic_message(&*p);
                contained(|| drop(p));
                tracing::error!(call_id = %self.scope.call_id, tool = %entry.name, panic = %detail, "reading the tool's input panicked");
                Err(Refusal {
                    error: DispatchError::Panicked {
                        tool: entry.name.to_string(),
                        detail,
                    },
                    shown: args,
                })
            }
        }
    }

    pub(super) fn prepare_typed<T: Tool>(
        &mut self,
        tool: Option<&'a T>,
        input: T::Input,
    ) -> Result<Prepared<'a, Body<'a, T::Output>>, Refusal> {
        // The events show the arguments: the one serialization a typed call pays for.
        let args = json::to_value(&input, self.inner.config.max_depth);
        let shown = || match &args {
            Ok(v) => v.clone(),
            Err(_) => hidden("not shown"),
        };
        if let Some(r) = self.refusal(shown) {
            contained(|| json::drop_any(input));
            return Err(r);
        }
        let args = match args {
            Ok(v) => v,
            Err(e) => {
                contained(|| json::drop_any(input));
                let msg = format!("the input cannot be shown as JSON: {}", e.0);
                return Err(self.refuse_input(msg, hidden("not shown")));
            }
        };
        let (Some(entry), Some(tool)) = (self.entry, tool) else {
            unreachable!("refusal() returned None, so the tool is known")
        };
        let cx = self.context();
        // Called when first polled, so nothing of the tool runs before the policy,
        // the limits and `tool_executing`, or outside panic isolation.
        let body: Body<'a, _> = Box::pin(async move { tool.call(input, cx).await });
        Ok(Prepared { entry, args, body })
    }

    pub(super) fn invalid(&self, path: &str, message: String) -> DispatchError {
        DispatchError::InvalidInput {
            tool: self.scope.tool_name.to_string(),
            path: path.to_owned(),
            message,
        }
    }

    pub(super) fn refuse_input(&self, message: String, shown: Value) -> Refusal {
        Refusal {
            error: self.invalid(".", message),
            shown,
        }
    }

    /// An input error without the offending value when it sits under a sensitive key.
    pub(super) fn invalid_input(&self, entry: &Entry, e: &InputError) -> DispatchError {
        let r = self.inner.redaction();
        let sensitive = e
            .keys
            .iter()
            .any(|k| r.is_sensitive(k, &entry.settings.sensitive));
        self.invalid(&cut(&e.path, MAX_NAME_SHOWN), e.safe_message(sensitive))
    }

    /// What the tool sees of this call.
    pub(super) fn context(&self) -> ToolContext {
        ToolContext {
            scope: Arc::clone(&self.scope),
        }
    }
}

/// Arguments as the events of a refused call show them: parsed, so redaction applies,
/// when they are JSON text of a bounded size.
pub(super) fn shown(args: &Args, max_bytes: usize) -> Value {
    match args {
        Args::Value(v) => v.clone(),
        Args::Text(t) if t.len() <= max_bytes => match serde_json::from_str::<Value>(t) {
            Ok(v) if !exceeds_depth(&v, json::DEFAULT_MAX_DEPTH) => v,
            Ok(v) => {
                drop_deep(v);
                hidden_text(t)
            }
            Err(_) => hidden_text(t),
        },
        Args::Text(t) => hidden_text(t),
        Args::TooDeep => hidden("nested too deep"),
    }
}

/// Arguments that cannot be redacted (not JSON, or too large to parse) are not
/// shown in events: a secret in them could not be found.
pub(super) fn hidden_text(t: &str) -> Value {
    Value::String(format!(
        "[{} bytes of unparsed arguments, not shown]",
        t.len()
    ))
}

pub(super) fn hidden(why: &str) -> Value {
    Value::String(format!("[arguments {why}]"))
}
