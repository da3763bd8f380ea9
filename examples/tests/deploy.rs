//! The deployment files of `deploy/` against the binaries: every YAML file
//! parses, the Kubernetes objects refer to each other consistently, and
//! each container's options (its ConfigMap file, its arguments, its
//! environment) are accepted by the binary it runs (`--check-config`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yml" | "yaml")
        ) {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut at = value;
    for key in path {
        at = &at[*key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("{} is not text in {value:?}", path.join(".")))
}

fn bin(name: &str) -> PathBuf {
    match name {
        "producer_pg_to_kafka" => PathBuf::from(env!("CARGO_BIN_EXE_producer_pg_to_kafka")),
        "consumer_to_clickhouse" => PathBuf::from(env!("CARGO_BIN_EXE_consumer_to_clickhouse")),
        other => panic!("a container runs {other}, which is not a binary of ours"),
    }
}

/// Invariant: every YAML file under deploy/ parses; the Kubernetes objects
/// are complete and consistent (probes on /healthz and /readyz, resource
/// requests, mounted ConfigMap and Secret keys that exist, selectors that
/// match a Deployment); and each container's configuration passes its
/// binary's `--check-config`.
#[test]
fn the_deployment_files_are_consistent_and_accepted_by_the_binaries() {
    let all = yaml_files(Path::new(DEPLOY));
    for path in &all {
        assert!(!documents(path).is_empty(), "{} is empty", path.display());
    }
    let dir = Path::new(DEPLOY).join("kubernetes");
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut objects = Vec::new();
    for resource in &resources {
        for doc in documents(&dir.join(resource)) {
            for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                text(&doc, field);
            }
            objects.push(doc);
        }
    }
    let of_kind = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    };
    let config_maps: BTreeMap<&str, &Value> = of_kind("ConfigMap")
        .into_iter()
        .map(|c| (text(c, &["metadata", "name"]), &c["data"]))
        .collect();
    let secrets: BTreeMap<&str, &Value> = of_kind("Secret")
        .into_iter()
        .map(|s| (text(s, &["metadata", "name"]), &s["stringData"]))
        .collect();
    let deployments = of_kind("Deployment");
    assert_eq!(deployments.len(), 2, "a relay and a consumer");
    let mut pod_labels = Vec::new();
    let scratch = std::env::temp_dir().join(test_support::unique("deploy", "k8s"));
    std::fs::create_dir_all(&scratch).unwrap();
    for deployment in &deployments {
        let name = text(deployment, &["metadata", "name"]);
        let pod = &deployment["spec"]["template"];
        pod_labels.push(pod["metadata"]["labels"].clone());
        let spec = &pod["spec"];
        // Mounted volumes: mount path → (ConfigMap or Secret data; an
        // emptyDir holds no files).
        let empty = Value::Null;
        let volumes: BTreeMap<&str, &Value> = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| {
                let data = if let Some(cm) = v["configMap"]["name"].as_str() {
                    config_maps[cm]
                } else if v["emptyDir"].is_mapping() {
                    &empty
                } else {
                    secrets[text(v, &["secret", "secretName"])]
                };
                (text(v, &["name"]), data)
            })
            .collect();
        for container in spec["containers"].as_sequence().unwrap() {
            let mounts: BTreeMap<&str, &Value> = container["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|m| (text(m, &["mountPath"]), volumes[text(m, &["name"])]))
                .collect();
            let file = |path: &str| -> String {
                let (dir, key) = path.rsplit_once('/').unwrap();
                mounts
                    .get(dir)
                    .and_then(|data| data[key].as_str())
                    .unwrap_or_else(|| {
                        panic!("{name}: {path} is in no mounted ConfigMap or Secret")
                    })
                    .to_string()
            };
            if container["command"][0].as_str() == Some("producer_pg_to_kafka") {
                // Its root filesystem is read-only: the WAL source spills
                // large transactions to the system's temporary directory.
                assert_eq!(
                    container["securityContext"]["readOnlyRootFilesystem"].as_bool(),
                    Some(true)
                );
                let tmp = mounts.get("/tmp").unwrap_or_else(|| {
                    panic!(
                        "{name}: the relay has no writable /tmp for the WAL source's spill files"
                    )
                });
                assert!(tmp.is_null(), "{name}: /tmp must be an emptyDir");
            }
            let ports: BTreeSet<&str> = container["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| text(p, &["name"]))
                .collect();
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                assert_eq!(
                    text(&container[probe], &["httpGet", "path"]),
                    path,
                    "{name}"
                );
                assert!(ports.contains(text(&container[probe], &["httpGet", "port"])));
            }
            for resource in ["cpu", "memory"] {
                text(&container["resources"]["requests"], &[resource]);
            }
            // The binary, with the container's arguments (its config file
            // written out of the ConfigMap) and environment.
            let program = container["command"][0].as_str().unwrap();
            let mut cmd = Command::new(bin(program));
            cmd.env_clear();
            let mut args: Vec<String> = container["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            if let Some(at) = args.iter().position(|a| a == "--config") {
                let local = scratch.join(format!("{name}.toml"));
                std::fs::write(&local, file(&args[at + 1])).unwrap();
                args[at + 1] = local.display().to_string();
            }
            for env in container["env"].as_sequence().unwrap() {
                let (key, value) = (text(env, &["name"]), text(env, &["value"]));
                if key.ends_with("_PASSWORD_FILE") {
                    assert!(!file(value).is_empty(), "{name}: {key}");
                    let local = scratch.join(format!("{name}-{key}"));
                    std::fs::write(&local, file(value)).unwrap();
                    cmd.env(key, &local);
                } else {
                    cmd.env(key, value);
                }
            }
            let output = cmd.args(&args).arg("--check-config").output().unwrap();
            let said = String::from_utf8_lossy(&output.stdout);
            println!(
                "{name}: {program} {} --check-config: {}",
                args.join(" "),
                output.status
            );
            assert!(
                output.status.success(),
                "{name}: {}{said}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(!said.contains("change-me"), "{name} printed a password");
        }
    }
    for kind in ["PodDisruptionBudget", "Service"] {
        for object in of_kind(kind) {
            let selector = if kind == "Service" {
                &object["spec"]["selector"]
            } else {
                &object["spec"]["selector"]["matchLabels"]
            };
            let selector = selector.as_mapping().unwrap();
            assert!(
                pod_labels
                    .iter()
                    .any(|labels| selector.iter().all(|(k, v)| labels
                        .as_mapping()
                        .unwrap()
                        .get(k)
                        == Some(v))),
                "{kind} {} selects no pods",
                text(object, &["metadata", "name"])
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "{} YAML files parse; {} Kubernetes objects consistent",
        all.len(),
        objects.len()
    );
}
