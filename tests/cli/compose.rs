//! Static check of the docker compose stack, cheap enough for every `make test`:
//! `docker compose config` when a compose tool exists, and always a parse of the YAML whose
//! services, volumes and commands are checked against the real `twotower` CLI. The stack itself
//! runs for real in `stack.rs` (run by `.ci/run`).

use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("expected a list: {y:?}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// `twotower ARGS --help` exits 0 only if every subcommand and flag in ARGS exists (clap stops
/// with exit status 2 at the first unknown one).
fn assert_real_command(argv: &[String]) {
    assert_eq!(argv[0], "twotower", "{argv:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_twotower"))
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{argv:?} is not a valid twotower command:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn docker_compose_config_accepts_the_file_when_docker_exists() {
    // The compose plugin (`docker compose`) or the standalone `docker-compose`, if either runs.
    let runs = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let (program, prefix): (&str, &[&str]) = if runs("docker", &["compose", "version"]) {
        ("docker", &["compose"])
    } else if runs("docker-compose", &["version"]) {
        ("docker-compose", &[])
    } else {
        eprintln!("no docker compose here: the YAML checks below are the whole check");
        return;
    };
    // The default build context (deploy/context) is staged by scripts/stack.sh; a fresh clone
    // has none, so point the check at the repository's own Dockerfile context.
    let out = Command::new(program)
        .args(prefix)
        .args(["config", "--quiet"])
        .env("TWOTOWER_BUILD_CONTEXT", ".")
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A service's field, also when it comes from a merged anchor (`<<: *server`).
fn field<'a>(service: &'a Yaml, key: &str) -> &'a Yaml {
    match &service[key] {
        Yaml::BadValue => &service["<<"][key],
        v => v,
    }
}

#[test]
fn services_volumes_and_commands_match_the_cli() {
    let doc = compose();
    let services = &doc["services"];
    let volumes = doc["volumes"].as_hash().expect("top-level volumes");
    let names: Vec<&str> = services
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for want in ["nats", "pipeline", "balancer", "prometheus"] {
        assert!(names.contains(&want), "no {want} service: {names:?}");
    }

    // pipeline: the one-shot batch job into the named volume.
    let pipeline = &services["pipeline"];
    assert!(
        !pipeline["build"].is_badvalue(),
        "pipeline builds the image"
    );
    let cmd = strings(&pipeline["command"]);
    assert_eq!(&cmd[1..3], ["pipeline", "run"], "{cmd:?}");
    assert_real_command(&cmd);
    let pipeline_file = cmd[3]
        .strip_prefix("/app/")
        .expect("pipelines are copied to /app");
    assert!(repo().join(pipeline_file).is_file(), "{pipeline_file}");

    // Serving replicas: after the pipeline succeeded and NATS is healthy, on the shared volume
    // and the bus, with a gRPC health check; each one balanced and scraped.
    let replicas: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("server"))
        .collect();
    assert!(replicas.len() >= 2, "{replicas:?}");
    let balancer = std::fs::read_to_string(repo().join("deploy/haproxy.cfg")).unwrap();
    let scrape = std::fs::read_to_string(repo().join("deploy/prometheus.yml")).unwrap();
    for name in &replicas {
        let server = &services[*name];
        let depends = field(server, "depends_on");
        assert_eq!(
            depends["pipeline"]["condition"].as_str(),
            Some("service_completed_successfully")
        );
        assert_eq!(
            depends["nats"]["condition"].as_str(),
            Some("service_healthy")
        );
        let cmd = strings(field(server, "command"));
        assert_eq!(cmd[1], "serve");
        assert_real_command(&cmd);
        let events = cmd.iter().position(|a| a == "--events").expect("--events");
        assert_eq!(cmd[events + 1], "nats://nats:4222");
        for (flag, port) in [("--addr", "50051"), ("--metrics-addr", "9464")] {
            let i = cmd.iter().position(|a| a == flag).unwrap();
            assert!(cmd[i + 1].ends_with(port), "{flag} {}", cmd[i + 1]);
        }
        let health = strings(&field(server, "healthcheck")["test"]);
        assert_eq!((health[0].as_str(), health[2].as_str()), ("CMD", "health"));
        assert_real_command(&health[1..]);
        assert!(strings(field(server, "volumes")).contains(&"twotower-work:/work".to_string()));
        assert!(
            balancer.contains(&format!("{name}:50051")),
            "{name} not balanced"
        );
        assert!(
            scrape.contains(&format!("{name}:9464")),
            "{name} not scraped"
        );
    }
    for name in ["nats", "balancer", "prometheus"] {
        assert!(
            !services[name]["healthcheck"].is_badvalue(),
            "{name} has no healthcheck"
        );
    }

    // Every named volume a service mounts is declared; bind mounts exist.
    for (name, service) in services.as_hash().unwrap() {
        let Some(mounts) = field(service, "volumes").as_vec() else {
            continue;
        };
        for m in mounts {
            let source = m.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('$') {
                continue; // a host path chosen at run time (scripts/stack.sh)
            }
            if source.starts_with('.') || source.starts_with('/') {
                assert!(
                    repo().join(source).exists(),
                    "{name:?}: bind mount {source} missing"
                );
            } else {
                assert!(
                    volumes.contains_key(&Yaml::String(source.into())),
                    "{name:?}: volume {source} undeclared"
                );
            }
        }
    }
}

#[test]
fn the_documented_reindex_command_is_real() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("docker-compose run --rm pipeline twotower index"))
        .expect("the compose file documents re-indexing");
    let argv: Vec<String> = line
        .split("pipeline ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_real_command(&argv);
}
