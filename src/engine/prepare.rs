//! The synchronous half of a call: where it enters (by name, typed), its id, and the
//! checks that come before anything waits (shutting down, unknown tool, duplicate id,
//! size, depth, the tool's input type). What they refuse ends in
//! [`InFlight::refuse`](super::pipeline::InFlight).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::Instrument;

use super::Inner;
use super::codec::{Json, Typed};
use super::pipeline::{Admission, InFlight, Phase};
use crate::call::{Arguments, ToolCall, ToolOutput};
use crate::delivery::Outbox;
use crate::error::DispatchError;
use crate::event::Timestamp;
use crate::json::{self, cut, drop_deep, exceeds_depth};
use crate::registry::{Entry, InputError};
use crate::state::WithUser;
use crate::tool::{CallScope, Tool, ToolContext, ToolError};
use crate::user::MAX_ID_LEN;

/// Longest unknown tool name repeated in events and errors.
pub(super) const MAX_NAME_SHOWN: usize = 128;

/// A call that passed the synchronous checks: its tool, its arguments as the policy
/// and the events see them, and its body (not started).
pub(super) struct Prepared<'a, F> {
    pub(super) entry: &'a Entry,
    pub(super) args: Value,
    pub(super) body: F,
}

/// A call refused before it runs: the error, and the arguments its events show.
pub(super) struct Refusal {
    pub(super) error: DispatchError,
    pub(super) shown: Value,
}

/// Arguments after the depth check (a value too deep is already torn down).
pub(super) enum Args {
    Value(Value),
    Text(String),
    TooDeep,
}

/// What a call is started with.
pub(super) struct Start<'a> {
    pub(super) occurrence: Occurrence,
    pub(super) entry: Option<&'a Entry>,
    pub(super) tool: Arc<str>,
    pub(super) id: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) admission: Admission,
}

/// Whether a call's id appeared before in the same batch. A batch's calls run
/// concurrently, but one may end before the next starts; a repeated id is refused
/// whatever the timing, so the front end never sees two calls under one id.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Occurrence {
    /// The id's first use.
    First,
    /// The id was used by an earlier call of the same batch.
    Repeat,
}

impl<'a> Start<'a> {
    /// How a call by name of `entry` starts (`None`: no tool has its name), and its
    /// arguments.
    pub(super) fn json(
        entry: Option<&'a Entry>,
        call: ToolCall,
        occurrence: Occurrence,
        admission: Admission,
    ) -> (Self, Arguments) {
        let ToolCall {
            id,
            name,
            arguments,
            timeout,
        } = call;
        let tool = match entry {
            Some(e) => Arc::clone(&e.name),
            None => Arc::from(name.chars().take(MAX_NAME_SHOWN).collect::<String>()),
        };
        let start = Start {
            occurrence,
            entry,
            tool,
            id,
            timeout,
            admission,
        };
        (start, arguments)
    }
}

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
    pub(super) fn new(
        inner: &'a Arc<Inner>,
        outbox: &'a Arc<Outbox>,
        user: &'a WithUser,
        start: Start<'a>,
    ) -> Self {
        inner.metrics.start();
        user.state.active.fetch_add(1, Relaxed);
        let (mut id, given) = inner.call_id(start.id);
        let (mut claimed, mut duplicate) = (false, None);
        if let Some(given) = given {
            if start.occurrence == Occurrence::First && user.state.claim_id(&given) {
                claimed = true;
            } else {
                duplicate = Some(cut(&given, 64));
                id = inner.generated_id();
            }
        }
        let timeout = start
            .timeout
            .or(start.entry.and_then(|e| e.settings.timeout))
            .unwrap_or(inner.config.default_timeout);
        let now = Instant::now();
        let span = if start.admission.counted {
            tracing::info_span!(
                "execute_tool",
                gen_ai.operation.name = "execute_tool",
                gen_ai.tool.name = &*start.tool,
                gen_ai.tool.call.id = &*id,
                user_id = &*user.ctx.user_id,
                status = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let (cancel, user_cancel) = match &user.ctx.run_id {
            Some(run) => {
                let (run_token, user_token) = user.state.run_tokens(run);
                (run_token, Some(user_token))
            }
            None => (user.state.token(), None),
        };
        let scope = Arc::new(CallScope {
            user: Arc::clone(&user.ctx),
            outbox: Arc::clone(outbox),
            call_id: id,
            tool_name: start.tool,
            cancel,
            user_cancel,
            timeout,
            max_text: inner.max_text(),
            max_depth: inner.config.max_depth,
            gate: Default::default(),
        });
        InFlight {
            inner,
            outbox,
            user,
            duplicate,
            claimed,
            entry: start.entry,
            admission: start.admission,
            start: now,
            timeout,
            deadline: crate::time::deadline(now, timeout),
            wall: Timestamp::now(),
            phase: Phase::Fresh,
            waited: false,
            opening_queued: false,
            approval: None,
            scope,
            span,
        }
    }

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
    ) -> Result<Prepared<'a, futures_util::future::BoxFuture<'a, Result<Value, ToolError>>>, Refusal>
    {
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
        match entry.invoker.invoke(&args, cx) {
            Ok(body) => Ok(Prepared { entry, args, body }),
            Err(e) => Err(Refusal {
                error: self.invalid_input(entry, &e),
                shown: args,
            }),
        }
    }

    pub(super) fn prepare_typed<T: Tool>(
        &mut self,
        tool: Option<&'a T>,
        input: T::Input,
    ) -> Result<Prepared<'a, impl Future<Output = Result<T::Output, ToolError>> + Send + 'a>, Refusal>
    {
        // The events show the arguments: the one serialization a typed call pays for.
        let args = json::to_value(&input, self.inner.config.max_depth);
        let shown = || match &args {
            Ok(v) => v.clone(),
            Err(_) => hidden("not shown"),
        };
        if let Some(r) = self.refusal(shown) {
            json::drop_any(input);
            return Err(r);
        }
        let args = match args {
            Ok(v) => v,
            Err(e) => {
                json::drop_any(input);
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
        let body = async move { tool.call(input, cx).await };
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
