//! The deployment assets under `deploy/` against the configuration schema, without a broker.
//!
//! Every YAML file parses (all documents of it); every mindstream configuration the assets
//! carry (`deploy/config/*.toml`, the Kubernetes ConfigMap, the compose stack's mounted file,
//! the images' default) loads through `Config::load` together with the `MINDSTREAM__*`
//! variables set beside it, so a mistyped key fails here naming the file and the key; the
//! probes and ports match `http.listen`; grace periods outlast `shutdown.drain_timeout`; the
//! pseudonymisation key comes from a Secret, never from a literal; and the alert rules and the
//! dashboard name only metrics that `src/metrics.rs` defines and runbook sections that exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mindstream::config::Config;
use serde::Deserialize as _;
use serde_yaml::Value;

use crate::support;

/// The variable naming the configuration file (the binary's `--config` fallback).
const CONFIG_VAR: &str = "MINDSTREAM_CONFIG";
/// Where the images look for their configuration.
const IMAGE_CONFIG: &str = "/etc/mindstream/mindstream.toml";
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_K8S_GRACE: Duration = Duration::from_secs(30);
/// Compose's default `stop_grace_period`.
const DEFAULT_COMPOSE_GRACE: Duration = Duration::from_secs(10);

fn deploy() -> PathBuf {
    support::root().join("deploy")
}

/// `path` relative to the repository, for messages.
fn shown(path: &Path) -> String {
    let root = support::root();
    path.strip_prefix(&root).unwrap_or(path).display().to_string()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// Files under `dir` (recursively) whose name ends with one of `extensions`, sorted.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("list {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                pending.push(path);
            } else if extensions.iter().any(|ext| name.ends_with(&format!(".{ext}"))) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Every document of a YAML file, with `<<` merge keys applied; empty documents are skipped.
fn yaml_documents(path: &Path) -> Result<Vec<Value>, String> {
    let text = read(path);
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let mut value = Value::deserialize(document)
            .map_err(|err| format!("{} document {index}: {err}", shown(path)))?;
        value.apply_merge().map_err(|err| format!("{} merge keys: {err}", shown(path)))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

fn yaml_documents_or_panic(path: &Path) -> Vec<Value> {
    yaml_documents(path).unwrap_or_else(|err| panic!("{err}"))
}

/// A scalar as the text a container would see; `None` for sequences and maps.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn str_of<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn seq_of<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value.get(key).and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default()
}

/// An error with its chain of causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Loads `toml` (from `origin`) with `env` as `mindstream run` would, or says why not.
fn load(origin: &str, toml: &str, env: &[(String, String)]) -> Result<Config, String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("mindstream.toml");
    std::fs::write(&path, toml).expect("write the configuration to a temporary file");
    let config = Config::load(Some(&path), env.iter().cloned())
        .map_err(|err| format!("{origin}: {}", chain(&err)))?;
    config.check_runnable().map_err(|err| format!("{origin}: {}", chain(&err)))?;
    Ok(config)
}

/// How a variable of a container gets its value.
enum EnvSource {
    Literal(String),
    /// `valueFrom` (Kubernetes): the value is known only in the cluster.
    Reference {
        secret: bool,
    },
}

/// Checks the `MINDSTREAM*` variables of a container against its loaded configuration: each
/// is the configuration file's variable, the pseudonymisation key's variable (taken from a
/// Secret, never written out), or a `MINDSTREAM__` override (which `Config::load` applied).
fn check_variables(origin: &str, config: &Config, env: &[(String, EnvSource)]) -> Vec<String> {
    let key_var = &config.privacy.pseudonym_key_env;
    let mut problems = Vec::new();
    for (name, source) in env.iter().filter(|(name, _)| name.starts_with("MINDSTREAM")) {
        if name == CONFIG_VAR || name.starts_with(mindstream::config::ENV_PREFIX) {
            continue;
        }
        if name == key_var {
            if !matches!(source, EnvSource::Reference { secret: true }) {
                problems.push(format!(
                    "{origin}: {name} holds the pseudonymisation key; take it from a Secret \
                     (secretKeyRef) or use privacy.pseudonym_key_file, never a literal value"
                ));
            }
            continue;
        }
        problems.push(format!(
            "{origin}: {name} is neither {CONFIG_VAR}, the key variable {key_var}, nor a \
             {}SECTION__KEY override",
            mindstream::config::ENV_PREFIX
        ));
    }
    problems
}

