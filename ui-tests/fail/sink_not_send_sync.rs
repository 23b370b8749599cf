// expected: cannot be sent between threads safely
// A sink holding an `Rc` cannot be an `EventSink`: a sink must be `Send + Sync`.
use std::cell::RefCell;
use std::rc::Rc;
use tool_dispatch::sink::TrySendError;
use tool_dispatch::{Event, EventSink};

struct RcSink(Rc<RefCell<Vec<Event>>>);

impl EventSink for RcSink {
    fn try_send(&self, event: Event) -> Result<(), TrySendError> {
        self.0.borrow_mut().push(event);
        Ok(())
    }
}

fn main() {}
