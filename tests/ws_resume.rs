//! Resume over real sockets: a dropped connection picks its run up after the last
//! `seq` it saw with no gap and no duplicate, even six runs of a thousand 3 KB frames
//! at once on one connection; another user's run does not exist; stale positions
//! are told to resync; a pending approval is replayed and answered on the new
//! socket; resumes of runs that never were cost nothing that stays.
#![cfg(feature = "axum")]

mod common;

use std::collections::HashMap;

use common::ws::*;
use serde_json::{Value, json};
use tool_dispatch::ws::WsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_resumes_after_its_last_seq_and_misses_nothing() {
    let (addr, server) = start().await;
    let mut events = server.subscribe();
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    let (run, epoch) = (ready["run_id"].clone(), ready["epoch"].clone());
    let slow = json!({"steps": 5, "step_ms": 40});
    send(&mut ws, openai(&[("call_slow", "slow_task", slow)])).await;
    let first = until(&mut ws, |m| m["type"] == "tool_executing").await;
    let last = *seqs(&first).last().unwrap();
    drop(ws); // the network goes: no closing handshake
    wait_event(&mut events, |e| gone(e, "alice")).await;

    let mut ws = connect(addr, "alice-token").await;
    let resume = json!({"type": "resume", "run_id": run, "after_seq": last, "epoch": epoch});
    send(&mut ws, resume).await;
    let resumed = recv(&mut ws).await;
    assert_eq!(
        resumed,
        json!({"type": "resumed", "run_id": run, "after_seq": last})
    );
    let rest = until_results(&mut ws).await;
    assert_eq!(
        seqs(&rest).first(),
        Some(&(last + 1)),
        "the next seq, nothing twice"
    );
    let progress = rest.iter().filter(|m| m["type"] == "tool_progress").count();
    assert_eq!(
        progress, 5,
        "every progress update after the drop arrived once"
    );
    assert_eq!(completed(&rest, "call_slow")["status"], "success");
    let all: Vec<Value> = first.into_iter().chain(rest).collect();
    check_events(&all, "alice");
    assert_eq!(seqs(&all), (1..=last + 7).collect::<Vec<u64>>());
    assert_eq!(server.engine().metrics().by_status["cancelled"], 0);
    assert_eq!(server.stats().resumes, 1);
}

/// Six runs of a thousand frames of 3 KB, all resumed from 0 on one connection:
/// each frame of each run arrives once and in order, or the client is told to
/// resync that run. (The socket's writer used to drop one frame of every full batch
/// it wrote, silently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_runs_of_a_thousand_frames_resumed_at_once_arrive_whole() {
    let (addr, server) = start().await;
    let pad = "x".repeat(3_000);
    for r in 0..6 {
        let run = format!("run_big_{r}");
        let writer = server.runs().writer("alice", &run);
        for i in 0..1_000 {
            let frame = json!({"type": "note", "run_id": run, "i": i, "pad": pad});
            writer.append(frame).await.unwrap();
        }
    }
    let (mut ws, ready) = connect_ready(addr, "alice-token").await;
    for r in 0..6 {
        let resume = json!({"type": "resume", "run_id": format!("run_big_{r}"), "after_seq": 0,
                            "epoch": ready["epoch"]});
        send(&mut ws, resume).await;
    }
    // run → the seqs seen, in order of arrival; runs told to resync.
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    let mut resync = Vec::new();
    let mut resumed = 0;
    while resumed < 6 || seen.values().map(Vec::len).sum::<usize>() + resync.len() * 1_000 < 6_000 {
        // A bound on a stuck test, not a measure: every frame is in the log already.
        let wait = std::time::Duration::from_secs(30);
        let Ok(m) = tokio::time::timeout(wait, recv(&mut ws)).await else {
            let missing: Vec<(&String, usize)> =
                seen.iter().map(|(r, s)| (r, 1_000 - s.len())).collect();
            panic!("frames never came, and no resync said so: {missing:?}");
        };
        match m["type"].as_str() {
            Some("resumed") => resumed += 1,
            Some("note") => {
                let run = m["run_id"].as_str().unwrap().to_owned();
                seen.entry(run)
                    .or_default()
                    .push(m["seq"].as_u64().unwrap());
            }
            Some("resync_required") => resync.push(m["run_id"].as_str().unwrap().to_owned()),
            _ => panic!("unexpected {m}"),
        }
    }
    for (run, seqs) in &seen {
        if resync.contains(run) {
            // Told: what came is still in order with no gap before the resync.
            assert_eq!(*seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{run}");
            continue;
        }
        assert_eq!(
            *seqs,
            (1..=1_000).collect::<Vec<u64>>(),
            "{run}: a gap, a repeat or a swap"
        );
    }
    assert_eq!(
        seen.len() + resync.iter().filter(|r| !seen.contains_key(*r)).count(),
        6
    );
}

