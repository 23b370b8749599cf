// Twin of fail/impl_sealed_directly.rs: the public states come from the crate.
use tool_dispatch::{NoSink, NoUser};

fn main() {
    let names = format!("{NoSink:?} {NoUser:?}");
    assert_eq!(names, "NoSink NoUser");
}