/// What `Config::load` sees of a container's variables: literals, and a stand-in for values
/// known only in the cluster.
fn load_env(env: &[(String, EnvSource)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(name, source)| match source {
            EnvSource::Literal(value) => (name.clone(), value.clone()),
            EnvSource::Reference { .. } => (name.clone(), "set-in-the-cluster".to_owned()),
        })
        .collect()
}

/// The file named by `--config FILE`, `--config=FILE` or `-c FILE` in an argument list.
fn config_argument(args: &[String]) -> Option<String> {
    args.iter().enumerate().find_map(|(i, arg)| match arg.as_str() {
        "--config" | "-c" => args.get(i + 1).cloned(),
        _ => arg.strip_prefix("--config=").map(str::to_owned),
    })
}

/// The configuration file a container runs with: `--config`, else `MINDSTREAM_CONFIG`, else
/// the images' default.
fn config_file(args: &[String], env: &[(String, EnvSource)]) -> String {
    let from_env = || {
        env.iter().find_map(|(name, source)| match source {
            EnvSource::Literal(value) if name == CONFIG_VAR => Some(value.clone()),
            _ => None,
        })
    };
    config_argument(args).or_else(from_env).unwrap_or_else(|| IMAGE_CONFIG.to_owned())
}

fn http_port(config: &Config) -> Option<u16> {
    config.http.listen.map(|address| address.port())
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = files_under(&deploy(), &["yaml", "yml"]);
    assert!(files.len() >= 8, "expected the compose, k8s and Prometheus files: {files:?}");
    let problems: Vec<String> = files.iter().filter_map(|f| yaml_documents(f).err()).collect();
    assert!(problems.is_empty(), "YAML that does not parse:\n{}", problems.join("\n"));
}

#[test]
fn example_configs_load() {
    let files = files_under(&deploy().join("config"), &["toml"]);
    assert!(files.len() >= 2, "expected demo.toml and production.toml: {files:?}");
    let problems: Vec<String> =
        files.iter().filter_map(|path| load(&shown(path), &read(path), &[]).err()).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- Kubernetes -------------------------------------------------------------------------

/// The mindstream container of a workload, with its configuration loaded.
struct K8sProcessor {
    origin: String,
    pod: Value,
    container: Value,
    config: Config,
}

fn k8s_documents() -> Vec<(PathBuf, Value)> {
    let mut documents = Vec::new();
    for path in files_under(&deploy().join("k8s"), &["yaml", "yml"]) {
        for document in yaml_documents_or_panic(&path) {
            documents.push((path.clone(), document));
        }
    }
    documents
}

fn k8s_kind<'a>(documents: &'a [(PathBuf, Value)], kind: &str) -> Vec<&'a (PathBuf, Value)> {
    documents.iter().filter(|(_, doc)| str_of(doc, "kind") == Some(kind)).collect()
}

fn k8s_named<'a>(
    documents: &'a [(PathBuf, Value)],
    kind: &str,
    name: &str,
) -> Option<&'a (PathBuf, Value)> {
    k8s_kind(documents, kind)
        .into_iter()
        .find(|(_, doc)| str_of(&doc["metadata"], "name") == Some(name))
}

