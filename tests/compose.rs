//! The Compose deployment, checked without a Docker engine: nginx's config passes `nginx -t`,
//! its upload limits match Chitram's, Prometheus scrapes the instances the compose file
//! defines on the port their config serves metrics on, and the Grafana dashboard names only
//! metrics Chitram exports.

use std::path::Path;
use std::process::Command;

use chitram::config::Settings;
use chitram::observability::names;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The services of docker-compose.yml: its top-level `services:` keys.
fn compose_services() -> Vec<String> {
    let compose = read("docker-compose.yml");
    let services = compose.split("\nservices:\n").nth(1).expect("a services section");
    services
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with(' ') || line.starts_with('#'))
        .filter_map(|line| line.strip_prefix("  ").and_then(|rest| rest.strip_suffix(':')))
        .filter(|name| !name.starts_with([' ', '#']))
        .map(str::to_owned)
        .collect()
}

fn docker_settings() -> Settings {
    Settings::load(Some(&Path::new(ROOT).join("config/docker.toml"))).expect("docker.toml is a valid config")
}

#[test]
fn nginx_accepts_its_config() {
    let config = read("deploy/nginx/nginx.conf");
    let services = compose_services();
    // Only Compose's DNS knows the instances' names: point them at loopback for the check.
    let mut local = config.clone();
    for (i, service) in services.iter().filter(|s| s.starts_with("chitram")).enumerate() {
        let upstream = format!("server {service}:8000 ");
        assert!(config.contains(&upstream), "nginx balances over {service}");
        local = local.replace(&upstream, &format!("server 127.0.0.{}:8000 ", i + 1));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, local).unwrap();
    // Debian installs it in /usr/sbin, which a non-root PATH may lack.
    let nginx = ["nginx", "/usr/sbin/nginx"].into_iter().find(|nginx| Command::new(nginx).arg("-v").output().is_ok());
    let output = Command::new(nginx.expect("nginx is installed (Debian's nginx package; .ci/run installs it)"))
        .args(["-t", "-p"])
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .args(["-g", &format!("pid {}/nginx.pid;", dir.path().display())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.contains("test is successful"), "{stderr}");
}

#[test]
fn nginx_upload_limits_match_chitram() {
    let config = read("deploy/nginx/nginx.conf");
    let settings = docker_settings();
    let limit_in = |location: &str| -> u64 {
        let block = config.split(location).nth(1).unwrap_or_else(|| panic!("a {location} block"));
        let value = block.split("client_max_body_size ").nth(1).unwrap().split(';').next().unwrap();
        let megabytes: u64 = value.strip_suffix('m').expect("a size in m").parse().unwrap();
        megabytes * 1024 * 1024
    };
    let file = settings.server.max_upload_bytes;
    let framing = 64 * 1024; // api/images.rs MULTIPART_OVERHEAD
    let upload = limit_in("location = /api/v1/images/upload");
    assert!(upload >= file + framing && upload <= file + 2 * 1024 * 1024, "{upload} for {file}-byte files");
    let batch = limit_in("location = /api/v1/images/batch");
    let files = settings.server.max_batch_files as u64;
    assert!(batch >= files * (file + framing) && batch <= files * (file + 2 * 1024 * 1024), "{batch}");
    assert!(config.contains("proxy_set_header X-Request-ID $chitram_request_id;"), "the request id is passed on");
}

#[test]
fn prometheus_scrapes_every_instance_on_its_metrics_port() {
    let port = docker_settings().metrics.bind.expect("docker.toml serves metrics on an internal port").port();
    let prometheus = read("deploy/prometheus/prometheus.yml");
    let instances: Vec<String> = compose_services().into_iter().filter(|s| s.starts_with("chitram")).collect();
    assert_eq!(instances, ["chitram", "chitram-2"]);
    for instance in instances {
        assert!(prometheus.contains(&format!("\"{instance}:{port}\"")), "Prometheus scrapes {instance}:{port}");
    }
    for service in ["nginx", "prometheus", "grafana"] {
        assert!(compose_services().iter().any(|s| s == service), "compose runs {service}");
    }
}

#[test]
fn the_dashboard_names_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/dashboards/chitram.json")).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut used = std::collections::BTreeSet::new();
    for target in panels.iter().flat_map(|panel| panel["targets"].as_array().unwrap()) {
        let expr = target["expr"].as_str().unwrap();
        for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if token.starts_with("chitram_") {
                let family =
                    ["_bucket", "_count", "_sum"].iter().fold(token, |t, suffix| t.strip_suffix(suffix).unwrap_or(t));
                assert!(names::ALL.contains(&family), "{token} in {expr:?} is no metric Chitram exports");
                used.insert(family.to_owned());
            }
        }
    }
    for wanted in [
        names::HTTP_REQUESTS,
        names::HTTP_ERRORS,
        names::HTTP_DURATION,
        names::SHARD_DURATION,
        names::SHARD_ERRORS,
        names::SHARD_CIRCUIT,
        names::QUEUE_DEPTH,
        names::QUEUE_OLDEST_AGE,
        names::SHARD_BYTES,
        names::SHARD_WEIGHT,
    ] {
        assert!(used.contains(wanted), "the dashboard shows {wanted}");
    }
}
