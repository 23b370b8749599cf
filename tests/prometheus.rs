//! The Prometheus series (feature `prometheus`): the text parses in both formats, the
//! calls counted are exactly the calls made whatever their ending, no series carries a
//! user id, and the series are read from the engine without keeping it alive.
#![cfg(feature = "prometheus")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use serde_json::json;
use tool_dispatch::event::{Event, Status};
use tool_dispatch::prometheus::{self, UNKNOWN_TOOL, prometheus_client};
use tool_dispatch::*;

type PromRegistry = prometheus_client::registry::Registry;

// ------------------------------------------------------------------ the text, parsed

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A whole exposition, checked line by line as it is read.
#[derive(Debug, Default)]
struct Exposition {
    /// Family name → type, from the `# TYPE` lines.
    types: BTreeMap<String, String>,
    helps: BTreeSet<String>,
    samples: Vec<Sample>,
    eof: bool,
}

fn metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `{k="v",...}` → the labels, with escapes decoded; the rest of the line.
fn labels(line: &str, n: usize) -> (BTreeMap<String, String>, &str) {
    let mut out = BTreeMap::new();
    let mut rest = line;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return (out, r);
        }
        let (key, r) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("line {n}: a label without a value: {line}"));
        assert!(label_name(key), "line {n}: label name `{key}`");
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("line {n}: bad escape {other:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("line {n}: unterminated label value"),
            }
        };
        assert!(
            out.insert(key.to_owned(), value).is_none(),
            "line {n}: `{key}` twice"
        );
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        assert!(!e.eof, "line {n}: text after # EOF");
        if line == "# EOF" {
            e.eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("help text");
            assert!(e.helps.insert(name.to_owned()), "line {n}: HELP twice");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("a type");
            assert!(metric_name(name), "line {n}: `{name}`");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "line {n}: {kind}"
            );
            assert!(
                e.types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "line {n}: TYPE twice"
            );
            continue;
        }
        if line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "line {n}: unknown comment {line}");
        let end = line.find(['{', ' ']).expect("a value");
        let name = &line[..end];
        assert!(metric_name(name), "line {n}: `{name}`");
        let (mut labels, rest) = match line[end..].strip_prefix('{') {
            Some(r) => labels(r, n),
            None => (BTreeMap::new(), &line[end..]),
        };
        // `1.0` in OpenMetrics is `1` in the 0.0.4 format: one spelling for both.
        if let Some(le) = labels.get_mut("le").filter(|le| *le != "+Inf") {
            *le = le.parse::<f64>().expect("a number").to_string();
        }
        let value = rest.trim();
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("line {n}: value {v}")),
        };
        e.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    e
}

impl Exposition {
    /// The samples of `name` (exact sample name).
    fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the sample `name` whose labels include `with`.
    fn value(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .series(name)
            .into_iter()
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .collect();
        assert!(found.len() <= 1, "{name} {with:?}: {found:?}");
        found.first().map(|s| s.value)
    }

    /// Every sample belongs to a family with a TYPE and a HELP (the family of
    /// `x_total` is `x` in OpenMetrics, `x_total` in the 0.0.4 format).
    fn check_families(&self) {
        for s in &self.samples {
            let family = [&s.name[..]]
                .into_iter()
                .chain(
                    ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .filter_map(|suffix| s.name.strip_suffix(suffix)),
                )
                .find(|f| self.types.contains_key(*f))
                .unwrap_or_else(|| panic!("{} has no TYPE", s.name));
            assert!(self.helps.contains(family), "{family} has no HELP");
            if self.types[family] == "counter" {
                assert!(s.name.ends_with("_total"), "counter {}", s.name);
            }
        }
    }

    /// Every histogram's buckets grow, end at `+Inf`, and that bucket is the count.
    fn check_histograms(&self) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let mut by_series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> =
                BTreeMap::new();
            for s in self.series(&format!("{family}_bucket")) {
                let mut labels = s.labels.clone();
                let le = labels.remove("le").expect("le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                by_series.entry(labels).or_default().push((le, s.value));
            }
            assert!(!by_series.is_empty(), "{family} has no buckets");
            for (labels, buckets) in by_series {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
                );
                let (last_le, last) = *buckets.last().unwrap();
                assert_eq!(last_le, f64::INFINITY);
                let with: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                assert_eq!(self.value(&format!("{family}_count"), &with), Some(last));
                assert!(self.value(&format!("{family}_sum"), &with).is_some());
            }
        }
    }
}

