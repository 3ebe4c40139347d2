//! The whole path, as a user runs it: `pipeline run` (prepare a small synthetic catalog, train,
//! index), `pipeline serve` on a free loopback port, `Recommend` over gRPC, then `index add` of a
//! brand-new item that the running server hot-reloads and retrieves.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use server::client::{connect, ClientOptions};
use server::proto;

use crate::harness::{free_port, Dir, Server};

const PIPELINE: &str = r#"
[prepare]
dataset = "synthetic"
items = "600"
users = "300"
events = "15000"
seed = 11

[train]
epochs = 4
batch_size = 128
warmup_steps = 20

[train.tower]
dim = 32
token_dim = 32
gru_hidden = 32
item_hidden = [64]
user_hidden = [64]
history_len = 10

[index]
keep = 2
"#;

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn pipeline_serve_recommend_and_a_cold_start_item_after_hot_reload() {
    let dir = Dir::new();
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    std::fs::write(dir.join("serve.toml"), "reload_interval_ms = 200\n").unwrap();
    dir.command(&crate::pipeline::RUN).ok();

    // The model beats popularity on the fixture's held-out (test) examples.
    let metrics = json(&dir.join("w/model/metrics.json"));
    let (model, popularity) = (
        metrics["test"]["recall@50"].as_f64().unwrap(),
        metrics["baseline_popularity"]["recall@50"]
            .as_f64()
            .unwrap(),
    );
    assert!(
        model > popularity,
        "model {model} vs popularity {popularity}"
    );

    let (port, metrics_port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_twotower"))
        .args(["pipeline", "serve", "p.toml", "--workdir", "w", "--"])
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--config", "serve.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut server = Server(child);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let opts = ClientOptions {
        url: url.clone(),
        token: None,
        ca: None,
        timeout: Some(Duration::from_secs(10)),
    };
    let mut client = runtime.block_on(async {
        let started = Instant::now();
        loop {
            if let Ok(c) = connect(&opts).await {
                if server::client::is_serving(&opts).await.unwrap_or(false) {
                    break c;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server never served"
            );
            assert!(server.0.try_wait().unwrap().is_none(), "server exited");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Recommend over gRPC: real catalog items, best first.
    let items: Vec<features::Item> =
        features::read_table(&dir.join("w/data/items.parquet")).unwrap();
    let catalog: HashSet<u64> = items.iter().map(|i| i.item_id).collect();
    let users: Vec<features::User> =
        features::read_table(&dir.join("w/data/users.parquet")).unwrap();
    let reply = runtime
        .block_on(client.recommend(proto::RecommendRequest {
            user_id: Some(users[0].user_id),
            k: 10,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(reply.items.len(), 10);
    assert!(!reply.fallback);
    assert!(
        reply.items.iter().all(|i| catalog.contains(&i.item_id)),
        "{:?}",
        reply.items
    );
    assert!(reply.items.windows(2).all(|w| w[0].score >= w[1].score));
    let first_version = reply.index_version.clone();

    // The CLI client, with the user's recent titles read from the data (what `make demo` shows).
    let user = users[0].user_id.to_string();
    let out = dir
        .command(&[
            "recommend",
            "--addr",
            &url,
            "--user",
            &user,
            "-k",
            "3",
            "--history-from",
            "w/data",
            "--history",
            "2",
        ])
        .ok();
    let events: Vec<features::Event> =
        features::read_table(&dir.join("w/data/events.parquet")).unwrap();
    let last = events
        .iter()
        .filter(|e| e.user_id == users[0].user_id)
        .max_by_key(|e| (e.ts_ms, e.item_id))
        .unwrap();
    let title = &items
        .iter()
        .find(|i| Some(i.item_id) == last.item_id)
        .unwrap()
        .title;
    assert!(
        out.contains(&format!("user {user} recently: ")) && out.contains(title.as_str()),
        "{out}"
    );
    assert!(out.contains(&reply.items[0].title), "{out}");

    // A brand-new item, with a category no other item has, joins the index without retraining.
    let new_item = features::Item {
        item_id: 9_000_001,
        title: items[0].title.clone() + " deluxe",
        aspects: items[0].aspects.clone(),
        categories: vec!["e2e-new-category".into()],
        created_at_ms: None,
    };
    features::write_table(&dir.join("new.parquet"), &[new_item]).unwrap();
    dir.command(&[
        "index",
        "add",
        "--items",
        "new.parquet",
        "--model",
        "w/model",
        "--index",
        "w/index",
        "--device",
        "cpu",
    ])
    .ok();

    // The server notices CURRENT, loads and swaps the new version.
    let started = Instant::now();
    loop {
        let info = runtime
            .block_on(client.get_model_info(proto::GetModelInfoRequest {}))
            .unwrap()
            .into_inner();
        if info.index_version != first_version {
            assert_eq!(info.item_count, items.len() as u64 + 1);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no hot reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Retrievable: the exact category filter leaves only the new item, and it comes back.
    let reply = runtime
        .block_on(client.recommend(proto::RecommendRequest {
            user_id: Some(users[0].user_id),
            k: 5,
            filter: Some(proto::Filter {
                include_categories: vec!["e2e-new-category".into()],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let ids: Vec<u64> = reply.items.iter().map(|i| i.item_id).collect();
    assert_eq!(ids, [9_000_001]);
    // And its own vector finds its content neighbours.
    let similar = runtime
        .block_on(client.similar_items(proto::SimilarItemsRequest {
            item_id: 9_000_001,
            k: 5,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(similar.items.len(), 5);
    assert!(similar.items.iter().all(|i| catalog.contains(&i.item_id)));

    // SIGTERM stops it cleanly.
    let status = server.terminate();
    assert!(status.success(), "{status}");
}
