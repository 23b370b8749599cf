//! The [`Registry`]: name → typed tool, immutable once built.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::redact::normalize;
use crate::tool::{
    BlockingFnTool, CallScope, FnTool, SchemaTool, Tool, ToolContext, ToolError, ToolSettings,
};

/// Longest accepted tool name (the limit OpenAI and Anthropic put on function names).
pub const MAX_TOOL_NAME_LEN: usize = 64;

/// Why a registry could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Two tools share a name.
    #[error("two tools are named `{0}`; tool names must be unique")]
    DuplicateName(String),
    /// A name is empty, too long, or has characters outside `[A-Za-z0-9_-]`.
    #[error("tool name `{0}` is not 1–64 characters of [A-Za-z0-9_-]")]
    InvalidName(String),
}

/// A tool as the model sees it: name, description and JSON Schema of its input.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDefinition {
    /// The name.
    pub name: String,
    /// What the tool does.
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: Value,
}

/// Where invalid arguments were found and what serde said of them. serde's text may
/// quote the offending value: it leaves this module only through
/// [`safe_message`](InputError::safe_message).
#[derive(Debug)]
pub(crate) struct InputError {
    pub(crate) path: String,
    /// The object keys on the way to the offending value.
    pub(crate) keys: Vec<String>,
    message: String,
}

/// Longest invalid-input message passed on.
const MAX_INPUT_MESSAGE: usize = 256;

/// How serde names the kind of an unexpected value, before the value itself.
const UNEXPECTED_KINDS: &[&str] = &[
    "string",
    "integer",
    "floating point",
    "boolean",
    "character",
    "byte array",
    "unit value",
    "unit variant",
    "Option value",
    "newtype struct",
    "newtype variant",
    "tuple variant",
    "struct variant",
    "sequence",
    "map",
    "enum",
    "null",
];

impl InputError {
    /// What is wrong, without the offending value: serde's `invalid type: string
    /// "hunter2", expected u32` becomes `invalid type: string, expected u32`. Under a
    /// sensitive key, a message serde did not write (a custom `Deserialize`) is
    /// replaced whole, since it may say anything.
    pub(crate) fn safe_message(&self, sensitive: bool) -> String {
        let m = &self.message;
        for prefix in ["invalid type: ", "invalid value: "] {
            if let Some(rest) = m.strip_prefix(prefix)
                && let Some(i) = rest.rfind(", expected ")
            {
                let expected = crate::json::cut(&rest[i + 2..], MAX_INPUT_MESSAGE);
                return match UNEXPECTED_KINDS.iter().find(|k| rest.starts_with(**k)) {
                    Some(kind) => format!("{prefix}{kind}, {expected}"),
                    None => format!("{}, {expected}", prefix.trim_end_matches(": ")),
                };
            }
        }
        if let Some(rest) = m.strip_prefix("unknown variant ") {
            let expected = rest.rfind(", expected ").map(|i| &rest[i + 2..]);
            return match expected {
                Some(e) => format!(
                    "unknown variant, {}",
                    crate::json::cut(e, MAX_INPUT_MESSAGE)
                ),
                None => "unknown variant".to_owned(),
            };
        }
        let serdes_own = [
            "missing field ",
            "unknown field ",
            "duplicate field ",
            "invalid length ",
        ];
        if sensitive && !serdes_own.iter().any(|p| m.starts_with(p)) {
            return "invalid value".to_owned();
        }
        crate::json::cut(m, MAX_INPUT_MESSAGE)
    }
}

/// Deserializes from the borrowed value; only on failure runs again to find the path.
pub(crate) fn parse_input<I: DeserializeOwned>(v: &Value) -> Result<I, InputError> {
    I::deserialize(v).or_else(|first| match serde_path_to_error::deserialize::<_, I>(v) {
        Ok(i) => Ok(i),
        Err(e) => {
            let keys = e
                .path()
                .iter()
                // Every named segment counts, map keys and enum variants alike: a
                // value under `{"Password": ..}` is as secret as one under a key.
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                    _ => None,
                })
                .collect();
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            Err(if message.is_empty() {
                InputError {
                    path: ".".into(),
                    keys: Vec::new(),
                    message: first.to_string(),
                }
            } else {
                InputError {
                    path,
                    keys,
                    message,
                }
            })
        }
    })
}

