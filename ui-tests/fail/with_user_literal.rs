// expected: of struct `WithUser` are private
// Forging the `WithUser` state by hand.
use tool_dispatch::WithUser;

fn forge(u: WithUser) -> WithUser {
    WithUser { ..u }
}

fn main() {
    let _ = forge;
}
