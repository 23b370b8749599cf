//! One run, every door: two session servers ("nodes") sharing one Redis keep a run,
//! the rate, cancellation and approvals whole across them; a call made by the user's
//! MCP client shows up in her run stream, waits for her approval there, and Stop on
//! her page ends it.
#![cfg(feature = "axum")]

mod common;

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_redis_share_runs_rate_cancellation_and_approvals() {
    use common::redis_server::RedisServer;
    use common::ws::*;
    use serde_json::json;
    use std::time::Duration;
    use tool_dispatch::redis::{Redis, RedisConfig};
    use tool_dispatch::ws::WsServer;
    use tool_dispatch::{Engine, Limits, Rate, RunLog, RunLogConfig, UserLimits};

    let Some(redis_server) = RedisServer::start() else {
        return;
    };
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let config = RedisConfig::default().prefix("ws-test");
        let redis = Redis::connect(&redis_server.url(), config).await.unwrap();
        let limits = Limits::default().per_user(UserLimits {
            concurrency: 10,
            rate: Some(Rate::per_minute(5)),
        });
        let engine = Engine::builder(registry())
            .limits(limits)
            .redis(&redis)
            .build();
        let runs = RunLog::redis(RunLogConfig::default(), &redis)
            .await
            .unwrap();
        // A short grace period: a run its client left on A and resumed on B must not
        // be cancelled by A.
        let server = WsServer::new(engine)
            .node(name)
            .run_log(runs)
            .grace(Duration::from_millis(300));
        nodes.push(serve(server).await);
    }
    // alice's run on A, dropped after its first progress, resumed on B past A's
    // grace period: every later frame once, in order, and the call goes on.
    let (mut first, ready) = connect_ready(nodes[0], "alice-token").await;
    let slow = json!({"steps": 6, "step_ms": 150});
    send(&mut first, openai(&[("call_moved", "slow_task", slow)])).await;
    let before = until(&mut first, |m| m["type"] == "tool_progress").await;
    let last = before.last().unwrap()["seq"].as_u64().unwrap();
    drop(first);
    let (mut moved, ready_b) = connect_ready(nodes[1], "alice-token").await;
    assert_eq!(
        ready_b["epoch"], ready["epoch"],
        "one epoch for the cluster"
    );
    let resume = json!({"type": "resume", "run_id": ready["run_id"], "after_seq": last,
                        "epoch": ready["epoch"]});
    send(&mut moved, resume).await;
    assert_eq!(recv(&mut moved).await["type"], "resumed");
    let after = until_results(&mut moved).await;
    let got: Vec<u64> = after.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(
        got,
        (last + 1..last + 1 + got.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(completed(&after, "call_moved")["status"], "success");
    drop(moved);

    // Alternating nodes, quota 5 a minute, slow_task was the first: four more
    // succeed; the 6th is refused.
    let (mut on_a, ready_a) = connect_ready(nodes[0], "alice-token").await;
    let (mut on_b, ready_b) = connect_ready(nodes[1], "alice-token").await;
    assert_eq!(
        (ready_a["node"].as_str(), ready_b["node"].as_str()),
        (Some("a"), Some("b"))
    );
    let mut statuses = vec!["success".to_owned()];
    for i in 1..6 {
        let ws = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let id = format!("call_q{i}");
        send(
            ws,
            openai(&[(&id, "get_weather", json!({"city": "Paris"}))]),
        )
        .await;
        let msgs = until_results(ws).await;
        statuses.push(completed(&msgs, &id)["status"].as_str().unwrap().to_owned());
    }
    let expected = [
        "success",
        "success",
        "success",
        "success",
        "success",
        "rate_limited",
    ];
    assert_eq!(statuses, expected);

    // bob's call waits for approval on A; he answers on B; it runs on A.
    let (mut bob_a, _) = connect_ready(nodes[0], "bob-token").await;
    let (mut bob_b, _) = connect_ready(nodes[1], "bob-token").await;
    send(&mut bob_a, email("e_cross", "ann@example.com")).await;
    until(&mut bob_a, |m| m["type"] == "tool_approval_required").await;
    let approve =
        json!({"type": "tool_approval_decision", "call_id": "e_cross", "decision": "approve"});
    send(&mut bob_b, approve).await;
    assert_eq!(recv(&mut bob_b).await["type"], "decision_recorded");
    let rest = until_results(&mut bob_a).await;
    assert_eq!(completed(&rest, "e_cross")["status"], "success");

    // bob's long call on A; "stop" pressed on B reaches it.
    let (mut bob_a2, ready) = connect_ready(nodes[0], "bob-token").await;
    send(&mut bob_a2, forever("call_far")).await;
    until(&mut bob_a2, |m| m["type"] == "tool_executing").await;
    send(
        &mut bob_b,
        json!({"type": "cancel", "run_id": ready["run_id"]}),
    )
    .await;
    let told = recv(&mut bob_b).await;
    assert_eq!(
        (told["calls"].as_u64(), told["other_nodes_told"].as_bool()),
        (Some(0), Some(true))
    );
    let rest = until_results(&mut bob_a2).await;
    assert_eq!(completed(&rest, "call_far")["status"], "cancelled");
}

/// A call made by alice's MCP client (rmcp's, over `/mcp` with her bearer token)
/// shows up live on her WebSocket, in her run `mcp` (which every connection of hers
/// follows), and nowhere on bob's; Stop on that run from her page ends her MCP call.
#[cfg(feature = "mcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_over_mcp_shows_up_in_its_users_run_stream() {
    use std::sync::Arc;
    use std::time::Duration;

    use common::ws::*;
    use rmcp::ServiceExt;
    use rmcp::model::CallToolRequestParams;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use serde_json::json;
    use tool_dispatch::mcp::McpServer;
    use tool_dispatch::ws::{WsServer, router};

    let server = WsServer::new(engine()).follow_on_connect("mcp");
    let runs = server.runs().clone();
    let mcp = McpServer::per_request(server.engine().clone())
        .in_run("mcp")
        .events(move |user| Arc::new(runs.writer(user.user_id(), "mcp")));
    let (u1, u2) = (users(), users());
    let app = router(server.clone(), move |t: &str| u1.get(t).cloned())
        .merge(tool_dispatch::mcp::router(mcp, move |t| u2.get(t).cloned()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tool_dispatch::http::serve(listener, app));

    let mut alice_ws = connect(addr, "alice-token").await;
    let mut bob_ws = connect(addr, "bob-token").await;
    let config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"))
        .auth_header("alice-token".to_owned());
    let client = ().serve(StreamableHttpClientTransport::from_config(config)).await.unwrap();
    let args = json!({"city": "Paris"}).as_object().cloned().unwrap();
    let result = client
        .call_tool(CallToolRequestParams::new("get_weather").with_arguments(args))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false));
    let frames = until(&mut alice_ws, |m| m["type"] == "tool_completed").await;
    let kinds: Vec<&str> = frames.iter().filter_map(|m| m["type"].as_str()).collect();
    assert_eq!(kinds, ["tool_executing", "tool_progress", "tool_completed"]);
    assert!(
        frames
            .iter()
            .all(|m| m["run_id"] == "mcp" && m["seq"].is_u64())
    );

    // A call that needs her approval waits for it on her own stream.
    let mail = json!({"to": "ann@example.com"})
        .as_object()
        .cloned()
        .unwrap();
    let mail = CallToolRequestParams::new("send_email").with_arguments(mail);
    let peer = client.peer().clone();
    let asked = tokio::spawn(async move { peer.call_tool(mail).await });
    let request = until(&mut alice_ws, |m| m["type"] == "tool_approval_required").await;
    let call_id = request.last().unwrap()["call_id"].clone();
    let approve =
        json!({"type": "tool_approval_decision", "call_id": call_id, "decision": "approve"});
    send(&mut alice_ws, approve).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(sent.is_error, Some(false), "{sent:?}");
    until(&mut alice_ws, |m| m["type"] == "tool_completed").await;

    // Stop pressed for the run `mcp` on her page ends her MCP call.
    let long = json!({"steps": 1000, "step_ms": 60000})
        .as_object()
        .cloned()
        .unwrap();
    let long = CallToolRequestParams::new("slow_task").with_arguments(long);
    let pending = tokio::spawn(async move { client.call_tool(long).await });
    until(&mut alice_ws, |m| m["type"] == "tool_executing").await;
    send(&mut alice_ws, json!({"type": "cancel", "run_id": "mcp"})).await;
    let rest = until(&mut alice_ws, |m| m["type"] == "tool_completed").await;
    assert_eq!(rest.last().unwrap()["status"], "cancelled");
    let outcome = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.is_error, Some(true), "{outcome:?}");
    // bob saw none of it: the first thing on his socket answers his own request.
    send(
        &mut bob_ws,
        json!({"type": "resume", "run_id": "mcp", "after_seq": 999}),
    )
    .await;
    assert_eq!(recv(&mut bob_ws).await["type"], "resync_required");
    assert_eq!(server.engine().active(), 0);
}