/// The text of `file` (an absolute path in the container) from the ConfigMap volume mounted
/// over it, and where in the manifests it was found.
fn k8s_config_file(
    documents: &[(PathBuf, Value)],
    pod: &Value,
    container: &Value,
    file: &str,
) -> Result<(String, String), String> {
    for mount in seq_of(container, "volumeMounts") {
        let (Some(mount_path), Some(volume_name)) =
            (str_of(mount, "mountPath"), str_of(mount, "name"))
        else {
            continue;
        };
        let relative = match str_of(mount, "subPath") {
            Some(sub_path) if mount_path == file => sub_path.to_owned(),
            Some(_) => continue,
            None => match file.strip_prefix(&format!("{}/", mount_path.trim_end_matches('/'))) {
                Some(rest) => rest.to_owned(),
                None => continue,
            },
        };
        let volume = seq_of(pod, "volumes")
            .iter()
            .find(|v| str_of(v, "name") == Some(volume_name))
            .ok_or_else(|| format!("volume `{volume_name}` is mounted but not declared"))?;
        let config_map = volume.get("configMap").ok_or_else(|| {
            format!("{file} is mounted from volume `{volume_name}`, which is not a ConfigMap")
        })?;
        let name = str_of(config_map, "name").unwrap_or_default();
        let key = seq_of(config_map, "items")
            .iter()
            .find(|item| str_of(item, "path") == Some(relative.as_str()))
            .and_then(|item| str_of(item, "key"))
            .unwrap_or(&relative);
        let (path, map) = k8s_named(documents, "ConfigMap", name)
            .ok_or_else(|| format!("ConfigMap `{name}` is not among the manifests"))?;
        let text = str_of(&map["data"], key)
            .ok_or_else(|| format!("ConfigMap `{name}` has no key `{key}` for {file}"))?;
        let found = format!("ConfigMap {name} key {key} in {}", shown(path));
        return Ok((text.to_owned(), found));
    }
    Err(format!("no ConfigMap volume is mounted over {file}"))
}

/// A container's variables: `env` entries, and the data of ConfigMaps named in `envFrom`.
fn k8s_env(documents: &[(PathBuf, Value)], container: &Value) -> Vec<(String, EnvSource)> {
    let mut env = Vec::new();
    for entry in seq_of(container, "envFrom") {
        let Some(name) = entry.get("configMapRef").and_then(|r| str_of(r, "name")) else {
            continue;
        };
        let data =
            k8s_named(documents, "ConfigMap", name).and_then(|(_, m)| m["data"].as_mapping());
        for (key, value) in data.into_iter().flatten() {
            if let (Some(key), Some(value)) = (key.as_str(), scalar(value)) {
                env.push((key.to_owned(), EnvSource::Literal(value)));
            }
        }
    }
    for entry in seq_of(container, "env") {
        let name = str_of(entry, "name").unwrap_or_default().to_owned();
        let source = match entry.get("valueFrom") {
            Some(from) => EnvSource::Reference { secret: from.get("secretKeyRef").is_some() },
            None => EnvSource::Literal(entry.get("value").and_then(scalar).unwrap_or_default()),
        };
        env.push((name, source));
    }
    env
}

fn k8s_processor(documents: &[(PathBuf, Value)], path: &Path, workload: &Value) -> K8sProcessor {
    let name = str_of(&workload["metadata"], "name").unwrap_or("?");
    let origin = format!("{} ({name})", shown(path));
    let pod = workload["spec"]["template"]["spec"].clone();
    let container = seq_of(&pod, "containers")
        .iter()
        .find(|c| str_of(c, "name") == Some("mindstream"))
        .unwrap_or_else(|| panic!("{origin}: no container named mindstream"))
        .clone();
    let args: Vec<String> = seq_of(&container, "args").iter().filter_map(scalar).collect();
    let env = k8s_env(documents, &container);
    let file = config_file(&args, &env);
    let (toml, found) = k8s_config_file(documents, &pod, &container, &file)
        .unwrap_or_else(|err| panic!("{origin}: {err}"));
    let origin = format!("{origin}, {file} from {found}");
    let config = load(&origin, &toml, &load_env(&env)).unwrap_or_else(|err| panic!("{err}"));
    let problems = check_variables(&origin, &config, &env);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    K8sProcessor { origin, pod, container, config }
}

