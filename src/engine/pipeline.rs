//! The call core, and **the one place that states its order**. Every call (by name,
//! typed, in a batch, from a provider's format, over MCP, or the health probe) goes
//! through [`InFlight::execute`], one step after the other; each step is a method in
//! its own file, on the call's state in `in_flight.rs`:
//!
//! 1. **prepare** (`prepare.rs`, synchronous): shutting down? a known tool? a unique
//!    call id? arguments within size and depth, and of the tool's input type?
//! 2. **admit** (`admit.rs`): the policy (allow, deny, or only with the user's
//!    approval), then the user's rate;
//! 3. without approval: the user's **own slot** (`admit.rs`; asked of the limiter
//!    together with the rate, one round trip for a shared one), then **announce**
//!    (`announce.rs`): `tool_executing` reaches the user's sink, or the tool never runs;
//!    with approval (`approve.rs`): **announce**, then `tool_approval_required`, then
//!    the wait for the user's answer holding no slot, then the user's own slot; the
//!    tool's timeout starts at the approval;
//! 4. the **shared slots** (`admit.rs`): the tool's, then the global one;
//! 5. **run** (`run.rs`): the cache (idempotent tools only: a hit, a follower of an
//!    identical running call, or the leader), else the body under the call's deadline
//!    and cancellation, its panics contained;
//! 6. **finish** (`run.rs`, `announce.rs`): the shared slots are released, the cache is
//!    filled, `tool_completed` is delivered, the user's own slot is released.
//!
//! A call refused at any step ends in one place ([`InFlight::refuse`]) with its pair.
//! Every wait (policy, rate, slot, sink, approval, cache follower, body) watches the
//! call's deadline and cancellation. No shared slot is held while a call waits on its
//! user's sink, so one user's stuck socket can only hold that user's own slots.
//! Whatever happens to the future, `Drop` (in `in_flight.rs`) completes the pair.

use std::sync::Arc;

use super::codec::{Codec, Ran};
use super::in_flight::{Gate, InFlight, Prepared, Refusal, Unannounced};
use crate::cache::Key;
use crate::call::ToolOutput;
use crate::contain::DropSafe;
use crate::error::DispatchError;
use crate::limits::Admit;
use crate::tool::ToolError;

impl<'a> InFlight<'a> {
    pub(super) async fn execute<C, F>(
        &mut self,
        p: Prepared<'a, F>,
    ) -> Result<ToolOutput<C::Out>, DispatchError>
    where
        C: Codec,
        F: Future<Output = Result<C::Out, ToolError>> + Send,
    {
        // Each step answers at once when nothing has to wait (the common case) and
        // awaits only when something does; those waits are boxed, so the future of a
        // call that waits for nothing stays small.
        // Blocks keep each step's temporaries out of the later steps' state.
        let Prepared { entry, args, body } = p;
        // The body holds the tool's input: wherever the call ends before the body
        // runs (a refusal, a cache hit, a shared slot it never got), dropping it may
        // run the input's code, which must not unwind out of the pipeline.
        let body = DropSafe::new(body);
        let gate = {
            let decided = match self.policy_now(entry, &args) {
                Some(d) => d,
                None => Box::pin(self.ask_policy(entry, &args)).await,
            };
            // Nobody can approve the health probe: a policy that asks is a denial.
            let gate = match decided {
                Ok(Some(_)) if !self.admission.may_wait => Err(DispatchError::Denied {
                    tool: entry.name.to_string(),
                    missing_scopes: Vec::new(),
                    reason: Some("the policy asks for an approval nobody can give".into()),
                }),
                Ok(gate) => Ok(gate.or_else(|| Gate::of_tool(entry).map(Box::new))),
                Err(error) => Err(error),
            };
            // A call that waits for its user's approval has its rate checked now and
            // takes its slot once approved; any other call asks for both at once.
            let gate = match gate {
                Ok(Some(gate)) => Box::pin(self.rate()).await.map(|()| Some(gate)),
                other => other,
            };
            match gate {
                Ok(gate) => gate,
                Err(error) => {
                    return Err(Box::pin(self.refuse(Refusal { error, shown: args })).await);
                }
            }
        };
        let key = entry.settings.cache_ttl.and_then(|ttl| {
            let user =
                (!entry.settings.user_independent).then(|| Arc::clone(&self.user.ctx.user_id));
            // Boxed: few tools cache, and the call's future stays small for the rest.
            Key::new(user, entry.index, &args).map(|k| Box::new((k, ttl)))
        });
        let mut own_slot = match gate {
            // Approval first, holding no slot; `tool_executing` goes out before the
            // request, so every outcome of the wait has its pair.
            Some(gate) => Box::pin(self.approved(entry, *gate, args)).await?,
            None => {
                let slot = match self.admit_now() {
                    Admit::Now(r) => r.map_err(|n| self.not_admitted(n)),
                    Admit::Later(answer) => Box::pin(self.admitted(answer)).await,
                };
                let mut own_slot = match slot {
                    Ok(p) => p,
                    Err(error) => {
                        return Err(Box::pin(self.refuse(Refusal { error, shown: args })).await);
                    }
                };
                let announced = match self.announce_now(args) {
                    Ok(()) => Ok(()),
                    Err(Unannounced::Waiting(ev)) => {
                        drop(own_slot.reserved()); // no shared slot held while it waits
                        Box::pin(self.announce(*ev)).await
                    }
                    Err(u) => Err(u),
                };
                if let Err(u) = announced {
                    return Err(Box::pin(self.unannounced(u)).await);
                }
                own_slot
            }
        };
        let shared = {
            let shared = match self.shared_slots_now(entry, own_slot.reserved()) {
                Ok(s) => Ok(s),
                Err(()) => Box::pin(self.shared_slots(entry)).await,
            };
            match shared {
                Ok(s) => s,
                Err(e) => return Err(Box::pin(self.end_with(e, Ok(()))).await),
            }
        };
        let (ran, leader) = match key {
            None => (
                self.run(entry, async move { body.await.map(Ran::Fresh) })
                    .await,
                None,
            ),
            Some(key) => Box::pin(self.run_cached::<C, _>(entry, *key, body)).await,
        };
        drop(shared); // released before the completion waits on the user's sink
        // The completion the sink could not take at once moves into its boxed wait
        // here, so the call's future keeps no room for it across the await.
        let (out, later) = {
            let (out, pending) = self.finish::<C>(entry, ran, leader);
            (out, pending.map(|p| Box::pin(self.complete_later(p))))
        };
        if let Some(later) = later {
            later.await;
        }
        drop(own_slot);
        out
    }
}