/// A result as JSON for the by-name path, where the JSON is the caller's value: one
/// that cannot be made (nested too deep, a failing `Serialize`) is the call's error,
/// and is counted.
fn result_json<O: serde::Serialize + 'static>(
    out: O,
    scope: &CallScope,
) -> Result<Value, ToolError> {
    match crate::json::to_value(&out, scope.max_depth) {
        Ok(v) => Ok(v),
        Err(e) => {
            crate::json::drop_any(out); // it may be nested too deep to drop recursively
            scope.outbox.metrics().unserializable_result();
            Err(ToolError::new(format!(
                "the tool's result could not be converted to JSON: {}",
                e.0
            )))
        }
    }
}

/// The type-erased face of a tool: validate JSON arguments and start the body.
pub(crate) trait Invoke: Send + Sync + 'static {
    fn invoke(
        &self,
        args: &Value,
        cx: ToolContext,
    ) -> Result<BoxFuture<'_, Result<Value, ToolError>>, InputError>;
    fn as_any(&self) -> &dyn Any;
}

pub(crate) struct Typed<T>(pub(crate) T);

impl<T: Tool> Invoke for Typed<T> {
    fn invoke(
        &self,
        args: &Value,
        cx: ToolContext,
    ) -> Result<BoxFuture<'_, Result<Value, ToolError>>, InputError> {
        let input = parse_input::<T::Input>(args)?;
        let scope = Arc::clone(&cx.scope);
        Ok(Box::pin(async move {
            result_json(self.0.call(input, cx).await?, &scope)
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<F, Fut, I, O> Invoke for FnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
    I: DeserializeOwned + Send + 'static,
    O: serde::Serialize + Send + 'static,
{
    fn invoke(
        &self,
        args: &Value,
        cx: ToolContext,
    ) -> Result<BoxFuture<'_, Result<Value, ToolError>>, InputError> {
        let input = parse_input::<I>(args)?;
        let scope = Arc::clone(&cx.scope);
        // The closure is called when the body is first polled: after the policy, the
        // limits and `tool_executing`, and under the pipeline's panic isolation.
        Ok(Box::pin(async move {
            result_json((self.f)(input, cx).await?, &scope)
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<F, Fut> Invoke for SchemaTool<F>
where
    F: Fn(Value, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ToolError>> + Send + 'static,
{
    fn invoke(
        &self,
        args: &Value,
        cx: ToolContext,
    ) -> Result<BoxFuture<'_, Result<Value, ToolError>>, InputError> {
        if let Err(v) = crate::schema::check(&self.input_schema, args) {
            return Err(InputError {
                path: v.path,
                keys: v.keys,
                message: v.message,
            });
        }
        let args = args.clone();
        Ok(Box::pin(async move { (self.f)(args, cx).await }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl<F, I, O> Invoke for BlockingFnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Result<O, ToolError> + Send + Sync + 'static,
    I: DeserializeOwned + Send + 'static,
    O: serde::Serialize + Send + 'static,
{
    fn invoke(
        &self,
        args: &Value,
        cx: ToolContext,
    ) -> Result<BoxFuture<'_, Result<Value, ToolError>>, InputError> {
        let input = parse_input::<I>(args)?;
        let f = Arc::clone(&self.f);
        Ok(Box::pin(async move {
            let s = &cx.scope;
            let job = s
                .blocking
                .start(&s.call_id, &s.tool_name, &s.user.user_id, s.timeout);
            let scope = Arc::clone(s);
            let handle = tokio::task::spawn_blocking(move || {
                let _job = job; // stays registered until the body really returns
                f(input, cx).and_then(|o| result_json(o, &scope))
            });
            match handle.await {
                Ok(r) => r,
                // Re-raise so the pipeline's panic isolation reports `panicked`.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => Err(ToolError::new("the blocking task was cancelled")),
            }
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One registered tool.
pub(crate) struct Entry {
    pub(crate) name: Arc<str>,
    pub(crate) def: ToolDefinition,
    pub(crate) settings: ToolSettings,
    pub(crate) invoker: Box<dyn Invoke>,
    pub(crate) index: usize,
    pub(crate) limiter: Option<Semaphore>,
}

/// What a tool turns into when registered.
pub(crate) struct Parts {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) settings: ToolSettings,
    pub(crate) input_schema: Value,
    pub(crate) invoker: Box<dyn Invoke>,
}

impl Entry {
    /// The entry of a tool at `index` in its registry; `name` must be valid.
    pub(crate) fn new(parts: Parts, index: usize) -> Entry {
        let Parts {
            name,
            description,
            mut settings,
            input_schema,
            invoker,
        } = parts;
        settings.sensitive = settings.sensitive.iter().map(|k| normalize(k)).collect();
        let name: Arc<str> = Arc::from(name);
        Entry {
            limiter: settings.max_concurrency.map(Semaphore::new),
            def: ToolDefinition {
                name: name.to_string(),
                description,
                input_schema,
            },
            name,
            settings,
            invoker,
            index,
        }
    }
}

#[allow(unreachable_pub, private_interfaces)] // sealed: public in a private module on purpose
mod sealed {
    #[diagnostic::on_unimplemented(
        message = "`{Self}` is not a tool",
        label = "`IntoTool` is sealed",
        note = "implement `tool_dispatch::Tool` for it, or wrap a closure with `tool_fn` (or `schema_tool` for a schema that is data); `IntoTool` comes with it"
    )]
    pub trait Sealed {
        fn into_parts(self) -> super::Parts;
    }
}

/// Anything that can be added to a registry: a [`Tool`], a [`tool_fn`](crate::tool_fn)
/// or a [`blocking_fn`](crate::blocking_fn). Sealed: one blanket impl covers every
/// kind, and the sealed trait's message explains a type that is none of them.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a tool",
    label = "expected a `Tool`, a `tool_fn(..)`, a `blocking_fn(..)` or a `schema_tool(..)`",
    note = "implement `tool_dispatch::Tool` for it, or wrap a closure with `tool_fn` (or `schema_tool` for a schema that is data)"
)]
pub trait IntoTool: sealed::Sealed {}

impl<T: sealed::Sealed> IntoTool for T {}

/// The entry of `tool` at `index`, outside any registry (the engine's health probe).
pub(crate) fn entry_of(tool: impl IntoTool, index: usize) -> Entry {
    Entry::new(sealed::Sealed::into_parts(tool), index)
}

fn schema_of<I: schemars::JsonSchema>() -> Value {
    serde_json::to_value(schemars::schema_for!(I)).unwrap_or(Value::Null)
}

#[allow(private_interfaces)]
impl<T: Tool> sealed::Sealed for T {
    fn into_parts(self) -> Parts {
        Parts {
            name: T::NAME.to_owned(),
            description: self.description().to_owned(),
            settings: self.settings(),
            input_schema: schema_of::<T::Input>(),
            invoker: Box::new(Typed(self)),
        }
    }
}

#[allow(private_interfaces)]
impl<F, Fut, I, O> sealed::Sealed for FnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, ToolError>> + Send + 'static,
    I: DeserializeOwned + schemars::JsonSchema + Send + 'static,
    O: serde::Serialize + Send + 'static,
{
    fn into_parts(self) -> Parts {
        Parts {
            name: self.name.clone(),
            description: self.description.clone(),
            settings: self.settings.clone(),
            input_schema: schema_of::<I>(),
            invoker: Box::new(self),
        }
    }
}

#[allow(private_interfaces)]
impl<F, Fut> sealed::Sealed for SchemaTool<F>
where
    F: Fn(Value, ToolContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, ToolError>> + Send + 'static,
{
    fn into_parts(self) -> Parts {
        Parts {
            name: self.name.clone(),
            description: self.description.clone(),
            settings: self.settings.clone(),
            input_schema: self.input_schema.clone(),
            invoker: Box::new(self),
        }
    }
}

#[allow(private_interfaces)]
impl<F, I, O> sealed::Sealed for BlockingFnTool<F, I, O>
where
    F: Fn(I, ToolContext) -> Result<O, ToolError> + Send + Sync + 'static,
    I: DeserializeOwned + schemars::JsonSchema + Send + 'static,
    O: serde::Serialize + Send + 'static,
{
    fn into_parts(self) -> Parts {
        Parts {
            name: self.name.clone(),
            description: self.description.clone(),
            settings: self.settings.clone(),
            input_schema: schema_of::<I>(),
            invoker: Box::new(self),
        }
    }
}

/// FNV-1a over the tool name: the index is looked up on every call, and SipHash cost
/// more than the rest of the lookup. The map is frozen after build, so crafted names
/// can at worst collide with the few registered ones; there is no flooding to defend
/// against.
#[derive(Default)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

fn valid_name(name: &str) -> bool {
    (1..=MAX_TOOL_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tools an engine can run, by name. Immutable once built, so lookups take no
/// lock; an [`Engine`](crate::Engine) shares it with every request.
///
/// [`Registry::builder`] collects the tools; [`build`](RegistryBuilder::build) checks
/// their names and makes the `Registry`, which has no way to add a tool:
///
/// ```compile_fail
/// # use tool_dispatch::{tool_fn, Registry, ToolError};
/// let registry = Registry::builder().build()?;
/// let registry = registry.tool(tool_fn("late", "", |x: u8, _| async move { Ok::<_, ToolError>(x) }));
/// # Ok::<(), tool_dispatch::RegistryError>(())
/// ```
pub struct Registry {
    entries: Vec<Arc<Entry>>,
    index: HashMap<Arc<str>, usize, BuildHasherDefault<NameHasher>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "tools",
                &self.entries.iter().map(|e| &*e.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Collects tools for a [`Registry`]; see [`Registry::builder`].
#[must_use = "a registry builder does nothing until `.build()` is called"]
pub struct RegistryBuilder {
    registry: Registry,
    problems: Vec<RegistryError>,
}

impl std::fmt::Debug for RegistryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RegistryBuilder")
            .field(&self.registry)
            .finish()
    }
}

impl Registry {
    /// Starts an empty registry.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder {
            registry: Registry {
                entries: Vec::new(),
                index: HashMap::default(),
            },
            problems: Vec::new(),
        }
    }
}

impl RegistryBuilder {
    /// Adds a tool: a [`Tool`], a [`tool_fn`](crate::tool_fn) or a
    /// [`blocking_fn`](crate::blocking_fn).
    pub fn tool(mut self, tool: impl IntoTool) -> Self {
        let parts = sealed::Sealed::into_parts(tool);
        if !valid_name(&parts.name) {
            let shown = parts.name.chars().take(80).collect();
            self.problems.push(RegistryError::InvalidName(shown));
            return self;
        }
        let r = &mut self.registry;
        if r.index.contains_key(parts.name.as_str()) {
            self.problems.push(RegistryError::DuplicateName(parts.name));
            return self;
        }
        let entry = Entry::new(parts, r.entries.len());
        r.index.insert(entry.name.clone(), entry.index);
        r.entries.push(Arc::new(entry));
        self
    }

    /// Checks the names (valid, unique) and makes the registry; the first problem
    /// found is the error.
    pub fn build(self) -> Result<Registry, RegistryError> {
        match self.problems.into_iter().next() {
            Some(p) => Err(p),
            None => Ok(self.registry),
        }
    }
}

impl Registry {
    /// How many tools there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tool names, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| &*e.name)
    }

    /// Name, description and input JSON Schema of every tool, in registration order.
    pub fn definitions(&self) -> impl Iterator<Item = &ToolDefinition> {
        self.entries.iter().map(|e| &e.def)
    }

    /// One tool's definition.
    pub fn definition(&self, name: &str) -> Option<&ToolDefinition> {
        self.get(name).map(|e| &e.def)
    }

    /// One tool's settings.
    pub fn settings(&self, name: &str) -> Option<&ToolSettings> {
        self.get(name).map(|e| &e.settings)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// The entry for tool type `T`, if it was registered as a `Tool`.
    pub(crate) fn typed<T: Tool>(&self) -> Option<(&Arc<Entry>, &T)> {
        let entry = self.get(T::NAME)?;
        let typed = entry.invoker.as_any().downcast_ref::<Typed<T>>()?;
        Some((entry, &typed.0))
    }
}