/// The registry rendered for Prometheus (OpenMetrics) and for promtool (0.0.4), each
/// parsed and checked; the OpenMetrics one is returned.
fn scrape(registry: &PromRegistry) -> Exposition {
    let om =
        prometheus::encode(registry, Some("application/openmetrics-text;version=1.0.0")).unwrap();
    assert_eq!(om.content_type, prometheus::OPENMETRICS_CONTENT_TYPE);
    let classic = prometheus::encode(registry, Some("text/plain")).unwrap();
    assert!(
        classic
            .content_type
            .starts_with("text/plain; version=0.0.4")
    );
    let (om, classic) = (parse(&om.body), parse(&classic.body));
    assert!(om.eof && !classic.eof);
    for e in [&om, &classic] {
        e.check_families();
        e.check_histograms();
    }
    // The same samples either way.
    let key = |e: &Exposition| -> BTreeSet<String> {
        e.samples
            .iter()
            .map(|s| format!("{} {:?} {}", s.name, s.labels, s.value))
            .collect()
    };
    let (a, b) = (key(&om), key(&classic));
    let only: Vec<&String> = a.symmetric_difference(&b).take(6).collect();
    assert!(only.is_empty(), "in one format only: {only:?}");
    om
}

// ------------------------------------------------------------------ the engine

/// Tools for every ending: `ok`, `fail`, `boom` (panics), `slow` (past its 10 ms
/// timeout), `hold` (until cancelled), `admin` (needs a scope nobody has) and `send`
/// (needs approval, within 50 ms).
fn engine() -> Engine {
    let ok = tool_fn("ok", "Returns its number.", |n: u64, _cx| async move {
        Ok::<_, ToolError>(n)
    });
    let fail = tool_fn("fail", "Fails.", |_: u64, _cx| async move {
        Err::<u64, _>(ToolError::new("nope"))
    });
    let boom = tool_fn("boom", "Panics.", |_: u64, _cx| async move {
        if true {
            panic!("boom");
        }
        Ok::<_, ToolError>(0u64)
    });
    let slow = tool_fn(
        "slow",
        "Sleeps past its timeout.",
        |_: u64, _cx| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, ToolError>(0u64)
        },
    )
    .settings(ToolSettings::new().timeout(Duration::from_millis(10)));
    let hold = tool_fn("hold", "Waits until cancelled.", |_: u64, _cx| async move {
        std::future::pending::<()>().await;
        Ok::<_, ToolError>(0u64)
    });
    let admin = tool_fn("admin", "Needs a scope.", |_: u64, _cx| async move {
        Ok::<_, ToolError>(0u64)
    })
    .settings(ToolSettings::new().scope("admin"));
    let send = tool_fn("send", "Needs approval.", |_: u64, _cx| async move {
        Ok::<_, ToolError>(0u64)
    })
    .settings(
        ToolSettings::new()
            .requires_approval("sends mail")
            .approval_wait(ApprovalWait::Within(Duration::from_millis(50))),
    );
    let registry = Registry::builder()
        .tool(ok)
        .tool(fail)
        .tool(boom)
        .tool(slow)
        .tool(hold)
        .tool(admin)
        .tool(send)
        .build()
        .unwrap();
    let limits = Limits::default()
        .max_wait(Duration::ZERO)
        .per_user_with(|ctx: &UserContext| match ctx.user_id() {
            "eve" => UserLimits {
                concurrency: 4,
                rate: Some(Rate::per_minute(1)),
            },
            "carol" => no_rate(1),
            _ => no_rate(8),
        });
    Engine::builder(registry).limits(limits).build()
}

