//! Run logs on Redis Streams, through a real `redis-server`: a run written on one node
//! resumes on another with every `seq` once, in order; two nodes writing one run never
//! collide; the bounds hold in Redis; another user's run does not exist; Redis started
//! afresh or stopped is said, never silent, and the nodes recover by themselves.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::redis_server::{PATIENCE, RedisServer, eventually, resumed, take};
use common::*;
use serde_json::{Value, json};
use tool_dispatch::event::Status;
use tool_dispatch::redis::{Redis, RedisConfig};
use tool_dispatch::*;

async fn handle(server: &RedisServer, prefix: &str) -> Redis {
    let config = RedisConfig::default()
        .prefix(prefix)
        .timeout(Duration::from_millis(500));
    Redis::connect(&server.url(), config)
        .await
        .expect("redis answers")
}

/// Two nodes' run logs on one Redis and prefix.
async fn two_logs(server: &RedisServer, prefix: &str, config: RunLogConfig) -> (RunLog, RunLog) {
    let (a, b) = (handle(server, prefix).await, handle(server, prefix).await);
    (
        RunLog::redis(config, &a).await.expect("a log on A"),
        RunLog::redis(config, &b).await.expect("a log on B"),
    )
}

fn body(frame: &Frame) -> Value {
    let v: Value = serde_json::from_str(&frame.json).expect("frames are JSON");
    assert_eq!(v["seq"], json!(frame.seq), "the seq inside the frame");
    v
}

#[tokio::test]
async fn a_run_written_on_one_node_resumes_on_the_other_with_every_seq_once_in_order() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "resume", RunLogConfig::default()).await;
    assert_eq!(la.epoch(), lb.epoch(), "one epoch for the cluster");
    assert!(la.epoch() < 1 << 53);
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    let ctx = UserContext::builder("alice").run_id("r1").build().unwrap();
    let writer = la.writer("alice", "r1");
    let d = engine.dispatcher().sink(writer.clone()).user(ctx);
    for i in 0..5 {
        d.dispatch(ToolCall::new("echo", json!({ "i": i })))
            .await
            .unwrap();
    }
    d.dispatch(ToolCall::new("no_such_tool", json!(0)))
        .await
        .unwrap_err();
    let last = writer
        .append(json!({"type": "tool_results", "results": [1, 2]}))
        .await
        .expect("recorded in Redis");
    assert_eq!(
        last, 13,
        "5 × (executing, completed) + unknown tool's pair + results"
    );

    let mut on_b = lb.resume("alice", "r1", 0, Some(lb.epoch())).await.unwrap();
    let from_b = take(&mut on_b, 13).await;
    let seqs: Vec<u64> = from_b.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
    assert_eq!(body(&from_b[12])["type"], "tool_results");
    let mut on_a = la.resume("alice", "r1", 0, None).await.unwrap();
    let from_a = take(&mut on_a, 13).await;
    assert_eq!(
        from_a, from_b,
        "byte for byte the same frames on both nodes"
    );
    // Resuming in the middle gives the rest, then what comes next, live.
    let mut mid = lb.resume("alice", "r1", 9, None).await.unwrap();
    assert_eq!(take(&mut mid, 4).await, from_b[9..]);
    writer.append(json!({"type": "note"})).await.unwrap();
    assert_eq!(take(&mut mid, 1).await[0].seq, 14);
    assert_eq!(take(&mut on_b, 1).await[0].seq, 14);
    assert_eq!(
        writer.last_seq(),
        14,
        "node A has read its own run's last frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_one_run_while_both_follow_it_see_each_seq_once_in_order() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "both", RunLogConfig::default()).await;
    const N: usize = 300;
    let mut readers = vec![
        la.writer("alice", "r").subscribe(),
        lb.writer("alice", "r").subscribe(),
    ];
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    let write = |log: &RunLog, node: &'static str| {
        let w = log.writer("alice", "r");
        let ctx = UserContext::builder("alice").run_id("r").build().unwrap();
        let d = engine.dispatcher().sink(w.clone()).user(ctx);
        tokio::spawn(async move {
            for i in 0..N {
                // The sink path (never waits) and the awaited one, mixed.
                if i % 3 == 0 {
                    w.append(json!({"type": "x", "node": node, "i": i}))
                        .await
                        .unwrap();
                } else {
                    let update = tool_dispatch::event::AgentUpdate::Thinking(format!("{node}{i}"));
                    d.notify(update).await.expect("room in the queue");
                }
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let (wa, wb) = (write(&la, "a"), write(&lb, "b"));
    wa.await.unwrap();
    wb.await.unwrap();
    for reader in &mut readers {
        let frames = take(reader, 2 * N).await;
        let seqs: Vec<u64> = frames.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, (1..=2 * N as u64).collect::<Vec<_>>());
        // Each node's frames keep the order that node wrote them in.
        for node in ["a", "b"] {
            let mine: Vec<usize> = frames
                .iter()
                .map(body)
                .filter_map(|v| {
                    let text = v["message"]
                        .as_str()
                        .map(str::to_owned)
                        .or_else(|| (v["node"] == node).then(|| format!("{node}{}", v["i"])))?;
                    text.strip_prefix(node)?.parse().ok()
                })
                .collect();
            assert_eq!(mine, (0..N).collect::<Vec<_>>(), "node {node}'s order");
        }
        assert!(reader.try_next().is_none(), "nothing twice");
    }
}

#[tokio::test]
async fn another_users_run_bad_positions_and_an_old_epoch_are_told_apart() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "apart", RunLogConfig::default()).await;
    let w = la.writer("alice", "r");
    for _ in 0..3 {
        w.append(json!({"type": "x"})).await.unwrap();
    }
    let cases = [
        ("bob", "r", 0, None, Resync::UnknownRun),
        ("alice}", "r", 0, None, Resync::UnknownRun),
        ("alice", "r2", 0, None, Resync::UnknownRun),
        ("alice", "r", 4, None, Resync::Truncated),
        ("alice", "r", u64::MAX, None, Resync::Truncated),
        ("alice", "r", 0, Some(lb.epoch() ^ 1), Resync::EpochChanged),
        ("alice", "r", 0, Some(u64::MAX), Resync::EpochChanged),
    ];
    for (user, run, after, epoch, want) in cases {
        let got = lb.resume(user, run, after, epoch).await.unwrap_err();
        assert_eq!(got, want, "{user} {run} after {after} epoch {epoch:?}");
    }
    // At the end exactly: nothing to replay, and then the live frames.
    let mut at_end = lb.resume("alice", "r", 3, None).await.unwrap();
    assert!(at_end.try_next().is_none());
    w.append(json!({"type": "x"})).await.unwrap();
    assert_eq!(take(&mut at_end, 1).await[0].seq, 4);
}

