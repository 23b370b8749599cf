//! Run logs: every event of a run gets a contiguous `seq`; a reader resuming at any
//! `seq` sees each later frame once, in order, across the replay/live boundary; the
//! bounds hold; a reader that never reads slows nobody; another user's run does not
//! exist; a restarted log says so.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use serde_json::{Value, json};
use tool_dispatch::event::Status;
use tool_dispatch::*;

fn seq_of(frame: &Frame) -> u64 {
    let v: Value = serde_json::from_str(&frame.json).expect("frames are JSON");
    assert_eq!(v["seq"], json!(frame.seq), "the seq inside the frame");
    frame.seq
}

/// The answer of a process's own log, which never waits.
fn now<F: std::future::Future>(f: F) -> F::Output {
    futures_util::FutureExt::now_or_never(f).expect("a process's own log answers at once")
}

/// Every frame a reader has now, in order.
fn ready(reader: &mut RunReader) -> Vec<Result<u64, Resync>> {
    std::iter::from_fn(|| reader.try_next())
        .map(|r| r.map(|f| seq_of(&f)))
        .collect()
}

#[tokio::test]
async fn every_event_of_a_run_gets_a_contiguous_seq_through_the_ordinary_sink() {
    let log = RunLog::new(RunLogConfig::default());
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    let ctx = UserContext::builder("alice")
        .run_id("run_1")
        .build()
        .unwrap();
    let d = engine
        .dispatcher()
        .sink(log.writer("alice", "run_1"))
        .user(ctx);
    d.dispatch(ToolCall::new("echo", json!(1))).await.unwrap();
    d.notify(tool_dispatch::event::AgentUpdate::Thinking("hm".into()))
        .await
        .unwrap();
    d.dispatch(ToolCall::new("no_such_tool", json!(2)))
        .await
        .unwrap_err();
    log.writer("alice", "run_1")
        .append(json!({"type": "tool_results", "results": [1]}))
        .await
        .unwrap();
    let mut r = log
        .resume("alice", "run_1", 0, Some(log.epoch()))
        .await
        .unwrap();
    let frames: Vec<Frame> = std::iter::from_fn(|| r.try_next())
        .map(Result::unwrap)
        .collect();
    let seqs: Vec<u64> = frames.iter().map(seq_of).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    let kinds: Vec<String> = frames
        .iter()
        .map(|f| serde_json::from_str::<Value>(&f.json).unwrap()["type"].to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "\"tool_executing\"",
            "\"tool_completed\"",
            "\"agent_thinking\"",
            "\"tool_executing\"",
            "\"tool_completed\"",
            "\"tool_results\""
        ]
    );
    // Resuming in the middle gets the rest, then live frames follow.
    let mut r = log
        .resume("alice", "run_1", 4, Some(log.epoch()))
        .await
        .unwrap();
    assert_eq!(ready(&mut r), [Ok(5), Ok(6)]);
    log.writer("alice", "run_1")
        .append(json!({"type": "x"}))
        .await
        .unwrap();
    assert_eq!(r.next().await.map(|f| f.map(|f| seq_of(&f))), Some(Ok(7)));
}

#[tokio::test]
async fn another_users_run_and_an_old_epoch_are_told_apart_from_nothing() {
    let log = RunLog::new(RunLogConfig::default());
    log.writer("alice", "run_1")
        .append(json!({"type": "x"}))
        .await
        .unwrap();
    assert_eq!(
        log.resume("bob", "run_1", 0, None).await.unwrap_err(),
        Resync::UnknownRun
    );
    assert_eq!(
        log.resume("alice", "run_2", 0, None).await.unwrap_err(),
        Resync::UnknownRun
    );
    let restarted = RunLog::new(RunLogConfig::default());
    assert_ne!(log.epoch(), restarted.epoch());
    assert_eq!(
        restarted
            .resume("alice", "run_1", 0, Some(log.epoch()))
            .await
            .unwrap_err(),
        Resync::EpochChanged
    );
    // An absurd seq, past the end of the run, is not silently accepted.
    assert_eq!(
        log.resume("alice", "run_1", u64::MAX, None)
            .await
            .unwrap_err(),
        Resync::Truncated
    );
}