/// What the callers saw: calls per (tool, status).
#[derive(Default)]
struct Made(BTreeMap<(String, &'static str), u64>);

impl Made {
    fn add(&mut self, tool: &str, r: &Result<ToolOutput, DispatchError>) {
        let status = match r {
            Ok(_) => Status::Success,
            Err(e) => e.status(),
        };
        self.count(tool, status);
    }

    fn count(&mut self, tool: &str, status: Status) {
        *self
            .0
            .entry((tool.to_owned(), status.as_str()))
            .or_default() += 1;
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

async fn waiting_for_approval(sink: &RecordingSink, n: usize) {
    while sink
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ToolApprovalRequired(_)))
        .count()
        < n
    {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn calls_total_summed_over_its_labels_is_every_call_made_whatever_its_ending() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    let mut made = Made::default();
    let (alice, alice_sink) = recorded(&engine, user("alice"));

    for (tool, args) in [
        ("ok", json!(1)),
        ("ok", json!("not a number")),
        ("fail", json!(1)),
        ("boom", json!(1)),
        ("slow", json!(1)),
        ("admin", json!(1)),
        ("no_such_tool", json!(1)),
    ] {
        let r = alice.dispatch(ToolCall::new(tool, args)).await;
        let shown = if tool == "no_such_tool" {
            UNKNOWN_TOOL
        } else {
            tool
        };
        made.add(shown, &r);
    }

    // Approval: one rejected, one left to expire.
    let rejected = spawn(&alice, ToolCall::new("send", json!(1)).with_id("s1"));
    waiting_for_approval(&alice_sink, 1).await;
    engine
        .resolve_approval("alice", "s1", Verdict::Reject { message: None })
        .await
        .unwrap();
    made.add("send", &rejected.await.unwrap());
    let expired = spawn(&alice, ToolCall::new("send", json!(1)));
    waiting_for_approval(&alice_sink, 2).await;
    tokio::time::advance(Duration::from_millis(60)).await;
    made.add("send", &expired.await.unwrap());

    // Rate limited: eve may make one call a minute.
    let (eve, eve_sink) = recorded(&engine, user("eve"));
    for _ in 0..2 {
        made.add("ok", &eve.dispatch(ToolCall::new("ok", json!(1))).await);
    }

    // Busy: carol's one slot is held; then her held call is cancelled.
    let (carol, carol_sink) = recorded(&engine, user("carol"));
    let held = spawn(&carol, ToolCall::new("hold", json!(1)));
    settle().await;
    made.add("ok", &carol.dispatch(ToolCall::new("ok", json!(1))).await);
    assert_eq!(engine.cancel_user("carol").here, 1);
    made.add("hold", &held.await.unwrap());

    // Dropped by its caller after one poll: cancelled, though nobody sees a result.
    let mut dropped = alice.dispatch(ToolCall::new("hold", json!(1)));
    assert!(poll_once(&mut dropped).await.is_pending());
    drop(dropped);
    made.count("hold", Status::Cancelled);

    // Undelivered: bob's socket is gone, so his call never runs.
    let bob_sink = RecordingSink::new();
    bob_sink.close();
    let bob = engine.dispatcher().sink(bob_sink).user(user("bob"));
    made.add("ok", &bob.dispatch(ToolCall::new("ok", json!(1))).await);

    // Unavailable: the engine is shutting down.
    engine.shutdown(Duration::from_secs(1)).await;
    made.add("ok", &alice.dispatch(ToolCall::new("ok", json!(1))).await);
    made.add(
        UNKNOWN_TOOL,
        &alice
            .dispatch(ToolCall::new("no_such_tool", json!(1)))
            .await,
    );

    let statuses: BTreeSet<&str> = made.0.keys().map(|(_, s)| *s).collect();
    for s in Status::ALL {
        assert!(
            statuses.contains(s.as_str()),
            "{s} was never made: {statuses:?}"
        );
    }

    let e = scrape(&registry);
    let calls = e.series("tool_dispatch_calls_total");
    let sum: f64 = calls.iter().map(|s| s.value).sum();
    assert_eq!(sum as u64, made.total(), "every call, counted once");
    assert_eq!(engine.metrics().total, made.total());
    for s in &calls {
        let key = (s.labels["tool"].clone(), s.labels["status"].as_str());
        let expected = made.0.get(&(key.0.clone(), key.1)).copied().unwrap_or(0);
        assert_eq!(s.value as u64, expected, "{key:?}");
        assert_eq!(s.labels.len(), 2, "{s:?}");
    }
    // Every tool and every status has its series, from zero.
    let tools = engine.registry().len() + 1;
    assert_eq!(calls.len(), tools * Status::ALL.len());
    // The histogram counts the same calls, per tool.
    let mut per_tool: BTreeMap<String, u64> = BTreeMap::new();
    for ((tool, _), n) in &made.0 {
        *per_tool.entry(tool.clone()).or_default() += n;
    }
    for s in e.series("tool_dispatch_call_duration_seconds_count") {
        let tool = &s.labels["tool"];
        assert_eq!(
            s.value as u64,
            per_tool.get(tool).copied().unwrap_or(0),
            "{tool}"
        );
    }
    // The slow call ran its 10 ms: its bucket is above 5 ms.
    let slow_fast = e
        .value(
            "tool_dispatch_call_duration_seconds_bucket",
            &[("tool", "slow"), ("le", "0.005")],
        )
        .unwrap();
    assert_eq!(slow_fast, 0.0);
    assert_eq!(e.value("tool_dispatch_calls_in_flight", &[]), Some(0.0));
    assert_eq!(
        e.value("tool_dispatch_approvals_total", &[("outcome", "rejected")]),
        Some(1.0)
    );
    assert_eq!(
        e.value("tool_dispatch_approvals_total", &[("outcome", "expired")]),
        Some(1.0)
    );
    // Bob's tool_executing found his sink closed; every other event was taken.
    assert_eq!(
        e.value(
            "tool_dispatch_events_undelivered_total",
            &[("reason", "closed")]
        ),
        Some(1.0)
    );
    let taken = [&alice_sink, &eve_sink, &carol_sink]
        .iter()
        .map(|s| s.events().len())
        .sum::<usize>();
    assert_eq!(
        e.value("tool_dispatch_events_delivered_total", &[]),
        Some(taken as f64)
    );
}

#[tokio::test(start_paused = true)]
async fn no_series_carries_a_user_id_or_a_name_the_caller_made_up() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    for id in ["user-7f3a9c", "mallory\"},x=\"1"] {
        let (d, _) = recorded(&engine, user(id));
        d.dispatch(ToolCall::new("ok", json!(1))).await.unwrap();
        let _ = d
            .dispatch(ToolCall::new("tool_named_by_an_attacker_4411", json!(1)))
            .await;
    }
    let om = prometheus::encode(&registry, Some("application/openmetrics-text")).unwrap();
    for secret in ["user-7f3a9c", "mallory", "attacker_4411"] {
        assert!(!om.body.contains(secret), "{secret} leaked");
    }
    let e = scrape(&registry);
    let names: BTreeSet<&str> = e
        .samples
        .iter()
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["le", "outcome", "reason", "status", "tool"])
    );
    assert_eq!(
        e.value(
            "tool_dispatch_calls_total",
            &[("tool", UNKNOWN_TOOL), ("status", "unknown_tool")]
        ),
        Some(2.0)
    );
}