#[tokio::test]
async fn the_bounds_hold_in_redis_per_run_and_per_user() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let config = RunLogConfig::default()
        .max_events_per_run(10)
        .max_runs_per_user(3)
        .max_bytes_per_run(1 << 10);
    let (la, lb) = two_logs(&server, "bounds", config).await;
    let w = la.writer("alice", "long");
    for i in 0..1_000 {
        w.append(json!({"type": "x", "i": i})).await.unwrap();
    }
    // `MAXLEN ~` trims whole nodes of the stream: about the bound, never 1,000.
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let len: u64 = ::redis::cmd("XLEN")
        .arg("bounds:u{alice}:run:long")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((10..=200).contains(&len), "{len} entries kept");
    assert_eq!(
        lb.resume("alice", "long", 0, None).await.unwrap_err(),
        Resync::Truncated,
        "the first frames are gone, and the reader is told"
    );
    let mut tail = lb.resume("alice", "long", 995, None).await.unwrap();
    let seqs: Vec<u64> = take(&mut tail, 5).await.iter().map(|f| f.seq).collect();
    assert_eq!(seqs, [996, 997, 998, 999, 1000]);
    // A frame larger than a run may hold is refused, and nothing is recorded.
    let big = json!({"type": "x", "pad": "p".repeat(2_000)});
    assert_eq!(w.append(big).await.unwrap_err(), AppendError::Full);
    assert_eq!(
        w.append(json!([1])).await.unwrap_err(),
        AppendError::NotAnObject
    );
    // The user's fourth and fifth runs push out the least recently written ones.
    for run in ["r2", "r3", "r4", "r5"] {
        lb.writer("alice", run)
            .append(json!({"type": "x"}))
            .await
            .unwrap();
    }
    for run in ["long", "r2"] {
        let got = la.resume("alice", run, 0, None).await.unwrap_err();
        assert_eq!(got, Resync::UnknownRun, "{run}");
    }
    for run in ["r3", "r4", "r5"] {
        assert!(la.resume("alice", run, 0, None).await.is_ok(), "{run}");
    }
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg("bounds:u{alice}:run:r5")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "a run expires: {ttl} ms");
}