#[tokio::test]
async fn evicted_events_leave_a_truncation_mark() {
    let log = RunLog::new(RunLogConfig::default().max_events_per_run(10));
    let w = log.writer("alice", "r");
    for i in 0..25 {
        w.append(json!({ "type": "x", "i": i })).await.unwrap();
    }
    assert_eq!(
        log.resume("alice", "r", 0, None).await.unwrap_err(),
        Resync::Truncated
    );
    assert_eq!(
        log.resume("alice", "r", 14, None).await.unwrap_err(),
        Resync::Truncated
    );
    let mut r = log.resume("alice", "r", 15, None).await.unwrap();
    let got: Vec<_> = ready(&mut r).into_iter().map(Result::unwrap).collect();
    assert_eq!(got, (16..=25).collect::<Vec<_>>());
    // Bytes per run bound too.
    let log = RunLog::new(RunLogConfig::default().max_bytes_per_run(200));
    let w = log.writer("alice", "r");
    for _ in 0..50 {
        w.append(json!({ "type": "x", "pad": "p".repeat(40) }))
            .await
            .unwrap();
    }
    assert!(log.stats().bytes <= 200);
    assert_eq!(
        w.append(json!({"pad": "p".repeat(500)})).await,
        Err(AppendError::Full)
    );
}

#[tokio::test(start_paused = true)]
async fn a_run_past_its_lifetime_is_an_unknown_run() {
    let log = RunLog::new(RunLogConfig::default().ttl(Duration::from_secs(600)));
    log.writer("alice", "r")
        .append(json!({"type": "x"}))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(599)).await;
    assert!(log.resume("alice", "r", 0, None).await.is_ok());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        log.resume("alice", "r", 0, None).await.unwrap_err(),
        Resync::UnknownRun
    );
    assert_eq!(log.sweep(), 0);
    assert_eq!(log.stats().bytes, 0);
}

#[tokio::test]
async fn ten_thousand_runs_of_a_hundred_users_stay_within_the_bounds() {
    let config = RunLogConfig::default()
        .max_runs_per_user(50)
        .max_events_per_run(8)
        .max_bytes(8 << 20);
    let log = RunLog::new(config);
    for u in 0..100 {
        for run in 0..100 {
            let w = log.writer(&format!("user-{u}"), &format!("run-{run}"));
            for i in 0..10 {
                w.append(json!({ "type": "x", "i": i })).await.unwrap();
            }
        }
    }
    let stats = log.stats();
    assert_eq!(
        stats.runs,
        100 * 50,
        "each user keeps its 50 most recent runs"
    );
    assert!(stats.bytes <= 8 << 20, "{stats:?}");
    // Each kept run holds its last 8 frames; an evicted run is unknown.
    assert!(log.resume("user-7", "run-99", 2, None).await.is_ok());
    assert_eq!(
        log.resume("user-7", "run-0", 0, None).await.unwrap_err(),
        Resync::UnknownRun
    );
    println!(
        "10,000 runs written, {} kept, {} bytes",
        stats.runs, stats.bytes
    );
}

#[tokio::test]
async fn a_reader_that_never_reads_slows_no_writer_and_is_told_to_resync() {
    let log = RunLog::new(
        RunLogConfig::default()
            .reader_buffer(8)
            .max_events_per_run(100_000),
    );
    let w = log.writer("alice", "r");
    let mut stuck = log.resume("alice", "r", 0, None).await.unwrap();
    let other = log.writer("bob", "r");
    let mut bobs = log.resume("bob", "r", 0, None).await.unwrap();
    for i in 0..10_000 {
        w.append(json!({ "type": "x", "i": i })).await.unwrap(); // never waits
        other.append(json!({ "type": "y", "i": i })).await.unwrap();
        assert_eq!(bobs.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(i + 1)));
    }
    let got = ready(&mut stuck);
    assert_eq!(got.len(), 9, "its buffer, then the resync");
    assert_eq!(got[8], Err(Resync::Truncated));
    // It can resume from where it was and catch up from the kept frames.
    let mut again = log.resume("alice", "r", 8, None).await.unwrap();
    assert_eq!(again.try_next().map(|r| r.map(|f| f.seq)), Some(Ok(9)));
}