fn k8s_processors() -> Vec<K8sProcessor> {
    let documents = k8s_documents();
    let processors: Vec<K8sProcessor> = ["Deployment", "StatefulSet"]
        .iter()
        .flat_map(|kind| k8s_kind(&documents, kind))
        .map(|(path, workload)| k8s_processor(&documents, path, workload))
        .collect();
    assert!(!processors.is_empty(), "no Deployment or StatefulSet under deploy/k8s");
    processors
}

/// The port number a probe or Service names, resolving a port name through the container.
fn k8s_port(container: &Value, port: &Value) -> Option<u16> {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).ok();
    }
    let name = port.as_str()?;
    seq_of(container, "ports")
        .iter()
        .find(|p| str_of(p, "name") == Some(name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|n| u16::try_from(n).ok())
}

#[test]
fn kubernetes_config_and_overrides_load() {
    for processor in k8s_processors() {
        let origin = &processor.origin;
        let config = &processor.config;
        // The key must come from a Secret: a mounted Secret file, or a secretKeyRef variable
        // (which check_variables has already required of the key variable).
        let from_env = seq_of(&processor.container, "env").iter().any(|e| {
            str_of(e, "name") == Some(config.privacy.pseudonym_key_env.as_str())
                && e["valueFrom"].get("secretKeyRef").is_some()
        });
        let from_file = config.privacy.pseudonym_key_file.as_ref().is_some_and(|file| {
            seq_of(&processor.container, "volumeMounts").iter().any(|mount| {
                let under = str_of(mount, "mountPath").is_some_and(|dir| file.starts_with(dir));
                let volume = str_of(mount, "name");
                under
                    && seq_of(&processor.pod, "volumes")
                        .iter()
                        .any(|v| str_of(v, "name") == volume && v.get("secret").is_some())
            })
        });
        assert!(
            from_env || from_file,
            "{origin}: the pseudonymisation key ({:?} or ${}) comes from no Secret",
            config.privacy.pseudonym_key_file,
            config.privacy.pseudonym_key_env
        );
    }
}

#[test]
fn kubernetes_probes_ask_the_http_port() {
    let documents = k8s_documents();
    for processor in k8s_processors() {
        let origin = &processor.origin;
        let port = http_port(&processor.config)
            .unwrap_or_else(|| panic!("{origin}: http.listen is not set, so nothing answers"));
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &processor.container[probe]["httpGet"];
            assert_eq!(str_of(get, "path"), Some(path), "{origin}: {probe} path");
            let asked = k8s_port(&processor.container, &get["port"]);
            assert_eq!(asked, Some(port), "{origin}: {probe} port against http.listen");
        }
        for (path, service) in k8s_kind(&documents, "Service") {
            for service_port in seq_of(&service["spec"], "ports") {
                let target = service_port.get("targetPort").unwrap_or(&service_port["port"]);
                let resolved = k8s_port(&processor.container, target);
                assert_eq!(resolved, Some(port), "{}: Service targetPort", shown(path));
            }
        }
    }
}

#[test]
fn kubernetes_grace_period_outlasts_the_drain() {
    for processor in k8s_processors() {
        let grace = processor.pod["terminationGracePeriodSeconds"]
            .as_u64()
            .map_or(DEFAULT_K8S_GRACE, Duration::from_secs);
        let drain = processor.config.shutdown.drain_timeout;
        assert!(
            grace > drain,
            "{}: terminationGracePeriodSeconds ({grace:?}) must exceed shutdown.drain_timeout \
             ({drain:?}), or the pod is killed while it drains",
            processor.origin
        );
    }
}

#[test]
fn kubernetes_kustomization_lists_existing_files() {
    let dir = deploy().join("k8s");
    let kustomization = yaml_documents_or_panic(&dir.join("kustomization.yaml"));
    let resources = seq_of(&kustomization[0], "resources");
    assert!(!resources.is_empty(), "kustomization.yaml lists no resources");
    for resource in resources.iter().filter_map(Value::as_str) {
        assert!(dir.join(resource).exists(), "kustomization.yaml lists missing {resource}");
    }
}