#[tokio::test]
async fn redis_started_afresh_changes_the_shared_epoch_and_readers_are_told() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "afresh", RunLogConfig::default()).await;
    let w = la.writer("alice", "r");
    w.append(json!({"type": "x"})).await.unwrap();
    let old = lb.epoch();
    let mut reader = lb.resume("alice", "r", 0, Some(old)).await.unwrap();
    assert_eq!(take(&mut reader, 1).await[0].seq, 1);

    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = ::redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The follower is told, not left waiting for frames that will never come.
    let told = tokio::time::timeout(PATIENCE, reader.next()).await.unwrap();
    assert_eq!(told, Some(Err(Resync::Truncated)));
    eventually("both nodes see the new epoch", || {
        let (a, b) = (la.epoch(), lb.epoch());
        async move { a == b && a != old }
    })
    .await;
    let got = lb.resume("alice", "r", 1, Some(old)).await.unwrap_err();
    assert_eq!(got, Resync::EpochChanged);
    // New frames get new seqs under the new epoch, seen on both nodes.
    w.append(json!({"type": "x"})).await.unwrap();
    let mut again = lb.resume("alice", "r", 0, Some(lb.epoch())).await.unwrap();
    assert_eq!(take(&mut again, 1).await[0].seq, 1);
}

#[tokio::test]
async fn redis_stopped_refuses_appends_so_no_call_runs_unrecorded_and_the_log_recovers() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let redis = handle(&server, "down").await;
    let log = RunLog::redis(RunLogConfig::default(), &redis)
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::builder(
        Registry::builder()
            .tool(counting("count", &runs, ToolSettings::new()))
            .tool(hold(&gate, started_tx, ToolSettings::new()))
            .build()
            .unwrap(),
    )
    .build();
    let ctx = UserContext::builder("alice").run_id("r").build().unwrap();
    let d = engine.dispatcher().sink(log.writer("alice", "r")).user(ctx);
    let mut follower = log.resume("alice", "r", 0, None).await.unwrap_err();
    assert_eq!(follower, Resync::UnknownRun, "nothing written yet");
    d.dispatch(ToolCall::new("count", json!(1))).await.unwrap();
    // The sink never waits: the frames reach Redis a moment after the call returns.
    let mut reader = resumed(&log, "alice", "r", 0).await;
    assert_eq!(take(&mut reader, 2).await.len(), 2);
    // A call running when Redis goes away.
    let running = spawn(&d, ToolCall::new("hold", json!("h")));
    started.recv().await.unwrap();
    assert_eq!(take(&mut reader, 1).await[0].seq, 3, "its tool_executing");

    server.stop();
    let w = log.writer("alice", "r");
    let refused = tokio::time::timeout(PATIENCE, w.append(json!({"type": "x"})))
        .await
        .expect("bounded by the timeout");
    assert_eq!(refused, Err(AppendError::Unavailable));
    // The running call still gives its caller the result; its lost frame is counted
    // and the follower is told to resync instead of waiting for it.
    gate.add_permits(1);
    let out = tokio::time::timeout(PATIENCE, running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.unwrap().value, json!("h"));
    follower = tokio::time::timeout(PATIENCE, reader.next())
        .await
        .unwrap()
        .expect("told")
        .unwrap_err();
    assert_eq!(follower, Resync::Truncated);
    // A new call whose tool_executing cannot be recorded does not run.
    let err = tokio::time::timeout(PATIENCE, d.dispatch(ToolCall::new("count", json!(2))))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(err.status(), Status::Undelivered, "{err:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second call never ran");
    let resumed = tokio::time::timeout(PATIENCE, log.resume("alice", "r", 0, None))
        .await
        .expect("bounded");
    assert_eq!(resumed.unwrap_err(), Resync::Unavailable);
    let s = redis.stats();
    assert!(s.log_failures >= 2 && s.last_error.is_some(), "{s:?}");

    // Back: the log recovers by itself, and new calls are recorded and run.
    let _server = RedisServer::start_on(server.port);
    eventually("appends work again", || {
        let w = w.clone();
        async move { w.append(json!({"type": "x"})).await.is_ok() }
    })
    .await;
    d.dispatch(ToolCall::new("count", json!(3))).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let mut fresh = log
        .resume("alice", "r", 0, Some(log.epoch()))
        .await
        .unwrap();
    let kinds: Vec<Value> = take(&mut fresh, 3)
        .await
        .iter()
        .map(|f| body(f)["type"].clone())
        .collect();
    assert_eq!(
        kinds,
        [json!("x"), json!("tool_executing"), json!("tool_completed")]
    );
}

