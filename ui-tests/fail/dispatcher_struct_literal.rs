// expected: of struct `Dispatcher` are private
// Building a ready `Dispatcher` by struct literal, skipping the builder.
use tool_dispatch::{Dispatcher, NoSink, NoUser};

fn forge(d: Dispatcher<NoSink, NoUser>) -> Dispatcher<NoSink, NoUser> {
    Dispatcher {
        sink: NoSink,
        user: NoUser,
        ..d
    }
}

fn main() {
    let _ = forge;
}
