// expected: cannot be sent between threads safely
// A sink holding an `Rc` cannot be an `EventSink`: a sink must be `Send + Sync`.
use std::cell::RefCell;
use std::rc::Rc;
use tool_dispatch::TrySendError;
use tool_dispatch::{EventSink};
use tool_dispatch::event::{Event};

struct RcSink(Rc<RefCell<Vec<Event>>>);

impl EventSink for RcSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        self.0.borrow_mut().push(event);
        Ok(())
    }
}

fn main() {}