#[tokio::test]
async fn a_run_followed_on_another_node_is_followed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "followed", RunLogConfig::default()).await;
    la.writer("alice", "r")
        .append(json!({"type": "x"}))
        .await
        .unwrap();
    assert!(!la.is_followed("alice", "r").await);
    let reader = lb.resume("alice", "r", 0, None).await.unwrap();
    assert!(lb.is_followed("alice", "r").await, "here, at once");
    eventually("node A learns that B follows the run", || {
        let la = la.clone();
        async move { la.is_followed("alice", "r").await }
    })
    .await;
    assert!(
        !la.is_followed("bob", "r").await,
        "bob's run of that name is not"
    );
    drop(reader);
    assert!(
        !lb.is_followed("alice", "r").await,
        "nobody on B follows it any more"
    );
}

#[tokio::test]
async fn a_flood_faster_than_redis_takes_it_waits_for_room_and_loses_nothing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let redis = handle(&server, "flood").await;
    let config = RunLogConfig::default().max_events_per_run(50_000);
    let log = RunLog::redis(config, &redis).await.unwrap();
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    let ctx = UserContext::builder("alice").run_id("r").build().unwrap();
    let w = log.writer("alice", "r");
    let d = engine.dispatcher().sink(w.clone()).user(ctx);
    // Far more than the node's queue holds, as fast as the sink takes them.
    const N: u64 = 20_000;
    for i in 0..N {
        let update = tool_dispatch::event::AgentUpdate::Thinking(i.to_string());
        d.notify(update).await.expect("delivered, waiting for room");
    }
    let last = w.append(json!({"type": "last"})).await;
    let last = last.unwrap_or_else(|e| panic!("{e}: {:?}", redis.stats()));
    assert_eq!(last, N + 1, "every frame recorded, in order, once");
    let mut all = log.resume("alice", "r", 0, None).await.unwrap();
    let frames = take(&mut all, N as usize + 1).await;
    for (i, f) in frames.iter().take(N as usize).enumerate() {
        assert_eq!(body(f)["message"], json!(i.to_string()));
    }
    let s = redis.stats();
    assert_eq!((s.log_appends, s.log_failures), (N + 1, 0), "{s:?}");
    assert_eq!(engine.metrics().sink_failures, 0);
}