#[tokio::test]
async fn a_log_that_refuses_an_event_makes_the_call_undelivered_and_the_tool_never_runs() {
    let log = RunLog::new(RunLogConfig::default().max_bytes(100));
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reg = Registry::builder()
        .tool(counting("count", &runs, ToolSettings::new()))
        .build()
        .unwrap();
    let engine = plain_engine(reg);
    let d = engine
        .dispatcher()
        .sink(log.writer("alice", "r"))
        .user(user("alice"));
    let err = d
        .dispatch(ToolCall::new("count", json!({"pad": "p".repeat(200)})))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Status::Undelivered);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Appends and resumes interleaved at random: every reader sees each seq after its
    /// starting point once, in order, with no gap between replay and live.
    #[test]
    fn replay_then_live_is_exact_whatever_the_interleaving(
        ops in proptest::collection::vec((0u8..3, 0u64..200), 1..300),
        keep in 5usize..50,
    ) {
        let log = RunLog::new(RunLogConfig::default().max_events_per_run(keep).reader_buffer(1_000));
        let w = log.writer("alice", "r");
        let mut last = 0u64;
        let mut readers: Vec<(u64, RunReader)> = Vec::new();
        let mut seen: HashMap<usize, Vec<u64>> = HashMap::new();
        for (op, n) in ops {
            match op {
                0 => last = now(w.append(json!({"type": "x"}))).unwrap(),
                1 => {
                    let after = n.min(last);
                    match now(log.resume("alice", "r", after, None)) {
                        Ok(r) => readers.push((after, r)),
                        Err(e) => {
                            prop_assert_eq!(e, Resync::Truncated);
                            prop_assert!(after + (keep as u64) < last);
                        }
                    }
                }
                _ => {
                    for (i, (_, r)) in readers.iter_mut().enumerate() {
                        seen.entry(i).or_default().extend(ready(r).into_iter().map(Result::unwrap));
                    }
                }
            }
        }
        for (i, (after, r)) in readers.iter_mut().enumerate() {
            let mut got = seen.remove(&i).unwrap_or_default();
            got.extend(ready(r).into_iter().map(Result::unwrap));
            let want: Vec<u64> = (*after + 1..=last).collect();
            prop_assert_eq!(got, want);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_and_resumes_see_every_seq_once_in_order() {
    let log = RunLog::new(
        RunLogConfig::default()
            .max_events_per_run(100_000)
            .reader_buffer(100_000),
    );
    let w = log.writer("alice", "r");
    const N: u64 = 20_000;
    let writer = tokio::task::spawn_blocking(move || {
        for _ in 0..N {
            now(w.append(json!({"type": "x"}))).unwrap();
        }
    });
    let mut readers = Vec::new();
    for k in 0..8u64 {
        let log = log.clone();
        readers.push(tokio::spawn(async move {
            // Resume at a point that moves with the writer.
            for _ in 0..k * 50 {
                tokio::task::yield_now().await;
            }
            // Somewhere in the first thousand, once the writer got there.
            let after = k * 997 % 1_000;
            let mut r = loop {
                match log.resume("alice", "r", after, None).await {
                    Ok(r) => break r,
                    Err(e) => {
                        assert_eq!(e, Resync::Truncated, "only ahead of the writer");
                        tokio::task::yield_now().await;
                    }
                }
            };
            let mut expect = after + 1;
            while expect <= N {
                let f = r.next().await.expect("live").expect("no resync");
                assert_eq!(f.seq, expect, "reader {k}");
                expect += 1;
            }
        }));
    }
    writer.await.unwrap();
    for r in readers {
        r.await.unwrap();
    }
}
