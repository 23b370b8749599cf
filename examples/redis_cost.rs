//! What sharing the limits through Redis costs per call, measured side by side in one
//! run against a Redis on loopback.
//!
//! ```text
//! redis-server --port 6390 --save '' &
//! cargo run --release --example redis_cost --features redis -- --redis redis://127.0.0.1:6390
//! ```
//!
//! Seven variants, interleaved in rounds so that drift hits them alike, each a no-op
//! tool called `--calls` times per round by one user (or a bare request):
//!
//! 1. `ping`: a bare `PING` round trip, the yardstick;
//! 2. `local`: limits kept in the process (the default);
//! 3. `redis`: the user's rate and concurrency in Redis: one `EVALSHA` a call (the
//!    admission script: rate, the user's lease); the lease's release rides on the
//!    user's next admission (or goes in a batch no call waits for);
//! 4. `redis_cluster`: the same with `cluster_concurrency`: the script takes the
//!    cluster's lease too, in the same round trip;
//! 5. `shed_redis`: a user far over the quota, every call refused by Redis;
//! 6. `shed_precheck`: the same user with the local pre-check on: refused without a
//!    round trip;
//! 7. `time_script`: an `EVALSHA` of a script that only reads the server's clock, the
//!    least any of the limiter's scripts costs.
//!
//! Then the run log, with the same no-op call writing its events to a run:
//!
//! 8. `log_local`: into the process's own [`RunLog`];
//! 9. `log_redis`: into a [`RunLog::redis`] (the sink queues, a batch per round trip);
//! 10. `append_redis`: one awaited `append` to the Redis log (recorded, seq returned),
//!     with nothing queued before it;
//! 11. `frames_per_s`: 20,000 events queued through the sink, until the last is in
//!     Redis.
//!
//! The last line is `RESULT ping_p50_ns=.. local_p50_ns=.. local_p99_ns=.. redis_p50_ns=..
//! redis_p99_ns=.. redis_vs_ping=.. redis_cluster_p50_ns=.. redis_cluster_vs_ping=..
//! shed_redis_p50_ns=.. shed_precheck_p50_ns=.. time_script_p50_ns=..
//! time_script_vs_ping=.. log_local_p50_ns=..
//! log_redis_p50_ns=.. log_redis_p99_ns=.. append_redis_p50_ns=..
//! append_redis_p99_ns=.. frames_per_s=.. redis_round_trips_per_call=..
//! redis_releases_per_call=.. invariants=ok|FAILED`: `*_vs_ping` is the variant's p50
//! over the `PING` p50 of the same run; `redis_round_trips_per_call` counts the
//! requests a `redis` or `redis_cluster` call waits for (`RedisStats::round_trips`
//! less `RedisStats::releases`), `redis_releases_per_call` the requests giving lease
//! releases back that it does not wait for (at most one); `invariants=ok` also says
//! that no lease was left in Redis.

use std::time::Instant;

use serde_json::json;
use tool_dispatch::redis::{Redis, RedisConfig};
use tool_dispatch::*;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Takes every event and keeps none.
struct NullSink;

impl EventSink for NullSink {
    fn try_send(&self, _: event::Event) -> Result<(), TrySendError> {
        Ok(())
    }
}

fn engine(redis: Option<&Redis>, rate: Rate) -> Engine {
    let noop = tool_fn("noop", "Does nothing.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    let limits = Limits::default().per_user(UserLimits {
        concurrency: 10,
        rate: Some(rate),
    });
    let builder =
        Engine::builder(Registry::builder().tool(noop).build().expect("valid")).limits(limits);
    match redis {
        Some(r) => builder.redis(r).build(),
        None => builder.build(),
    }
}

/// Latencies (ns) of `n` calls by `user`; counts the outcomes.
async fn round(engine: &Engine, user: &str, n: usize, ok: &mut usize) -> Vec<u64> {
    calls(engine, NullSink, user, n, ok).await
}

/// Latencies (ns) of `n` calls by `user` writing their events to `sink`.
async fn calls(
    engine: &Engine,
    sink: impl EventSink,
    user: &str,
    n: usize,
    ok: &mut usize,
) -> Vec<u64> {
    let ctx = UserContext::builder(user).build().expect("valid user");
    let d = engine.dispatcher().sink(sink).user(ctx);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let r = d.dispatch(ToolCall::new("noop", json!(i))).await;
        out.push(t.elapsed().as_nanos() as u64);
        *ok += usize::from(r.is_ok());
    }
    out
}

fn quantile(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q) as usize]
}

