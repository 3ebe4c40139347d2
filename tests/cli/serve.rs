//! `twotower serve`, `recommend`, `health` and `bench serve` end to end: a real server process on
//! loopback ports, asked by the client commands, stopped by SIGTERM with its event log flushed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_port, Dir, Server, TINY_MODEL};

#[test]
fn serve_answers_recommend_health_and_bench_then_stops_on_sigterm() {
    let dir = Dir::new();
    dir.command(&[
        "prepare",
        "--dataset",
        "synthetic",
        "--items",
        "300",
        "--users",
        "60",
        "--events",
        "3000",
        "--seed",
        "4",
        "--out",
        "data",
    ])
    .ok();
    std::fs::write(dir.join("tiny.toml"), TINY_MODEL).unwrap();
    dir.command(&[
        "train",
        "--data",
        "data",
        "--out",
        "model",
        "--config",
        "tiny.toml",
        "--device",
        "cpu",
    ])
    .ok();
    dir.command(&[
        "index", "--data", "data", "--model", "model", "--out", "idx", "--device", "cpu",
    ])
    .ok();
    std::fs::write(dir.join("token"), "tok-123\n").unwrap();
    std::fs::write(dir.join("serve.toml"), "reload_interval_ms = 200\n").unwrap();

    let (port, metrics_port) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let child = Command::new(env!("CARGO_BIN_EXE_twotower"))
        .args([
            "serve",
            "--model",
            "model",
            "--index",
            "idx",
            "--data",
            "data",
            "--addr",
            &addr,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics_port}"),
            "--config",
            "serve.toml",
            "--auth-token-file",
            "token",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(child);

    // Health needs no token; wait until it says SERVING.
    let started = Instant::now();
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_twotower"))
            .args(["health", "--addr", &url])
            .output()
            .unwrap();
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "server never became healthy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("server exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Without the token: refused, and the message says why.
    let err = dir
        .command(&["recommend", "--addr", &url, "--user", "1"])
        .fails();
    assert!(err.contains("Unauthenticated"), "{err}");

    let json: serde_json::Value = serde_json::from_str(
        &dir.command(&[
            "recommend",
            "--addr",
            &url,
            "--user",
            "1",
            "-k",
            "5",
            "--json",
            "--auth-token-file",
            "token",
        ])
        .ok(),
    )
    .unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 5, "{json}");
    assert!(json["items"][0]["title"].is_string());
    assert_eq!(
        json["index_version"],
        std::fs::read_to_string(dir.join("idx/CURRENT"))
            .unwrap()
            .trim()
    );

    let table = dir
        .command(&[
            "recommend",
            "--addr",
            &url,
            "--user",
            "99999",
            "--auth-token-file",
            "token",
        ])
        .ok();
    assert!(
        table.contains("rank") && table.contains("most popular"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 12, "{table}");

    let err = dir
        .command(&[
            "recommend",
            "--addr",
            &url,
            "-k",
            "0",
            "--auth-token-file",
            "token",
        ])
        .fails();
    assert!(
        err.contains("InvalidArgument") && err.contains("k:"),
        "{err}"
    );

    let bench: serde_json::Value = serde_json::from_str(
        &dir.command(&[
            "bench",
            "serve",
            "--addr",
            &url,
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--users-from",
            "data",
            "--auth-token-file",
            "token",
            "--record-batch",
            "10",
        ])
        .ok(),
    )
    .unwrap();
    for key in [
        "qps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "errors",
        "events_per_sec",
    ] {
        assert!(bench[key].is_number(), "{key}: {bench}");
    }
    assert_eq!(bench["errors"], 0, "{bench}");
    assert!(
        bench["requests"].as_u64().unwrap() > 0 && bench["events_recorded"].as_u64().unwrap() > 0,
        "{bench}"
    );
    let open: serde_json::Value = serde_json::from_str(
        &dir.command(&[
            "bench",
            "serve",
            "--addr",
            &url,
            "--rate",
            "50",
            "--duration",
            "1",
            "--auth-token-file",
            "token",
            "--recorders",
            "1",
            "--record-batch",
            "10",
            "--record-rate",
            "200",
        ])
        .ok(),
    )
    .unwrap();
    assert_eq!(open["errors"], 0, "{open}");
    assert!(open["requests"].as_u64().unwrap() >= 40, "{open}");
    // Paced recording: about 200 events in the one second, never the thousands an unpaced
    // recorder sends (a pace can only be missed by being slower).
    let recorded = open["events_recorded"].as_u64().unwrap();
    assert!(recorded > 0 && recorded <= 300, "{open}");

    // SIGTERM: a graceful stop with exit status 0, the event log flushed next to the index.
    let status = server.terminate();
    assert!(status.success(), "{status}");
    let log = std::fs::metadata(dir.join("idx.events.log")).unwrap();
    assert!(log.len() > 8, "recorded events are in the log");
}

#[test]
fn serve_refuses_missing_inputs_with_a_clear_message() {
    let dir = Dir::new();
    let err = dir
        .command(&[
            "serve",
            "--model",
            "nope",
            "--index",
            "idx",
            "--data",
            "data",
            "--addr",
            "127.0.0.1:0",
            "--no-metrics",
        ])
        .fails();
    assert!(
        err.contains("starting the server") && err.contains("nope"),
        "{err}"
    );
    let err = dir.command(&["bench", "serve", "--duration", "1"]).fails();
    assert!(
        err.contains("--concurrency") && err.contains("--rate"),
        "{err}"
    );
    let err = dir
        .command(&["bench", "serve", "--rate", "10", "--record-rate", "0"])
        .fails();
    assert!(err.contains("--record-rate"), "{err}");
    let err = dir
        .command(&["health", "--addr", "http://127.0.0.1:1"])
        .fails();
    assert!(err.contains("127.0.0.1:1"), "{err}");
}