#[tokio::test(start_paused = true)]
async fn gauges_follow_calls_in_flight_and_approvals_waiting() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    let (alice, sink) = recorded(&engine, user("alice"));
    let held = spawn(&alice, ToolCall::new("hold", json!(1)));
    let asking = spawn(&alice, ToolCall::new("send", json!(1)));
    waiting_for_approval(&sink, 1).await;
    let e = scrape(&registry);
    assert_eq!(e.value("tool_dispatch_calls_in_flight", &[]), Some(2.0));
    assert_eq!(e.value("tool_dispatch_approvals_waiting", &[]), Some(1.0));
    assert_eq!(e.value("tool_dispatch_users_tracked", &[]), Some(1.0));
    engine.cancel_user("alice");
    assert!(held.await.unwrap().is_err() && asking.await.unwrap().is_err());
    let e = scrape(&registry);
    assert_eq!(e.value("tool_dispatch_calls_in_flight", &[]), Some(0.0));
    assert_eq!(e.value("tool_dispatch_approvals_waiting", &[]), Some(0.0));
    assert_eq!(
        e.value("tool_dispatch_approvals_total", &[("outcome", "withdrawn")]),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_registry_does_not_keep_the_engine_alive() {
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Witness(Arc<AtomicUsize>);
    impl Drop for Witness {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let witness = Witness(Arc::clone(&dropped));
    let tool = tool_fn("ok", "Holds the witness.", move |n: u64, _cx| {
        let _held = &witness;
        async move { Ok::<_, ToolError>(n) }
    });
    let engine = Engine::builder(Registry::builder().tool(tool).build().unwrap()).build();
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    assert!(
        !scrape(&registry)
            .series("tool_dispatch_calls_total")
            .is_empty()
    );
    drop(engine);
    assert_eq!(dropped.load(Ordering::SeqCst), 1, "the engine is gone");
    assert!(scrape(&registry).samples.is_empty());
}

#[tokio::test]
async fn the_run_log_registers_its_own_series_in_the_same_registry() {
    let engine = engine();
    let runs = RunLog::new(RunLogConfig::default());
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    runs.register_metrics(&mut registry);
    let alice = engine
        .dispatcher()
        .sink(runs.writer("alice", "run_1"))
        .user(user("alice"));
    alice.dispatch(ToolCall::new("ok", json!(1))).await.unwrap();
    let e = scrape(&registry);
    let stats = runs.stats();
    assert_eq!(stats.runs, 1);
    assert_eq!(e.value("tool_dispatch_run_log_runs", &[]), Some(1.0));
    assert_eq!(
        e.value("tool_dispatch_run_log_bytes", &[]),
        Some(stats.bytes as f64)
    );
    assert!(stats.bytes > 0);
    assert_eq!(
        e.value(
            "tool_dispatch_calls_total",
            &[("tool", "ok"), ("status", "success")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_opt_in_user_label_counts_by_the_value_the_application_bounds() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine.register_metrics(&mut registry);
    engine
        .register_metrics_by_user(&mut registry, "tenant", |u| u.metadata("tenant"))
        .unwrap();
    let in_tenant = |id: &str, tenant: &str| {
        UserContext::builder(id)
            .metadata("tenant", tenant)
            .build()
            .unwrap()
    };
    for (ctx, tool) in [
        (in_tenant("alice", "acme"), "ok"),
        (in_tenant("anna", "acme"), "ok"),
        (in_tenant("anna", "acme"), "fail"),
        (in_tenant("bob", "globex"), "ok"),
        (in_tenant("eve", &"x".repeat(200)), "ok"), // too long: _OTHER
        (user("nobody"), "ok"),                     // no tenant: not in the family
        (in_tenant("zed", "acme"), "no_such_tool"),
    ] {
        let (d, _) = recorded(&engine, ctx);
        let _ = d.dispatch(ToolCall::new(tool, json!(1))).await;
    }
    let e = scrape(&registry);
    let by = |tenant: &str, tool: &str, status: &str| {
        e.value(
            "tool_dispatch_user_calls_total",
            &[("tenant", tenant), ("tool", tool), ("status", status)],
        )
    };
    assert_eq!(by("acme", "ok", "success"), Some(2.0));
    assert_eq!(by("acme", "fail", "error"), Some(1.0));
    assert_eq!(by("acme", UNKNOWN_TOOL, "unknown_tool"), Some(1.0));
    assert_eq!(by("globex", "ok", "success"), Some(1.0));
    assert_eq!(by("_OTHER", "ok", "success"), Some(1.0));
    let labelled: f64 = e
        .series("tool_dispatch_user_calls_total")
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(labelled, 6.0, "every call with a tenant, once");
    // The plain family still has no user label, and counts all seven calls.
    let all: f64 = e
        .series("tool_dispatch_calls_total")
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(all, 7.0);
    // No user id anywhere, only the tenants.
    let om = prometheus::encode(&registry, Some("application/openmetrics-text")).unwrap();
    for id in ["alice", "anna", "bob", "nobody", "zed"] {
        assert!(!om.body.contains(id), "{id} leaked");
    }
}

#[tokio::test]
async fn a_user_label_is_checked_and_taken_once() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    for (bad, expected) in [
        (
            "1tenant",
            prometheus::UserLabelError::InvalidName("1tenant".into()),
        ),
        (
            "__name",
            prometheus::UserLabelError::InvalidName("__name".into()),
        ),
        ("a-b", prometheus::UserLabelError::InvalidName("a-b".into())),
        ("tool", prometheus::UserLabelError::Reserved("tool".into())),
    ] {
        assert_eq!(
            engine.register_metrics_by_user(&mut registry, bad, |u| Some(u.user_id())),
            Err(expected)
        );
    }
    engine
        .register_metrics_by_user(&mut registry, "plan", |u| u.metadata("plan"))
        .unwrap();
    assert_eq!(
        engine.register_metrics_by_user(&mut registry, "tier", |u| u.metadata("tier")),
        Err(prometheus::UserLabelError::AlreadyCounted)
    );
}

#[tokio::test]
async fn a_user_label_hook_that_panics_costs_its_label_not_the_call() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine
        .register_metrics_by_user(&mut registry, "plan", |u| {
            if u.user_id() == "mallory" {
                panic!("hostile hook");
            }
            u.metadata("plan")
        })
        .unwrap();
    let (d, sink) = recorded(&engine, user("mallory"));
    let out = d.dispatch(ToolCall::new("ok", json!(5))).await.unwrap();
    assert_eq!(out.value, json!(5));
    assert_eq!(completed(&sink, &out.call_id).status, Status::Success);
    let e = scrape(&registry);
    assert_eq!(
        e.value(
            "tool_dispatch_user_calls_total",
            &[("plan", "_OTHER"), ("tool", "ok"), ("status", "success")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn past_a_thousand_values_the_rest_count_under_other() {
    let engine = engine();
    let mut registry = PromRegistry::default();
    engine
        .register_metrics_by_user(&mut registry, "user", |u| Some(u.user_id()))
        .unwrap();
    for i in 0..1010 {
        let (d, _) = recorded(&engine, user(&format!("u{i}")));
        d.dispatch(ToolCall::new("ok", json!(1))).await.unwrap();
    }
    let e = scrape(&registry);
    let series = e.series("tool_dispatch_user_calls_total");
    assert_eq!(series.len(), 1001, "1,000 values and _OTHER");
    assert_eq!(
        e.value(
            "tool_dispatch_user_calls_total",
            &[("user", "_OTHER"), ("tool", "ok"), ("status", "success")]
        ),
        Some(10.0)
    );
}

/// A call dropped while its caller's thread unwinds ends while that thread panics; a
/// hook that panics then too is a panic during a panic, so this runs in a child
/// process: the hook's panic is contained and the call counts under `_OTHER`.
#[test]
fn a_call_dropped_while_its_thread_unwinds_never_asks_the_hook() {
    if !in_child("a_call_dropped_while_its_thread_unwinds_never_asks_the_hook") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine = engine();
        let mut registry = PromRegistry::default();
        engine
            .register_metrics_by_user(&mut registry, "plan", |_| panic!("hostile hook"))
            .unwrap();
        let (d, _) = recorded(&engine, user("alice"));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut call = d.dispatch(ToolCall::new("hold", json!(1)));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                call.as_mut().poll(&mut cx).is_pending(),
                "the call is in flight"
            );
            panic!("the caller panics with its call in flight");
        }));
        assert!(unwound.is_err());
        assert_eq!(engine.active(), 0);
        let e = scrape(&registry);
        assert_eq!(
            e.value(
                "tool_dispatch_user_calls_total",
                &[
                    ("plan", "_OTHER"),
                    ("tool", "hold"),
                    ("status", "cancelled")
                ]
            ),
            Some(1.0)
        );
    });
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn the_websocket_session_registers_its_series_read_from_its_counters() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (addr, server) = common::ws::start().await;
    let mut registry = PromRegistry::default();
    server.register_metrics(&mut registry);
    let (mut ws, _ready) = common::ws::connect_ready(addr, "alice-token").await;
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(common::ws::recv(&mut ws).await["type"], "error");
    let resume = json!({"type": "resume", "run_id": "nope", "after_seq": 0});
    ws.send(Message::text(resume.to_string())).await.unwrap();
    let frame = common::ws::recv(&mut ws).await;
    assert_eq!(frame["type"], "resync_required", "{frame}");
    let e = scrape(&registry);
    let stats = server.stats();
    assert_eq!((stats.sessions_open, stats.sessions), (1, 1), "{stats:?}");
    assert_eq!(e.value("tool_dispatch_ws_sessions_open", &[]), Some(1.0));
    assert_eq!(e.value("tool_dispatch_ws_sessions_total", &[]), Some(1.0));
    assert_eq!(e.value("tool_dispatch_ws_messages_total", &[]), Some(2.0));
    assert_eq!(
        e.value("tool_dispatch_ws_error_frames_total", &[]),
        Some(1.0)
    );
    assert_eq!(e.value("tool_dispatch_ws_resumes_total", &[]), Some(0.0));
    let resyncs = |reason| e.value("tool_dispatch_ws_resyncs_total", &[("reason", reason)]);
    assert_eq!(resyncs("unknown_run"), Some(1.0));
    assert_eq!(resyncs("truncated"), Some(0.0));
    for reason in ["not_reading", "idle", "protocol"] {
        let closed = e.value("tool_dispatch_ws_closed_total", &[("reason", reason)]);
        assert_eq!(closed, Some(0.0), "{reason}");
    }
    // The session's series sit beside the engine's in one registry.
    server.engine().register_metrics(&mut registry);
    let e = scrape(&registry);
    assert!(!e.series("tool_dispatch_calls_total").is_empty());
    assert_eq!(e.value("tool_dispatch_ws_sessions_total", &[]), Some(1.0));
}

#[cfg(feature = "mcp")]
#[tokio::test]
async fn the_mcp_server_registers_its_series_read_from_its_counters() {
    use common::mcp::{Raw, engine, serve};
    use tool_dispatch::mcp::McpServer;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = McpServer::per_request(engine(&gate, Duration::from_secs(60)));
    let mut registry = PromRegistry::default();
    server.register_metrics(&mut registry);
    let raw = Raw::new(serve(server.clone()).await);
    let session = raw.session("alice-token").await;
    let unknown = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/frobnicate", "params": {}});
    let answer = raw
        .post("alice-token", Some(&session), &unknown.to_string())
        .whole()
        .await;
    assert!(answer.body.contains("-32601"), "{answer:?}");
    // Bob names alice's session: refused as unknown, and counted.
    let list = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "params": {}});
    let foreign = raw
        .post("bob-token", Some(&session), &list.to_string())
        .whole()
        .await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let e = scrape(&registry);
    let stats = server.stats();
    assert_eq!(stats.sessions_open, 1, "{stats:?}");
    assert_eq!(e.value("tool_dispatch_mcp_sessions_open", &[]), Some(1.0));
    assert_eq!(e.value("tool_dispatch_mcp_sessions_total", &[]), Some(1.0));
    let requests = |method| e.value("tool_dispatch_mcp_requests_total", &[("method", method)]);
    assert_eq!(
        requests("initialize"),
        Some(stats.requests("initialize") as f64)
    );
    assert_eq!(requests("initialize"), Some(1.0));
    assert_eq!(requests("other"), Some(1.0));
    let errors = |code| e.value("tool_dispatch_mcp_errors_total", &[("code", code)]);
    assert_eq!(errors("-32601"), Some(1.0));
    assert_eq!(errors("-32602"), Some(0.0));
    let refused = |reason| e.value("tool_dispatch_mcp_refused_total", &[("reason", reason)]);
    assert_eq!(refused("foreign_session"), Some(1.0));
    assert_eq!(refused("duplicate_id"), Some(0.0));
    let asked = e.value(
        "tool_dispatch_mcp_elicitations_total",
        &[("event", "asked")],
    );
    assert_eq!(asked, Some(0.0));
}