/// Latencies (ns) of `n` requests `cmd`, one at a time.
async fn requests(
    conn: &mut ::redis::aio::MultiplexedConnection,
    cmd: &::redis::Cmd,
    n: usize,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let answer: Result<::redis::Value, _> = cmd.query_async(conn).await;
        out.push(t.elapsed().as_nanos() as u64);
        assert!(answer.is_ok(), "{answer:?}");
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = arg("--redis").ok_or("usage: redis_cost --redis redis://HOST:PORT [--calls N]")?;
    let calls: usize = arg("--calls").map_or(Ok(2000), |c| c.parse())?;
    let config = || RedisConfig::default().prefix(format!("cost-{}", std::process::id()));
    let shared = Redis::connect(&url, config().local_precheck(false)).await?;
    let cluster = Redis::connect(
        &url,
        config().local_precheck(false).cluster_concurrency(1000),
    )
    .await?;
    let precheck = Redis::connect(&url, config().local_precheck(true)).await?;
    // Never reached, and still checked: Redis keeps a rate whose interval is at least
    // 1 µs (10 µs here), so every admission runs the rate's part of the script too.
    let plenty = Rate::per_second(100_000);
    let tight = Rate::per_minute(1);
    let (local, redis) = (engine(None, plenty), engine(Some(&shared), plenty));
    let redis_cluster = engine(Some(&cluster), plenty);
    let (shed_redis, shed_local) = (engine(Some(&shared), tight), engine(Some(&precheck), tight));
    let client = ::redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // The least a script on the server's clock costs: EVALSHA of one that reads TIME.
    let sha: String = ::redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('TIME')")
        .query_async(&mut conn)
        .await?;
    let (ping, time_script) = (::redis::cmd("PING"), {
        let mut c = ::redis::cmd("EVALSHA");
        c.arg(&sha).arg(0);
        c
    });
    // ping, local, redis, redis_cluster, shed_redis, shed_precheck, time_script
    let mut lat: [Vec<u64>; 7] = Default::default();
    let mut ok = [0usize; 7];
    // Requests to Redis per `redis` and `redis_cluster` call, counted by the handles:
    // those the call waits for, and the releases it does not wait for.
    let (mut waited, mut released, mut counted_calls) = (0u64, 0u64, 0u64);
    for r in 0..6 {
        // The first round warms up (connections, script load) and is not counted.
        let n = if r == 0 { 200 } else { calls / 5 };
        let ping_round = requests(&mut conn, &ping, n).await;
        ok[0] += n;
        let local_round = round(&local, "u", n, &mut ok[1]).await;
        let mut shared_rounds = Vec::new();
        for (i, (engine, handle)) in [(&redis, &shared), (&redis_cluster, &cluster)]
            .into_iter()
            .enumerate()
        {
            let before = handle.stats();
            let got = round(engine, "u", n, &mut ok[2 + i]).await;
            tokio::task::yield_now().await; // the last release goes out
            let after = handle.stats();
            if r > 0 {
                waited +=
                    (after.round_trips - after.releases) - (before.round_trips - before.releases);
                released += after.releases - before.releases;
                counted_calls += n as u64;
            }
            shared_rounds.push(got);
        }
        let [redis_round, cluster_round] =
            <[Vec<u64>; 2]>::try_from(shared_rounds).map_err(|_| "two shared rounds")?;
        let got = [
            ping_round,
            local_round,
            redis_round,
            cluster_round,
            round(&shed_redis, "over", n, &mut ok[4]).await,
            round(&shed_local, "over2", n, &mut ok[5]).await,
            requests(&mut conn, &time_script, n).await,
        ];
        if r > 0 {
            for (l, g) in lat.iter_mut().zip(got) {
                l.extend(g);
            }
        }
    }
    let names = [
        "ping",
        "local",
        "redis",
        "redis_cluster",
        "shed_redis",
        "shed_precheck",
        "time_script",
    ];
    let mut summary = Vec::new();
    for (name, l) in names.iter().zip(lat.iter_mut()) {
        let (p50, p99) = (quantile(l, 0.5), quantile(l, 0.99));
        println!("{name:>14}: p50 {p50:>8} ns  p99 {p99:>8} ns");
        summary.push((p50, p99));
    }
    let ping_p50 = summary[0].0;
    let vs_ping = |i: usize| summary[i].0 as f64 / ping_p50.max(1) as f64;
    // Every call of the first four succeeds; of the tight ones, at most the one a
    // minute the quota allows (per engine's first call) does.
    let counted = calls / 5 * 5;
    let fine = ok[..4].iter().all(|&n| n == counted + 200) && ok[4] <= 1 && ok[5] <= 1;
    let stats = shared.stats();
    let trips_per_call = waited as f64 / counted_calls.max(1) as f64;
    let releases_per_call = released as f64 / counted_calls.max(1) as f64;
    println!(
        "redis {:.2}x ping, with a cluster limit {:.2}x; {trips_per_call:.2} round trips a call waits for, {releases_per_call:.2} releases it does not; answers {}, failures {}; pre-check shed {} calls",
        vs_ping(2),
        vs_ping(3),
        stats.answers,
        stats.failures,
        precheck.stats().shed_locally
    );

    // The run log: the same calls writing to a run, in the process or in Redis.
    let (here, there) = (
        RunLog::new(RunLogConfig::default()),
        RunLog::redis(RunLogConfig::default(), &shared).await?,
    );
    let mut log_lat: [Vec<u64>; 3] = Default::default();
    let mut log_ok = [0usize; 2];
    for r in 0..6 {
        let n = if r == 0 { 200 } else { calls / 5 };
        let run = format!("run-{r}");
        let got_here = self::calls(&local, here.writer("u", &run), "u", n, &mut log_ok[0]).await;
        let w = there.writer("u", &run);
        let got_there = self::calls(&local, w.clone(), "u", n, &mut log_ok[1]).await;
        w.append(json!({"type": "flush"})).await?; // recorded after the calls' events
        let mut appends = Vec::with_capacity(n / 10);
        for _ in 0..n / 10 {
            let t = Instant::now();
            w.append(json!({"type": "note"})).await?;
            appends.push(t.elapsed().as_nanos() as u64);
        }
        if r > 0 {
            log_lat[0].extend(got_here);
            log_lat[1].extend(got_there);
            log_lat[2].extend(appends);
        }
    }
    let names = ["log_local", "log_redis", "append_redis"];
    let mut log_summary = Vec::new();
    for (name, l) in names.iter().zip(log_lat.iter_mut()) {
        let (p50, p99) = (quantile(l, 0.5), quantile(l, 0.99));
        println!("{name:>14}: p50 {p50:>8} ns  p99 {p99:>8} ns");
        log_summary.push((p50, p99));
    }
    let w = there.writer("u", "firehose");
    let ctx = UserContext::builder("u").build().expect("valid user");
    let d = local.dispatcher().sink(w.clone()).user(ctx);
    let before = shared.stats().log_appends;
    let t = Instant::now();
    const FRAMES: u64 = 20_000;
    let mut refused = 0u64;
    for i in 0..FRAMES {
        // The node's queue never waits: past its bound an event is refused.
        let update = event::AgentUpdate::Thinking(i.to_string());
        refused += u64::from(d.notify(update).await.is_err());
    }
    w.append(json!({"type": "last"})).await?; // after every frame queued before it
    let frames_per_s = (FRAMES + 1) as f64 / t.elapsed().as_secs_f64();
    println!("{:>14}: {frames_per_s:.0}", "frames_per_s");
    let stats = shared.stats();
    let log_fine = log_ok == [counted + 200; 2]
        && stats.log_failures == 0
        && stats.log_appends - before == FRAMES + 1 - refused
        && refused == 0;
    if !log_fine {
        eprintln!("run log: successes {log_ok:?}, {stats:?}");
    }
    let quiet = [&shared, &cluster, &precheck].iter().all(|h| {
        let s = h.stats();
        s.failures == 0 && s.errors == 0 && s.timeouts == 0
    });
    // One request waited for per admitted call (a stray keep-alive of the node's
    // listener may fall within a round), and at most one release (the releases of
    // calls that end together go in one request; a user's next admission carries
    // their last call's).
    let one_trip = (0.99..1.05).contains(&trips_per_call) && releases_per_call <= 1.0;
    if !one_trip {
        eprintln!("{trips_per_call:.3} round trips and {releases_per_call:.3} releases a call");
    }
    // Every lease taken was given back: none is left in Redis.
    let prefix = format!("cost-{}", std::process::id());
    let mut left = 0u64;
    for _ in 0..100 {
        left = 0;
        for key in [
            format!("{prefix}:u{{u}}:slots"),
            format!("{prefix}:global:slots"),
        ] {
            left += ::redis::cmd("ZCARD")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await?;
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if left > 0 {
        eprintln!("{left} leases left in Redis");
    }
    let verdict = if fine && log_fine && quiet && one_trip && left == 0 {
        "ok"
    } else {
        "FAILED"
    };
    if verdict != "ok" {
        eprintln!(
            "successes per variant: {ok:?} (expected {} for the first four, at most 1 for the others)",
            counted + 200
        );
    }
    println!(
        "RESULT ping_p50_ns={ping_p50} local_p50_ns={} local_p99_ns={} redis_p50_ns={} redis_p99_ns={} redis_vs_ping={:.2} redis_cluster_p50_ns={} redis_cluster_vs_ping={:.2} shed_redis_p50_ns={} shed_precheck_p50_ns={} time_script_p50_ns={} time_script_vs_ping={:.2} log_local_p50_ns={} log_redis_p50_ns={} log_redis_p99_ns={} append_redis_p50_ns={} append_redis_p99_ns={} frames_per_s={frames_per_s:.0} redis_round_trips_per_call={trips_per_call:.2} redis_releases_per_call={releases_per_call:.2} invariants={verdict}",
        summary[1].0,
        summary[1].1,
        summary[2].0,
        summary[2].1,
        vs_ping(2),
        summary[3].0,
        vs_ping(3),
        summary[4].0,
        summary[5].0,
        summary[6].0,
        vs_ping(6),
        log_summary[0].0,
        log_summary[1].0,
        log_summary[1].1,
        log_summary[2].0,
        log_summary[2].1
    );
    if verdict != "ok" {
        std::process::exit(1);
    }
    Ok(())
}