#[tokio::test]
async fn another_users_run_is_unknown_and_stale_positions_must_resync() {
    let (addr, server) = start().await;
    let (mut alice, ready) = connect_ready(addr, "alice-token").await;
    let (run, epoch) = (ready["run_id"].clone(), ready["epoch"].as_u64().unwrap());
    send(&mut alice, forever("call_mine")).await;
    until(&mut alice, |m| m["type"] == "tool_executing").await;

    let mut bob = connect(addr, "bob-token").await;
    let resync = |reason: &str| json!({"type": "resync_required", "run_id": run, "reason": reason});
    // bob names alice's run: it does not exist for him, exactly like a made-up one.
    send(
        &mut bob,
        json!({"type": "resume", "run_id": run, "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut bob).await, resync("unknown_run"));
    send(
        &mut bob,
        json!({"type": "resume", "run_id": "run_never", "after_seq": 0}),
    )
    .await;
    assert_eq!(recv(&mut bob).await["reason"], "unknown_run");
    send(&mut bob, json!({"type": "cancel", "run_id": run})).await;
    assert_eq!(recv(&mut bob).await["calls"], 0);
    // alice: a wrong epoch, and a seq past the run's end.
    let wrong_epoch = json!({"type": "resume", "run_id": run, "after_seq": 0, "epoch": epoch ^ 1});
    send(&mut alice, wrong_epoch).await;
    assert_eq!(recv(&mut alice).await, resync("epoch_changed"));
    send(
        &mut alice,
        json!({"type": "resume", "run_id": run, "after_seq": 1_000_000}),
    )
    .await;
    assert_eq!(recv(&mut alice).await, resync("truncated"));
    // Her call was never touched, and her connection still follows her run.
    let m = server.engine().metrics();
    assert_eq!((m.active, m.by_status["cancelled"]), (1, 0));
    send(&mut alice, json!({"type": "cancel", "run_id": run})).await;
    let rest = until_results(&mut alice).await;
    assert_eq!(completed(&rest, "call_mine")["status"], "cancelled");
    let r = server.stats().resyncs;
    assert_eq!((r.unknown_run, r.epoch_changed, r.truncated), (2, 1, 1));
}

#[tokio::test]
async fn a_pending_approval_is_replayed_on_resume_and_answered_on_the_new_socket() {
    let (addr, _server) = start().await;
    let (mut ws, ready) = connect_ready(addr, "bob-token").await;
    let run = ready["run_id"].clone();
    send(&mut ws, email("e3", "ann@example.com")).await;
    let first = until(&mut ws, |m| m["type"] == "tool_executing").await;
    let last = *seqs(&first).last().unwrap();
    drop(ws);
    let mut ws = connect(addr, "bob-token").await;
    send(
        &mut ws,
        json!({"type": "resume", "run_id": run, "after_seq": last}),
    )
    .await;
    let replayed = until(&mut ws, |m| m["type"] == "tool_approval_required").await;
    assert_eq!(replayed[0]["type"], "resumed");
    assert_eq!(replayed[1]["seq"], last + 1);
    let approve = json!({"type": "tool_approval_decision", "call_id": "e3", "decision": "approve"});
    send(&mut ws, approve).await;
    let rest = until_results(&mut ws).await;
    assert_eq!(completed(&rest, "e3")["status"], "success");
    let all: Vec<Value> = first.into_iter().chain(replayed).chain(rest).collect();
    seqs(&all);
}

/// Resumes of runs that never were, with long and unique run ids: an over-long id is
/// refused before anything is looked up, an unknown run is `unknown_run`, and
/// nothing of either stays in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_of_unknown_runs_keep_nothing() {
    let server = WsServer::new(engine()).max_message_bytes(128 * 1024);
    let addr = serve(server.clone()).await;
    let mut ws = connect(addr, "alice-token").await;
    for i in 0..200 {
        let run = format!("{i:0>61440}");
        send(
            &mut ws,
            json!({"type": "resume", "run_id": run, "after_seq": 5}),
        )
        .await;
        let m = recv(&mut ws).await;
        assert_eq!(m["type"], "error", "{i}");
        let error = m["error"].as_str().unwrap();
        assert_eq!(
            error,
            "malformed message: `run_id` is 61440 bytes long; at most 256 are accepted"
        );
    }
    for i in 0..2_000 {
        let run = format!("{i:0>256}");
        send(
            &mut ws,
            json!({"type": "resume", "run_id": run, "after_seq": 5}),
        )
        .await;
        assert_eq!(recv(&mut ws).await["reason"], "unknown_run", "{i}");
    }
    assert_eq!(server.runs().stats().runs, 0, "{:?}", server.runs().stats());
    assert_eq!(server.stats().resyncs.unknown_run, 2_000);
    // The connection follows nothing it could not resume: it still has room for
    // every run it may follow.
    for r in 0..8 {
        let turn = openai(&[(&format!("c{r}"), "get_weather", json!({"city": "Paris"}))]);
        let mut turn = turn;
        turn["run_id"] = json!(format!("run_{r}"));
        send(&mut ws, turn).await;
        assert_eq!(
            until_results(&mut ws).await.last().unwrap()["run_id"],
            format!("run_{r}")
        );
    }
}
