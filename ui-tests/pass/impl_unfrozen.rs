// Twin of fail/impl_unfrozen.rs: the marker is used as a bound, never implemented.
use tool_dispatch::state::Unfrozen;
use tool_dispatch::{Registry, ToolError, tool_fn};

fn with_echo<S: Unfrozen>(r: Registry<S>) -> Registry<S> {
    r.tool(tool_fn(
        "echo",
        "Echoes its input.",
        |s: String, _cx| async move { Ok::<_, ToolError>(s) },
    ))
}

fn main() {
    let registry = with_echo(Registry::builder()).build().unwrap();
    assert_eq!(registry.names().collect::<Vec<_>>(), ["echo"]);
}
