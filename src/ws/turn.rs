//! One model turn: give every call an id, run them all, render their results in the
//! turn's format, and record a `tool_results` frame in the run.

use tokio::sync::OwnedSemaphorePermit;

use super::protocol::{SessionRecord, ToolResults, TurnFormat};
use super::{WsEvent, WsServer, unique};
use crate::call::ToolCall;
use crate::provider::{anthropic, openai};
use crate::runlog::RunWriter;
use crate::user::UserContext;

/// Runs one turn's calls concurrently in `user`'s run and records their results in
/// the run. Owned by the run, not by the connection: it goes on when the socket
/// closes, until the calls end or the run is cancelled.
pub(super) async fn run(
    server: WsServer,
    user: UserContext,
    writer: RunWriter,
    format: TurnFormat,
    calls: Vec<ToolCall>,
    _permit: OwnedSemaphorePermit,
) {
    // Every call gets an id up front, so the results name the same ids as the events.
    let calls: Vec<ToolCall> = calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| match c.id {
            Some(ref id) if !id.is_empty() => c,
            _ => c.with_id(format!("call_{}_{i}", unique())),
        })
        .collect();
    let run_id = user.run_id().unwrap_or_default().to_owned();
    let user_id = user.user_id().to_owned();
    let d = server.engine.dispatcher().sink(writer.clone()).user(user);
    let results = d.dispatch_all(calls.iter().cloned()).await;
    let rendered = match format {
        TurnFormat::OpenAi => openai::render_results(&calls, &results),
        TurnFormat::Anthropic => anthropic::render_results(&calls, &results),
    };
    let call_ids: Vec<String> = calls.iter().filter_map(|c| c.id.clone()).collect();
    let record = SessionRecord::ToolResults(ToolResults {
        run_id: run_id.clone(),
        format,
        call_ids: call_ids.clone(),
        results: rendered,
    });
    let recorded = match serde_json::to_value(&record) {
        Ok(frame) => writer.append(frame).await.is_ok(),
        Err(_) => false,
    };
    if !recorded {
        tracing::warn!(%user_id, %run_id, "a turn's tool_results could not be recorded in its run");
    }
    server.event(WsEvent::TurnDone {
        user_id,
        run_id,
        call_ids,
        recorded,
    });
}