#[tokio::test]
async fn a_failed_resume_leaves_nothing_that_stops_the_runs_next_frames() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "failed", RunLogConfig::default()).await;
    let engine = plain_engine(Registry::builder().tool(echo()).build().unwrap());
    // A turn in `run` on A, as a session starts one after telling its client to
    // resync: a writer, a reader of what comes next, one call.
    let next_turn = |run: &'static str| {
        let writer = la.writer("alice", run);
        let reader = writer.subscribe();
        let ctx = UserContext::builder("alice").run_id(run).build().unwrap();
        (reader, engine.dispatcher().sink(writer).user(ctx))
    };
    let kinds = |frames: &[Frame]| -> Vec<Value> {
        frames.iter().map(|f| body(f)["type"].clone()).collect()
    };

    // A run nobody ever wrote, resumed from seq 5 (and 0): unknown; then its first call.
    for (run, after) in [("new5", 5), ("new0", 0)] {
        let got = la.resume("alice", run, after, None).await.unwrap_err();
        assert_eq!(got, Resync::UnknownRun);
        let (mut reader, d) = next_turn(run);
        d.dispatch(ToolCall::new("echo", json!(1))).await.unwrap();
        let frames = take(&mut reader, 2).await;
        assert_eq!(
            frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [1, 2],
            "{run}"
        );
        assert_eq!(kinds(&frames), ["tool_executing", "tool_completed"]);
    }

    // A run of three frames (written on B), resumed on A past its end: truncated;
    // then the next call in it is seen on A, after what the run kept.
    let wb = lb.writer("alice", "kept");
    for _ in 0..3 {
        wb.append(json!({"type": "x"})).await.unwrap();
    }
    let got = la.resume("alice", "kept", 9, None).await.unwrap_err();
    assert_eq!(got, Resync::Truncated);
    let (mut reader, d) = next_turn("kept");
    d.dispatch(ToolCall::new("echo", json!(2))).await.unwrap();
    let frames = take(&mut reader, 5).await;
    assert_eq!(
        frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );

    // The writer made before the failed resume (the session's own run): the same.
    let held = la.writer("alice", "held");
    assert_eq!(
        la.resume("alice", "held", 7, None).await.unwrap_err(),
        Resync::UnknownRun
    );
    let (mut reader, d) = next_turn("held");
    d.dispatch(ToolCall::new("echo", json!(3))).await.unwrap();
    assert_eq!(
        kinds(&take(&mut reader, 2).await),
        ["tool_executing", "tool_completed"]
    );
    drop(held);

    // A reader already following the run is not moved by someone's failed resume.
    let (mut following, d) = next_turn("followed");
    d.dispatch(ToolCall::new("echo", json!(4))).await.unwrap();
    assert_eq!(take(&mut following, 2).await[1].seq, 2);
    for after in [3, 1_000, u64::MAX] {
        let got = la
            .resume("alice", "followed", after, None)
            .await
            .unwrap_err();
        assert_eq!(got, Resync::Truncated);
    }
    d.dispatch(ToolCall::new("echo", json!(5))).await.unwrap();
    let seqs: Vec<u64> = take(&mut following, 2)
        .await
        .iter()
        .map(|f| f.seq)
        .collect();
    assert_eq!(seqs, [3, 4]);
}

/// `used_memory` of the server, from `INFO memory`.
async fn used_memory(conn: &mut ::redis::aio::MultiplexedConnection) -> i64 {
    let info: String = ::redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_of_unknown_runs_keep_nothing_in_redis_or_on_the_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (la, lb) = two_logs(&server, "junk", RunLogConfig::default()).await;
    // A run that exists, followed on A, so that A's reader is busy reading.
    let w = lb.writer("alice", "real");
    w.append(json!({"type": "x"})).await.unwrap();
    let _follower = la.resume("alice", "real", 0, None).await.unwrap();
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Marked as followed by A: a run that exists.
    eventually("A marks the run it follows", || async {
        server.exists("junk:u{alice}:seen:real")
    })
    .await;
    let keys = |c: &mut ::redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        async move {
            let all: Vec<String> = ::redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut c)
                .await
                .unwrap();
            all.into_iter()
                .collect::<std::collections::BTreeSet<String>>()
        }
    };
    let (keys_before, memory_before) = (keys(&mut conn).await, used_memory(&mut conn).await);
    let runs_before = la.stats().runs;

    // 2,000 resumes of unique 60 KB run ids, unknown or past the end of nothing,
    // four at a time as a client's pipelined messages would come.
    const N: usize = 2_000;
    const LONG: usize = 60 << 10;
    let la = Arc::new(la);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let la = Arc::clone(&la);
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(4) {
                let run = format!("{i:08}{}", "x".repeat(LONG));
                let after = (i % 3) as u64;
                let got = la.resume("alice", &run, after, None).await.unwrap_err();
                assert_eq!(got, Resync::UnknownRun);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // At once, before any marker could have expired: not one key more in Redis, and
    // not one run more kept on the node.
    // (A node may have made its wake stream meanwhile: one key a node, whatever the
    // number of resumes.)
    let keys_after = keys(&mut conn).await;
    let new: Vec<&String> = keys_after.difference(&keys_before).collect();
    let made: Vec<&str> = new
        .iter()
        .filter(|k| !(k.starts_with("junk:node:") && k.ends_with(":wake")))
        .map(|k| &k[..k.len().min(40)])
        .collect();
    assert!(
        made.is_empty(),
        "{} keys made by failed resumes: {:?}",
        made.len(),
        &made[..made.len().min(3)]
    );
    assert_eq!(la.stats().runs, runs_before, "runs kept on the node");
    let grown = used_memory(&mut conn).await - memory_before;
    assert!(
        grown < 8 << 20,
        "Redis grew by {grown} bytes for {N} resumes of {} MB of ids",
        (N * LONG) >> 20
    );
}
