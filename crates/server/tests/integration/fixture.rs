//! A small synthetic dataset, a model trained on it for one epoch, an index built from it, and
//! helpers to start servers over them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use features::{Event, Item, NoProgress};
use indexer::{build_index, BuildOptions, PublishSettings};
use ingest::prepare::{prepare_streaming, DataLayout, PrepareConfig, Provenance};
use ingest::synthetic::{SyntheticConfig, SyntheticGenerator};
use server::proto::recommender_client::RecommenderClient;
use server::{ServeConfig, ServeOptions};
use tch::Device;
use tonic::transport::Channel;

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub model: PathBuf,
    pub index: PathBuf,
    pub items: HashMap<u64, Item>,
    pub events: Vec<Event>,
}

impl Fixture {
    /// Items each user interacted with.
    pub fn seen(&self, user: u64) -> HashSet<u64> {
        self.events
            .iter()
            .filter(|e| e.user_id == user)
            .filter_map(|e| e.item_id)
            .collect()
    }

    /// The user with the most events.
    pub fn active_user(&self) -> u64 {
        let mut n: HashMap<u64, usize> = HashMap::new();
        for e in &self.events {
            *n.entry(e.user_id).or_default() += 1;
        }
        n.into_iter().max_by_key(|&(u, c)| (c, u)).unwrap().0
    }

    /// Interaction counts per item.
    pub fn counts(&self) -> HashMap<u64, u64> {
        let mut c = HashMap::new();
        for e in &self.events {
            if let Some(id) = e.item_id {
                *c.entry(id).or_default() += 1;
            }
        }
        c
    }
}

/// Builds an index of `fixture()`'s model into `root` (a new version named in `CURRENT`).
pub fn build_into(root: &Path) -> indexer::Manifest {
    let f = fixture();
    build_index(
        &BuildOptions {
            data: f.data.clone(),
            model: f.model.clone(),
            out: root.to_path_buf(),
            batch_size: 256,
            device: Device::Cpu,
            shard: None,
            settings: PublishSettings {
                recall_queries: 100,
                ..Default::default()
            },
        },
        &NoProgress,
    )
    .unwrap()
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let generator = SyntheticGenerator::new(SyntheticConfig {
            items: 400,
            users: 80,
            events: 5000,
            seed: 11,
            ..Default::default()
        })
        .unwrap();
        prepare_streaming(
            || generator.items(),
            generator.users(),
            Provenance {
                source: "synthetic".into(),
                detail: String::new(),
                items_label: "synthetic items".into(),
                events_label: "synthetic events".into(),
            },
            &data,
            &PrepareConfig::default(),
            &NoProgress,
        )
        .unwrap();
        let model = dir.path().join("model");
        let config = trainer::TrainConfig {
            epochs: 1,
            batch_size: 128,
            tower: towers::TowerConfig::small(16),
            ..Default::default()
        };
        trainer::train(
            trainer::TrainOptions {
                data: data.clone(),
                out: model.clone(),
                config,
                device: Device::Cpu,
                resume: false,
            },
            &NoProgress,
        )
        .unwrap();
        let index = dir.path().join("index");
        let layout = DataLayout(data.clone());
        let items = features::read_table::<Item>(&layout.items())
            .unwrap()
            .into_iter()
            .map(|i| (i.item_id, i))
            .collect();
        let events = features::read_table::<Event>(&layout.events()).unwrap();
        Fixture {
            _dir: dir,
            data,
            model,
            index,
            items,
            events,
        }
    })
}

/// The shared index root, built once.
pub fn shared_index() -> &'static Path {
    static BUILT: OnceLock<()> = OnceLock::new();
    let f = fixture();
    BUILT.get_or_init(|| {
        build_into(&f.index);
    });
    &f.index
}

/// Options for a server over the fixture, with its event log in `state`.
pub fn options(state: &Path) -> ServeOptions {
    let f = fixture();
    ServeOptions {
        model_dir: f.model.clone(),
        index_root: shared_index().to_path_buf(),
        data_dir: f.data.clone(),
        events: server::EventStore::Log(state.join("events.log")),
        addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        tls: None,
        auth_token: None,
        device: Device::Cpu,
        config: ServeConfig {
            reload_interval_ms: 100,
            ..Default::default()
        },
        strict: false,
    }
}

pub async fn client(addr: SocketAddr) -> RecommenderClient<Channel> {
    RecommenderClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A server over the fixture with default options, its client, and its state directory.
pub struct TestServer {
    pub running: server::Running,
    pub client: RecommenderClient<Channel>,
    pub state: tempfile::TempDir,
}

pub async fn start() -> TestServer {
    Events::Log.start().await
}

pub async fn start_with(opts: ServeOptions, state: tempfile::TempDir) -> TestServer {
    let running = server::start(opts).await.unwrap();
    let client = client(running.addr).await;
    TestServer {
        running,
        client,
        state,
    }
}

/// A view event of `item` at `ts_ms`.
pub fn view(item: u64, ts_ms: i64) -> server::proto::Event {
    server::proto::Event {
        r#type: server::proto::EventType::View as i32,
        item_id: Some(item),
        query: None,
        ts_ms,
        value: None,
    }
}

/// A real NATS server with JetStream, on a free loopback port, with its store in a temporary
/// directory; killed on drop. `scripts/setup.sh` installs `nats-server` (Debian's package).
pub struct Nats {
    child: std::process::Child,
    pub url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let store = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("nats-server")
            .args(["--jetstream", "--addr", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--store_dir")
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting nats-server ({e}): run scripts/setup.sh, which installs it")
            });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test server keeps recorded events. The tests of recording run on both.
pub enum Events {
    Log,
    Bus(Nats),
}

impl Events {
    pub fn bus() -> Events {
        Events::Bus(Nats::start())
    }

    /// Options for a server over the fixture: the event log in `state`, or the bus's stream.
    pub fn options(&self, state: &Path) -> ServeOptions {
        let mut opts = options(state);
        if let Events::Bus(nats) = self {
            opts.events = server::EventStore::Bus(server::BusSettings::new(&nats.url, "TEST"));
        }
        opts
    }

    pub async fn start(&self) -> TestServer {
        let state = tempfile::tempdir().unwrap();
        start_with(self.options(state.path()), state).await
    }

    /// Restarts a stopped server on the same state.
    pub async fn restart(&self, state: tempfile::TempDir) -> TestServer {
        start_with(self.options(state.path()), state).await
    }
}