#[test]
fn kubernetes_selectors_match_the_pods() {
    let documents = k8s_documents();
    let workloads: Vec<&(PathBuf, Value)> =
        ["Deployment", "StatefulSet"].iter().flat_map(|kind| k8s_kind(&documents, kind)).collect();
    let pod_labels: Vec<&Value> =
        workloads.iter().map(|(_, w)| &w["spec"]["template"]["metadata"]["labels"]).collect();
    let selects = |selector: &Value| {
        let wanted = selector.as_mapping().filter(|m| !m.is_empty());
        wanted.is_some_and(|wanted| {
            pod_labels.iter().any(|labels| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
    };
    let mut selectors = vec![];
    for (path, workload) in &workloads {
        selectors.push((path, &workload["spec"]["selector"]["matchLabels"]));
    }
    for (path, service) in k8s_kind(&documents, "Service") {
        selectors.push((path, &service["spec"]["selector"]));
    }
    for (path, budget) in k8s_kind(&documents, "PodDisruptionBudget") {
        selectors.push((path, &budget["spec"]["selector"]["matchLabels"]));
    }
    for (path, selector) in selectors {
        assert!(selects(selector), "{}: selector {selector:?} matches no pod", shown(path));
    }
    let names: Vec<&str> =
        workloads.iter().filter_map(|(_, w)| str_of(&w["metadata"], "name")).collect();
    for (path, scaler) in k8s_kind(&documents, "ScaledObject") {
        let target = str_of(&scaler["spec"]["scaleTargetRef"], "name");
        assert!(
            target.is_some_and(|t| names.contains(&t)),
            "{}: scaleTargetRef {target:?} names no workload",
            shown(path)
        );
    }
}

// ---- Docker compose ---------------------------------------------------------------------

/// A compose service's variables, from the map or the list form of `environment`.
fn compose_env(service: &Value) -> Vec<(String, EnvSource)> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), EnvSource::Literal(scalar(v)?))))
            .collect(),
        Some(Value::Sequence(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(|entry| {
                let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
                (name.to_owned(), EnvSource::Literal(value.to_owned()))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A service's bind mounts as (host path, container path); named volumes are left out.
fn compose_binds(compose_dir: &Path, service: &Value) -> Vec<(PathBuf, String)> {
    let mut binds = Vec::new();
    for volume in seq_of(service, "volumes") {
        let (source, target) = match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                (parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
            }
            long => (
                str_of(long, "source").unwrap_or_default(),
                str_of(long, "target").unwrap_or_default(),
            ),
        };
        if source.starts_with('.') || source.starts_with('/') {
            binds.push((compose_dir.join(source.trim_start_matches("./")), target.to_owned()));
        }
    }
    binds
}

fn compose_command(service: &Value) -> Vec<String> {
    match service.get("command") {
        Some(Value::String(line)) => line.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Sequence(list)) => list.iter().filter_map(scalar).collect(),
        _ => Vec::new(),
    }
}

/// Services that run the image of deploy/docker: built from it, or using the image of one.
fn compose_mindstream_services(compose: &Value) -> Vec<(String, Value)> {
    let services = compose["services"].as_mapping().expect("compose.yaml has services");
    let built = |s: &Value| {
        s.get("build")
            .and_then(|b| str_of(b, "dockerfile"))
            .is_some_and(|d| d.starts_with("deploy/docker/Dockerfile"))
    };
    let images: BTreeSet<&str> =
        services.values().filter(|&s| built(s)).filter_map(|s| str_of(s, "image")).collect();
    services
        .iter()
        .filter(|&(_, s)| built(s) || str_of(s, "image").is_some_and(|i| images.contains(i)))
        .map(|(name, s)| (name.as_str().unwrap_or("?").to_owned(), s.clone()))
        .collect()
}

#[test]
fn compose_config_and_overrides_load() {
    let compose_dir = deploy().join("compose");
    let documents = yaml_documents_or_panic(&compose_dir.join("compose.yaml"));
    let services = compose_mindstream_services(&documents[0]);
    assert!(services.iter().any(|(name, _)| name == "mindstream"), "no mindstream service");
    let mut problems = Vec::new();
    for (name, service) in &services {
        let command = compose_command(service);
        // One-shot helpers with their own entrypoint run no mindstream subcommand.
        if service.get("entrypoint").is_some() {
            continue;
        }
        let env = compose_env(service);
        let file = config_file(&command, &env);
        let origin = format!("compose.yaml service {name}, {file}");
        let Some((host, _)) =
            compose_binds(&compose_dir, service).into_iter().find(|(_, target)| *target == file)
        else {
            problems.push(format!("{origin}: no file is mounted there"));
            continue;
        };
        let origin = format!("{origin} (from {})", shown(&host));
        let config = match load(&origin, &read(&host), &load_env(&env)) {
            Ok(config) => config,
            Err(err) => {
                problems.push(err);
                continue;
            }
        };
        problems.extend(check_variables(&origin, &config, &env));
        if command.first().map(String::as_str) == Some("run") {
            problems.extend(check_compose_runner(&origin, service, &config));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A service running the processor: its grace period, published port and Prometheus target.
fn check_compose_runner(origin: &str, service: &Value, config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let grace = str_of(service, "stop_grace_period")
        .map(|text| humantime::parse_duration(text).expect("stop_grace_period is a duration"))
        .unwrap_or(DEFAULT_COMPOSE_GRACE);
    let drain = config.shutdown.drain_timeout;
    if grace <= drain {
        problems.push(format!(
            "{origin}: stop_grace_period ({grace:?}) must exceed shutdown.drain_timeout ({drain:?})"
        ));
    }
    let Some(port) = http_port(config) else {
        problems.push(format!("{origin}: http.listen is not set"));
        return problems;
    };
    for published in seq_of(service, "ports").iter().filter_map(scalar) {
        let container_port = published.rsplit(':').next().unwrap_or_default();
        if container_port != port.to_string() {
            problems.push(format!("{origin}: publishes {published}, http.listen is {port}"));
        }
    }
    let prometheus = read(&deploy().join("prometheus/prometheus.yml"));
    if !prometheus.contains(&format!("mindstream:{port}")) {
        problems.push(format!("prometheus.yml does not scrape mindstream:{port}"));
    }
    problems
}

#[test]
fn compose_bind_mounts_exist() {
    let compose_dir = deploy().join("compose");
    let documents = yaml_documents_or_panic(&compose_dir.join("compose.yaml"));
    let services = documents[0]["services"].as_mapping().expect("compose.yaml has services");
    for (name, service) in services {
        for (host, target) in compose_binds(&compose_dir, service) {
            assert!(host.exists(), "service {name:?} mounts missing {} at {target}", shown(&host));
        }
    }
}

// ---- Container images -------------------------------------------------------------------

#[test]
fn dockerfiles_agree_with_setup_and_the_default_config() {
    let root = support::root();
    let setup = read(&root.join("scripts/setup.sh"));
    let ort_version = setup
        .lines()
        .find_map(|line| line.strip_prefix("ort_version="))
        .expect("scripts/setup.sh sets ort_version");
    for name in ["Dockerfile", "Dockerfile.cuda"] {
        let path = deploy().join("docker").join(name);
        let text = read(&path);
        let origin = shown(&path);
        assert!(
            text.contains(&format!("ARG ORT_VERSION={ort_version}")),
            "{origin}: ONNX Runtime version differs from scripts/setup.sh ({ort_version})"
        );
        let copied = text
            .lines()
            .filter_map(|line| line.strip_prefix("COPY "))
            .find_map(|line| line.strip_suffix(&format!(" {IMAGE_CONFIG}")))
            .unwrap_or_else(|| panic!("{origin}: copies no configuration to {IMAGE_CONFIG}"));
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| line.strip_prefix("ENV "))
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let origin = format!("{origin} ({copied} with its ENV)");
        let config =
            load(&origin, &read(&root.join(copied)), &env).unwrap_or_else(|e| panic!("{e}"));
        let port = http_port(&config).expect("the image's configuration sets http.listen");
        assert!(text.contains(&format!("EXPOSE {port}")), "{origin}: EXPOSE {port} missing");
        assert!(
            text.contains(&format!("/dev/tcp/127.0.0.1/{port}")),
            "{origin}: HEALTHCHECK does not ask port {port}"
        );
    }
}

// ---- Alerts and dashboard ---------------------------------------------------------------

/// Metric names defined in src/metrics.rs, with the series a histogram adds.
fn defined_metrics() -> BTreeSet<String> {
    let source = read(&support::root().join("src/metrics.rs"));
    let names = regex::Regex::new(r#""(mindstream_[a-z0-9_]+)""#).expect("a valid regex");
    let mut defined = BTreeSet::new();
    for name in names.captures_iter(&source).map(|c| c[1].to_owned()) {
        for suffix in ["", "_bucket", "_sum", "_count"] {
            defined.insert(format!("{name}{suffix}"));
        }
    }
    defined
}

/// Metric names in a query (alert and recording names are not metric-shaped).
fn metrics_in(expr: &str) -> Vec<String> {
    let names = regex::Regex::new(r"\bmindstream_[a-z0-9_]+").expect("a valid regex");
    names.find_iter(expr).map(|m| m.as_str().to_owned()).collect()
}

/// Every `expr` and variable `query` string in a dashboard.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        out.push(q.clone())
                    }
                    _ => dashboard_queries(item, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| dashboard_queries(i, out)),
        _ => {}
    }
}

fn alert_rules() -> Vec<Value> {
    let alerts = yaml_documents_or_panic(&deploy().join("prometheus/alerts.yml"));
    seq_of(&alerts[0], "groups").iter().flat_map(|g| seq_of(g, "rules").to_vec()).collect()
}

#[test]
fn alerts_and_dashboard_name_only_defined_metrics() {
    let defined = defined_metrics();
    let mut queries: Vec<(String, String)> = alert_rules()
        .iter()
        .filter_map(|rule| Some(("alerts.yml".to_owned(), str_of(rule, "expr")?.to_owned())))
        .collect();
    let dashboard_path = deploy().join("grafana/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&dashboard_path)).expect("dashboard.json is JSON");
    let mut found = Vec::new();
    dashboard_queries(&dashboard, &mut found);
    queries.extend(found.into_iter().map(|q| ("dashboard.json".to_owned(), q)));
    assert!(queries.len() > 20, "too few queries found: {}", queries.len());
    let unknown: Vec<String> = queries
        .iter()
        .flat_map(|(file, q)| metrics_in(q).into_iter().map(move |m| (file.clone(), m)))
        .filter(|(_, metric)| !defined.contains(metric))
        .map(|(file, metric)| format!("{file}: {metric}"))
        .collect();
    assert!(unknown.is_empty(), "metrics not defined in src/metrics.rs:\n{}", unknown.join("\n"));
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_alert_links_to_its_runbook_section() {
    let runbook = read(&support::root().join("docs/OPERATIONS.md"));
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| anchor(line.trim_start_matches('#')))
        .collect();
    let rules = alert_rules();
    assert!(rules.len() >= 5, "expected at least five alert rules");
    let mut seen = BTreeSet::new();
    for rule in &rules {
        let name = str_of(rule, "alert").expect("every rule in alerts.yml is an alert");
        assert!(seen.insert(name), "alert {name} is defined twice");
        assert!(str_of(&rule["labels"], "severity").is_some(), "{name}: no severity label");
        let notes = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(str_of(notes, key).is_some(), "{name}: no {key} annotation");
        }
        let url = str_of(notes, "runbook_url").unwrap_or_default();
        let target = url.split_once("OPERATIONS.md#").map(|(_, a)| a);
        assert!(
            target.is_some_and(|a| anchors.contains(a)),
            "{name}: runbook_url {url} names no heading of docs/OPERATIONS.md"
        );
    }
}
