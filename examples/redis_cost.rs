//! What sharing the rate limit through Redis costs per call, measured side by side in
//! one run against a Redis on loopback.
//!
//! ```text
//! redis-server --port 6390 --save '' &
//! cargo run --release --example redis_cost --features redis -- --redis redis://127.0.0.1:6390
//! ```
//!
//! Four variants, interleaved in rounds so that drift hits them alike, each a no-op
//! tool called `--calls` times per round by one user:
//!
//! 1. `local`: limits kept in the process (the default);
//! 2. `redis`: the user's rate and a concurrency lease in Redis (two `EVALSHA` round
//!    trips a call; the lease's release is sent without waiting);
//! 3. `shed_redis`: a user far over the quota, every call refused by Redis;
//! 4. `shed_precheck`: the same user with the local pre-check on: refused without a
//!    round trip.
//!
//! Then the run log, with the same no-op call writing its events to a run:
//!
//! 5. `log_local`: into the process's own [`RunLog`];
//! 6. `log_redis`: into a [`RunLog::redis`] (the sink queues, a batch per round trip);
//! 7. `append_redis`: one awaited `append` to the Redis log (recorded, seq returned),
//!    with nothing queued before it;
//! 8. `frames_per_s`: 20,000 events queued through the sink, until the last is in
//!    Redis.
//!
//! And, as the yardstick for all of them, a bare `PING` round trip (`ping`).
//!
//! The last line is `RESULT ping_p50_ns=.. local_p50_ns=.. local_p99_ns=.. redis_p50_ns=..
//! redis_p99_ns=.. shed_redis_p50_ns=.. shed_precheck_p50_ns=.. log_local_p50_ns=..
//! log_redis_p50_ns=.. log_redis_p99_ns=.. append_redis_p50_ns=..
//! append_redis_p99_ns=.. frames_per_s=.. redis_round_trips_per_call=..
//! invariants=ok|FAILED` (the requests each `redis` call makes, its lease's release
//! included, as the handle's `RedisStats::round_trips` counts them).

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = arg("--redis").ok_or("usage: redis_cost --redis redis://HOST:PORT [--calls N]")?;
    let calls: usize = arg("--calls").map_or(Ok(2000), |c| c.parse())?;
    let config = || RedisConfig::default().prefix(format!("cost-{}", std::process::id()));
    let shared = Redis::connect(&url, config().local_precheck(false)).await?;
    let precheck = Redis::connect(&url, config().local_precheck(true)).await?;
    let plenty = Rate::per_second(1_000_000_000);
    let tight = Rate::per_minute(1);
    let (local, redis) = (engine(None, plenty), engine(Some(&shared), plenty));
    let (shed_redis, shed_local) = (engine(Some(&shared), tight), engine(Some(&precheck), tight));
    let mut lat: [Vec<u64>; 4] = Default::default();
    let mut ok = [0usize; 4];
    // Requests to Redis per `redis` call (the lease's release included, though the
    // call does not wait for it), counted by the handle.
    let (mut trips, mut trip_calls) = (0u64, 0u64);
    for r in 0..6 {
        // The first round warms up (connections, script load) and is not counted.
        let n = if r == 0 { 200 } else { calls / 5 };
        let local_round = round(&local, "u", n, &mut ok[0]).await;
        let before = shared.stats().round_trips;
        let redis_round = round(&redis, "u", n, &mut ok[1]).await;
        tokio::task::yield_now().await; // the last release goes out
        if r > 0 {
            trips += shared.stats().round_trips - before;
            trip_calls += n as u64;
        }
        let got = [
            local_round,
            redis_round,
            round(&shed_redis, "over", n, &mut ok[2]).await,
            round(&shed_local, "over2", n, &mut ok[3]).await,
        ];
        if r > 0 {
            for (l, g) in lat.iter_mut().zip(got) {
                l.extend(g);
            }
        }
    }
    // The loopback round trip itself, measured between the same rounds' conditions.
    let client = ::redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut pings = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let _: String = ::redis::cmd("PING").query_async(&mut conn).await?;
        pings.push(t.elapsed().as_nanos() as u64);
    }
    let ping_p50 = quantile(&mut pings, 0.5);
    println!(
        "{:>14}: p50 {ping_p50:>8} ns  p99 {:>8} ns",
        "ping",
        quantile(&mut pings, 0.99)
    );
    let names = ["local", "redis", "shed_redis", "shed_precheck"];
    let mut summary = Vec::new();
    for (name, l) in names.iter().zip(lat.iter_mut()) {
        let (p50, p99) = (quantile(l, 0.5), quantile(l, 0.99));
        println!("{name:>14}: p50 {p50:>8} ns  p99 {p99:>8} ns");
        summary.push((p50, p99));
    }
    // Every call of the first two succeeds; of the tight ones, at most the one a
    // minute the quota allows (per engine's first call) does.
    let counted = calls / 5 * 5;
    let fine = ok[0] == counted + 200 && ok[1] == counted + 200 && ok[2] <= 1 && ok[3] <= 1;
    let stats = shared.stats();
    let trips_per_call = trips as f64 / trip_calls.max(1) as f64;
    println!(
        "redis answers {}, failures {}, {trips_per_call:.2} round trips a call; pre-check shed {} calls",
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
    let quiet = stats.failures == 0 && stats.errors == 0 && stats.timeouts == 0;
    let verdict = if fine && log_fine && quiet {
        "ok"
    } else {
        "FAILED"
    };
    if verdict != "ok" {
        eprintln!(
            "successes per variant: {ok:?} (expected {} for the first two, at most 1 for the others)",
            counted + 200
        );
    }
    println!(
        "RESULT ping_p50_ns={ping_p50} local_p50_ns={} local_p99_ns={} redis_p50_ns={} redis_p99_ns={} shed_redis_p50_ns={} shed_precheck_p50_ns={} log_local_p50_ns={} log_redis_p50_ns={} log_redis_p99_ns={} append_redis_p50_ns={} append_redis_p99_ns={} frames_per_s={frames_per_s:.0} redis_round_trips_per_call={trips_per_call:.2} invariants={verdict}",
        summary[0].0,
        summary[0].1,
        summary[1].0,
        summary[1].1,
        summary[2].0,
        summary[3].0,
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
