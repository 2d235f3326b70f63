//! Static checks of the container deployment files: `docker-compose.yml`,
//! `Dockerfile` and `.dockerignore` at the repository root.
//!
//! Docker cannot run on the development/CI machine, so `docker compose up`
//! is never exercised here. Instead this file parses the compose file (with
//! `serde_yaml`) and the Dockerfile (with a small line parser) and asserts
//! the wiring whose breakage would only show up at deploy time:
//!
//! * both services exist, kstash is built from the repo root, runs `serve`
//!   and publishes container port 8080;
//! * kstash waits for a *healthy* Kafka, and Kafka has a healthcheck;
//! * `KSTASH_KAFKA_BROKERS` points at an address Kafka actually advertises
//!   and listens on, and resolves to the kafka service;
//! * Kafka is a single-node KRaft broker+controller whose quorum voter and
//!   internal topic replication factors fit one node, and
//!   `KSTASH_KAFKA_REPLICATION_FACTOR` does not exceed the broker count;
//! * every `KSTASH_*` variable is one kstash actually reads (typo guard; kstash
//!   refuses unknown configuration keys, checked against `config/default.toml`
//!   when present), and the example signing keys have the accepted format;
//! * the Dockerfile is multi-stage, builds a release binary that really is
//!   the kstash source (not the dependency-caching stub), and its final stage
//!   runs `kstash` as a non-root user with port 8080 exposed.
//!
//! Compose `${VAR:-default}` interpolation is resolved to its default, i.e.
//! the values are checked as they would be with no `.env` file present.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_yaml::Value;

const KAFKA: &str = "kafka";
const KSTASH: &str = "kstash";

/// Every environment variable kstash reads. Anything else starting with
/// `KSTASH_` in the compose file is a typo and would be silently ignored.
const KNOWN_KSTASH_VARS: &[&str] = &[
    "KSTASH_KAFKA_BROKERS",
    "KSTASH_SERVER_LISTEN",
    "KSTASH_AUTH_TOKENS",
    "KSTASH_SIGNING_CURRENT_KEY",
    "KSTASH_SIGNING_NEXT_KEY",
    "KSTASH_KAFKA_REPLICATION_FACTOR",
    "KSTASH_CONFIG",
];

/// `KSTASH_<SECTION>_<KEY>` for every `[section]` key of `config/default.toml`
/// (kstash's embedded, documented defaults; its config rejects unknown keys).
/// Nested tables (`[kafka.librdkafka]`) count as one key of their section.
/// `None` when the file does not exist.
fn config_env_vars() -> Option<Vec<String>> {
    let text = std::fs::read_to_string(repo_file("config/default.toml")).ok()?;
    let mut vars = Vec::new();
    let mut section: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let header = header.split(']').next().unwrap_or_default();
            let parts: Vec<String> = header
                .split('.')
                .map(|p| p.trim().trim_matches('"').to_ascii_uppercase())
                .collect();
            section = match parts.as_slice() {
                [one] => Some(one.clone()),
                [sec, key, ..] => {
                    vars.push(format!("KSTASH_{sec}_{key}"));
                    None // keys inside nested tables are not separate variables
                }
                [] => None,
            };
        } else if let (Some(sec), Some((key, _))) = (&section, line.split_once('=')) {
            vars.push(format!(
                "KSTASH_{sec}_{}",
                key.trim().trim_matches('"').to_ascii_uppercase()
            ));
        }
    }
    vars.sort();
    vars.dedup();
    Some(vars)
}

/// Directories on the default `PATH` of debian-based images.
const DEFAULT_PATH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

// ---------------------------------------------------------------------------
// File loading
// ---------------------------------------------------------------------------

fn repo_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn read_repo_file(name: &str) -> String {
    let path = repo_file(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn compose() -> Value {
    let text = read_repo_file("docker-compose.yml");
    let mut doc: Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    doc.apply_merge()
        .unwrap_or_else(|e| panic!("docker-compose.yml has an invalid `<<` merge key: {e}"));
    doc
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no `services:` mapping");
    services.get(name).unwrap_or_else(|| {
        let names: Vec<String> = services.keys().filter_map(scalar).collect();
        panic!("docker-compose.yml has no `{name}` service (services: {names:?})")
    })
}

// ---------------------------------------------------------------------------
// Compose value helpers
// ---------------------------------------------------------------------------

/// A YAML scalar as a string (compose accepts numbers and booleans for
/// environment values and ports).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Tagged(t) => scalar(&t.value),
        _ => None,
    }
}

/// Resolve compose variable interpolation as if no variable were set on the
/// host: `${VAR:-default}` / `${VAR-default}` become `default` (recursively),
/// `${VAR}`, `$VAR`, `${VAR:+x}`, `${VAR:?err}` become empty, `$$` is `$`.
fn interpolate(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace (defaults may nest `${...}`).
                let mut depth = 0;
                let mut end = None;
                for (j, c) in chars.iter().enumerate().skip(i + 1) {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = Some(j);
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let end =
                    end.unwrap_or_else(|| panic!("unterminated `${{` in compose value {s:?}"));
                let inner: String = chars[i + 2..end].iter().collect();
                let name_len = inner
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(inner.len());
                let rest = &inner[name_len..];
                if let Some(default) = rest.strip_prefix(":-").or_else(|| rest.strip_prefix('-')) {
                    out.push_str(&interpolate(default));
                }
                i = end + 1;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// A service's `environment:` in either the map form (`KEY: value`) or the
/// list form (`- KEY=value`). `None` means "passed through from the host"
/// (`KEY:` with no value, or `- KEY` without `=`). Values are interpolated.
fn environment(svc: &Value, svc_name: &str) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    match svc.get("environment") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(map)) => {
            for (k, v) in map {
                let key = scalar(k).unwrap_or_else(|| {
                    panic!("service `{svc_name}`: environment key {k:?} is not a string")
                });
                let value = match v {
                    Value::Null => None,
                    other => Some(interpolate(&scalar(other).unwrap_or_else(|| {
                        panic!("service `{svc_name}`: environment {key} has a non-scalar value {other:?}")
                    }))),
                };
                env.insert(key, value);
            }
        }
        Some(Value::Sequence(items)) => {
            for item in items {
                let entry = scalar(item).unwrap_or_else(|| {
                    panic!("service `{svc_name}`: environment list entry {item:?} is not a string")
                });
                match entry.split_once('=') {
                    Some((k, v)) => env.insert(k.to_string(), Some(interpolate(v))),
                    None => env.insert(entry, None),
                };
            }
        }
        Some(other) => panic!(
            "service `{svc_name}`: `environment:` must be a mapping or a list, got {other:?}"
        ),
    }
    env
}

/// The value of an environment variable that must be set explicitly.
fn env_value(env: &BTreeMap<String, Option<String>>, svc_name: &str, key: &str) -> String {
    match env.get(key) {
        Some(Some(v)) => v.clone(),
        Some(None) => panic!(
            "service `{svc_name}`: {key} is only passed through from the host; \
             give it a value (or a `${{VAR:-default}}`) so the stack works without a .env file"
        ),
        None => panic!("service `{svc_name}`: environment variable {key} is not set"),
    }
}

/// `NAME://host:port,NAME2://host:port` (Kafka listener syntax).
fn parse_listeners(list: &str, what: &str) -> Vec<(String, String, u16)> {
    list.split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, addr) = l
                .split_once("://")
                .unwrap_or_else(|| panic!("{what}: listener {l:?} is not NAME://host:port"));
            let (host, port) = split_host_port(addr)
                .unwrap_or_else(|| panic!("{what}: listener {l:?} has no numeric port"));
            (name.to_string(), host, port)
        })
        .collect()
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// Container-side ports a service publishes, from short (`"8080:8080"`,
/// `"127.0.0.1:80:8080/tcp"`, `"8080-8081:8080-8081"`, `8080`) or long
/// (`target: 8080`) syntax. Each entry is an inclusive range.
fn published_container_ports(svc: &Value) -> Vec<(u16, u16)> {
    let Some(ports) = svc.get("ports").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    let parse_range = |s: &str| -> (u16, u16) {
        let s = s.trim();
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a = a
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad port {s:?} in `ports:`"));
        let b = b
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad port {s:?} in `ports:`"));
        (a, b)
    };
    ports
        .iter()
        .map(|p| match p {
            Value::Mapping(_) => {
                let target = p
                    .get("target")
                    .and_then(scalar)
                    .unwrap_or_else(|| panic!("long-form port {p:?} has no `target`"));
                parse_range(&interpolate(&target))
            }
            other => {
                let short = interpolate(
                    &scalar(other)
                        .unwrap_or_else(|| panic!("unsupported `ports:` entry {other:?}")),
                );
                let no_proto = short.split('/').next().unwrap_or_default();
                let container = no_proto.rsplit(':').next().unwrap_or_default();
                parse_range(container)
            }
        })
        .collect()
}

/// Names under which other containers on the compose network reach `svc`.
fn network_names(compose: &Value, svc_name: &str) -> Vec<String> {
    let svc = service(compose, svc_name);
    let mut names = vec![svc_name.to_string()];
    for key in ["hostname", "container_name"] {
        if let Some(v) = svc.get(key).and_then(scalar) {
            names.push(interpolate(&v));
        }
    }
    if let Some(Value::Mapping(nets)) = svc.get("networks") {
        for (_, net) in nets {
            if let Some(aliases) = net.get("aliases").and_then(Value::as_sequence) {
                names.extend(aliases.iter().filter_map(scalar));
            }
        }
    }
    names.iter().map(|n| n.to_ascii_lowercase()).collect()
}

fn kafka_listener_ports(
    kafka_env: &BTreeMap<String, Option<String>>,
) -> Vec<(String, String, u16)> {
    parse_listeners(
        &env_value(kafka_env, KAFKA, "KAFKA_LISTENERS"),
        "kafka KAFKA_LISTENERS",
    )
}

/// Optional `KAFKA_*` setting that, when present, must equal `expected`.
fn assert_kafka_setting_if_set(
    env: &BTreeMap<String, Option<String>>,
    key: &str,
    expected: &str,
    why: &str,
) {
    if let Some(Some(v)) = env.get(key) {
        assert_eq!(
            v.trim(),
            expected,
            "service `kafka`: {key} is {v:?} but must be {expected}: {why}"
        );
    }
}

// ---------------------------------------------------------------------------
// Dockerfile parsing
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Instr {
    line: usize,
    /// Upper-cased instruction keyword.
    cmd: String,
    args: String,
}

#[derive(Debug)]
struct Stage {
    index: usize,
    name: Option<String>,
    base: String,
    instrs: Vec<Instr>,
}

impl Stage {
    fn all<'a>(&'a self, cmd: &'a str) -> impl Iterator<Item = &'a Instr> + 'a {
        self.instrs.iter().filter(move |i| i.cmd == cmd)
    }
    fn last(&self, cmd: &str) -> Option<&Instr> {
        self.instrs.iter().rev().find(|i| i.cmd == cmd)
    }
    fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("stage {} `{}` (FROM {})", self.index, n, self.base),
            None => format!("stage {} (FROM {})", self.index, self.base),
        }
    }
}

/// Split a Dockerfile into stages of logical instructions (comments removed,
/// `\` line continuations joined). Instructions before the first `FROM`
/// (global `ARG`s) are dropped.
fn dockerfile() -> Vec<Stage> {
    let text = read_repo_file("Dockerfile");
    let mut instrs = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_none()) {
            continue; // comments may appear even inside a continuation
        }
        let (start, mut buf) = current.take().unwrap_or((n + 1, String::new()));
        if let Some(body) = line.strip_suffix('\\') {
            buf.push_str(body);
            buf.push(' ');
            current = Some((start, buf));
        } else {
            buf.push_str(line);
            let buf = buf.trim().to_string();
            if !buf.is_empty() {
                instrs.push((start, buf));
            }
        }
    }
    if let Some((start, buf)) = current {
        instrs.push((start, buf.trim().to_string()));
    }

    let mut stages: Vec<Stage> = Vec::new();
    for (line, text) in instrs {
        let (cmd, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        let instr = Instr {
            line,
            cmd: cmd.to_ascii_uppercase(),
            args: args.trim().to_string(),
        };
        if instr.cmd == "FROM" {
            let words: Vec<&str> = instr
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, kw, name, ..] if kw.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                index: stages.len(),
                name,
                base: words.first().map(|s| s.to_string()).unwrap_or_default(),
                instrs: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instrs.push(instr);
        }
    }
    stages
}

/// Exec-form (`["a", "b"]`) arguments; a JSON array is a YAML flow sequence.
fn exec_form(instr: &Instr) -> Option<Vec<String>> {
    if !instr.args.starts_with('[') {
        return None;
    }
    serde_yaml::from_str::<Vec<String>>(&instr.args).ok()
}

/// `COPY [--flags] src... dest` → (flags, sources, dest).
fn copy_parts(instr: &Instr) -> (Vec<String>, Vec<String>, String) {
    let words: Vec<String> = instr.args.split_whitespace().map(str::to_string).collect();
    let (flags, rest): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let paths = if rest.first().is_some_and(|w| w.starts_with('[')) {
        serde_yaml::from_str::<Vec<String>>(&rest.join(" "))
            .unwrap_or_else(|e| panic!("Dockerfile line {}: bad COPY array: {e}", instr.line))
    } else {
        rest
    };
    let (dest, srcs) = paths
        .split_last()
        .unwrap_or_else(|| panic!("Dockerfile line {}: COPY without a destination", instr.line));
    (flags, srcs.to_vec(), dest.clone())
}

/// The stage a `COPY --from=X` refers to (by name or index), if it is one.
fn from_stage<'a>(stages: &'a [Stage], flags: &[String]) -> Option<&'a Stage> {
    let from = flags.iter().find_map(|f| f.strip_prefix("--from="))?;
    stages
        .iter()
        .find(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(from))
        })
        .or_else(|| from.parse::<usize>().ok().and_then(|i| stages.get(i)))
}

// ---------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------

#[test]
fn compose_defines_kafka_and_kstash_services() {
    let c = compose();
    service(&c, KAFKA);
    service(&c, KSTASH);
    let image = service(&c, KAFKA).get("image").and_then(scalar);
    assert!(
        image
            .as_deref()
            .is_some_and(|i| interpolate(i).starts_with("apache/kafka:")),
        "service `kafka` must use the official apache/kafka image (its env-var config and \
         /opt/kafka/bin scripts are what this file relies on), got {image:?}"
    );
}

#[test]
fn kstash_is_built_from_the_repository_dockerfile() {
    let c = compose();
    let build = service(&c, KSTASH)
        .get("build")
        .expect("service `kstash` has no `build:`; it must build the image from this repository");
    let (context, dockerfile) = match build {
        Value::Mapping(_) => (
            build
                .get("context")
                .and_then(scalar)
                .unwrap_or_else(|| ".".into()),
            build
                .get("dockerfile")
                .and_then(scalar)
                .unwrap_or_else(|| "Dockerfile".into()),
        ),
        other => (
            scalar(other)
                .unwrap_or_else(|| panic!("service `kstash`: unsupported `build:` {other:?}")),
            "Dockerfile".into(),
        ),
    };
    let context = interpolate(&context);
    assert!(
        matches!(context.as_str(), "." | "./"),
        "service `kstash` must build with context `.` (the repository root holding Cargo.toml), got {context:?}"
    );
    let dockerfile = interpolate(&dockerfile);
    assert!(
        repo_file(&dockerfile).is_file(),
        "service `kstash` builds with dockerfile {dockerfile:?}, which does not exist in the repository"
    );
}

#[test]
fn kstash_runs_serve_against_real_kafka() {
    let c = compose();
    let Some(command) = service(&c, KSTASH).get("command") else {
        return; // falls back to the image's CMD, checked in dockerfile_cmd_defaults_to_serve
    };
    let first = match command {
        Value::Sequence(items) => items.first().and_then(scalar),
        other => scalar(other).and_then(|s| s.split_whitespace().next().map(str::to_string)),
    };
    assert_eq!(
        first.as_deref(),
        Some("serve"),
        "service `kstash` must run `serve` (the image's ENTRYPOINT is `kstash`); \
         `dev` would start an embedded Kafka and ignore the kafka service. Got {command:?}"
    );
}

#[test]
fn kstash_publishes_container_port_8080() {
    let c = compose();
    let ports = published_container_ports(service(&c, KSTASH));
    assert!(
        ports.iter().any(|&(lo, hi)| lo <= 8080 && 8080 <= hi),
        "service `kstash` must publish container port 8080 (where the HTTP API listens), \
         e.g. `ports: [\"8080:8080\"]`; published container ports: {ports:?}"
    );
    let env = environment(service(&c, KSTASH), KSTASH);
    if let Some(Some(listen)) = env.get("KSTASH_SERVER_LISTEN") {
        let (host, port) = split_host_port(listen)
            .unwrap_or_else(|| panic!("KSTASH_SERVER_LISTEN={listen:?} is not host:port"));
        assert_eq!(
            port, 8080,
            "KSTASH_SERVER_LISTEN={listen:?} but the published port is 8080"
        );
        assert!(
            !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1"),
            "KSTASH_SERVER_LISTEN={listen:?} binds loopback, unreachable through the published port; use 0.0.0.0"
        );
    }
}

#[test]
fn kstash_waits_for_a_healthy_kafka() {
    let c = compose();
    let depends = service(&c, KSTASH).get("depends_on").expect(
        "service `kstash` has no `depends_on:`; it would start before Kafka accepts connections",
    );
    let condition = match depends {
        Value::Mapping(_) => depends
            .get(KAFKA)
            .unwrap_or_else(|| panic!("service `kstash`: `depends_on:` does not list `kafka`"))
            .get("condition")
            .and_then(scalar),
        Value::Sequence(items) => {
            assert!(
                items.iter().filter_map(scalar).any(|s| s == KAFKA),
                "service `kstash`: `depends_on:` does not list `kafka`"
            );
            None // short form means condition: service_started
        }
        other => panic!("service `kstash`: unsupported `depends_on:` {other:?}"),
    };
    assert_eq!(
        condition.as_deref(),
        Some("service_healthy"),
        "service `kstash` must use `depends_on: {{kafka: {{condition: service_healthy}}}}`; \
         a started-but-not-ready broker makes kstash fail at startup"
    );

    let healthcheck = service(&c, KAFKA).get("healthcheck").expect(
        "service `kafka` has no `healthcheck:`; `condition: service_healthy` would never be met",
    );
    let disabled = healthcheck.get("disable").and_then(Value::as_bool) == Some(true);
    let test = healthcheck.get("test");
    let test_words: Vec<String> = match test {
        Some(Value::Sequence(items)) => items.iter().filter_map(scalar).collect(),
        Some(other) => scalar(other).into_iter().collect(),
        None => Vec::new(),
    };
    assert!(
        !disabled && !test_words.is_empty() && test_words[0] != "NONE",
        "service `kafka`: healthcheck is missing a `test:` or is disabled ({healthcheck:?}); \
         kstash's `condition: service_healthy` would never be met"
    );
}

#[test]
fn kstash_brokers_match_kafka_advertised_listener() {
    let c = compose();
    let kstash_env = environment(service(&c, KSTASH), KSTASH);
    let kafka_env = environment(service(&c, KAFKA), KAFKA);

    let brokers = env_value(&kstash_env, KSTASH, "KSTASH_KAFKA_BROKERS");
    let advertised = parse_listeners(
        &env_value(&kafka_env, KAFKA, "KAFKA_ADVERTISED_LISTENERS"),
        "kafka KAFKA_ADVERTISED_LISTENERS",
    );
    let listening = kafka_listener_ports(&kafka_env);

    // Security protocol of each listener name (a name is its own protocol
    // when not mapped, e.g. PLAINTEXT).
    let protocol_map: BTreeMap<String, String> = kafka_env
        .get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")
        .cloned()
        .flatten()
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.trim().split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let protocol = |name: &str| {
        protocol_map
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    };
    let plaintext: Vec<&(String, String, u16)> = advertised
        .iter()
        .filter(|(name, _, _)| protocol(name) == "PLAINTEXT")
        .collect();
    assert!(
        !plaintext.is_empty(),
        "kafka KAFKA_ADVERTISED_LISTENERS has no PLAINTEXT listener for kstash to use: {advertised:?}"
    );

    let kafka_names = network_names(&c, KAFKA);
    let entries: Vec<&str> = brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .collect();
    assert!(!entries.is_empty(), "KSTASH_KAFKA_BROKERS is empty");
    for entry in entries {
        let addr = entry.split_once("://").map_or(entry, |(_, a)| a);
        let (host, port) = split_host_port(addr).unwrap_or_else(|| {
            panic!("KSTASH_KAFKA_BROKERS entry {entry:?} must be host:port with an explicit port")
        });
        let matched = plaintext
            .iter()
            .find(|(_, h, p)| h.eq_ignore_ascii_case(&host) && *p == port)
            .unwrap_or_else(|| {
                panic!(
                    "KSTASH_KAFKA_BROKERS entry {entry:?} is not one of kafka's advertised PLAINTEXT \
                     listeners {plaintext:?}; kstash would bootstrap from one address and then be \
                     redirected to the advertised one"
                )
            });
        assert!(
            kafka_names.contains(&host.to_ascii_lowercase()),
            "KSTASH_KAFKA_BROKERS host {host:?} does not resolve to the kafka service on the compose \
             network (known names: {kafka_names:?})"
        );
        let listener_name = &matched.0;
        let bound = listening.iter().find(|(name, _, _)| name == listener_name).unwrap_or_else(|| {
            panic!("kafka advertises listener {listener_name} but KAFKA_LISTENERS does not define it: {listening:?}")
        });
        assert_eq!(
            bound.2, port,
            "kafka advertises {listener_name} on port {port} but KAFKA_LISTENERS binds it on port {}; \
             containers on the compose network connect to the bound port directly",
            bound.2
        );
    }
}

#[test]
fn kafka_is_a_single_node_kraft_broker_and_controller() {
    let c = compose();
    let env = environment(service(&c, KAFKA), KAFKA);

    let roles = env_value(&env, KAFKA, "KAFKA_PROCESS_ROLES");
    let roles: Vec<&str> = roles.split(',').map(str::trim).collect();
    for role in ["broker", "controller"] {
        assert!(
            roles.contains(&role),
            "kafka KAFKA_PROCESS_ROLES={roles:?} must include `{role}` (single-node KRaft needs both)"
        );
    }

    let node_id = env_value(&env, KAFKA, "KAFKA_NODE_ID");
    let voters = env_value(&env, KAFKA, "KAFKA_CONTROLLER_QUORUM_VOTERS");
    let own_voter = voters
        .split(',')
        .map(str::trim)
        .find_map(|v| v.strip_prefix(&format!("{}@", node_id.trim())))
        .unwrap_or_else(|| {
            panic!("kafka KAFKA_CONTROLLER_QUORUM_VOTERS={voters:?} has no entry for KAFKA_NODE_ID={node_id}")
        });
    let (_, voter_port) = split_host_port(own_voter)
        .unwrap_or_else(|| panic!("kafka quorum voter {own_voter:?} is not host:port"));
    let controller_names = env_value(&env, KAFKA, "KAFKA_CONTROLLER_LISTENER_NAMES");
    let controller_names: Vec<&str> = controller_names.split(',').map(str::trim).collect();
    let listening = kafka_listener_ports(&env);
    assert!(
        listening
            .iter()
            .any(|(name, _, port)| controller_names.contains(&name.as_str()) && *port == voter_port),
        "kafka quorum voter port {voter_port} is not the port of a controller listener \
         ({controller_names:?}) in KAFKA_LISTENERS {listening:?}; the node could not reach its own quorum"
    );

    // The apache/kafka image defaults these to 1 when unset; if set, they
    // must fit a single broker or group coordination/transactions fail.
    let why = "compose runs a single broker";
    assert_kafka_setting_if_set(&env, "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1", why);
    assert_kafka_setting_if_set(
        &env,
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "1",
        why,
    );
    assert_kafka_setting_if_set(&env, "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1", why);
    assert_kafka_setting_if_set(
        &env,
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "1",
        why,
    );
    assert_kafka_setting_if_set(&env, "KAFKA_DEFAULT_REPLICATION_FACTOR", "1", why);
}

#[test]
fn kstash_replication_factor_fits_the_single_broker() {
    let c = compose();
    let services = c
        .get("services")
        .and_then(Value::as_mapping)
        .expect("no services");
    // Brokers = services whose KRaft roles include `broker`.
    let brokers = services
        .iter()
        .filter(|(name, svc)| {
            let name = scalar(name).unwrap_or_default();
            environment(svc, &name)
                .get("KAFKA_PROCESS_ROLES")
                .cloned()
                .flatten()
                .is_some_and(|r| r.split(',').any(|x| x.trim() == "broker"))
        })
        .count();
    assert_eq!(
        brokers, 1,
        "expected exactly one Kafka broker service in docker-compose.yml"
    );

    let env = environment(service(&c, KSTASH), KSTASH);
    let rf = env_value(&env, KSTASH, "KSTASH_KAFKA_REPLICATION_FACTOR");
    let rf: usize = rf.trim().parse().unwrap_or_else(|_| {
        panic!("KSTASH_KAFKA_REPLICATION_FACTOR={rf:?} is not a positive integer")
    });
    assert!(
        (1..=brokers).contains(&rf),
        "KSTASH_KAFKA_REPLICATION_FACTOR={rf} but compose runs {brokers} broker(s); topic creation \
         would fail with INVALID_REPLICATION_FACTOR. Use 1 for the single-node setup"
    );
}

#[test]
fn only_known_kstash_variables_are_set() {
    let c = compose();
    let from_config = config_env_vars();
    if let Some(vars) = &from_config {
        assert!(
            vars.iter().any(|v| v == "KSTASH_KAFKA_BROKERS"),
            "test helper config_env_vars() found no KSTASH_KAFKA_BROKERS in config/default.toml; \
             its format changed, update the helper (found {vars:?})"
        );
    }
    let services = c
        .get("services")
        .and_then(Value::as_mapping)
        .expect("no services");
    for (name, svc) in services {
        let name = scalar(name).unwrap_or_default();
        for key in environment(svc, &name)
            .keys()
            .filter(|k| k.starts_with("KSTASH_"))
        {
            let in_config = from_config.as_ref().is_some_and(|vars| vars.contains(key));
            assert!(
                KNOWN_KSTASH_VARS.contains(&key.as_str()) || in_config,
                "service `{name}` sets {key}, which kstash does not read (typo?). \
                 Known variables: {KNOWN_KSTASH_VARS:?} plus the keys of config/default.toml"
            );
            if let Some(vars) = &from_config {
                assert!(
                    key == "KSTASH_CONFIG" || in_config,
                    "service `{name}` sets {key}, but config/default.toml has no matching \
                     [section] key; kstash rejects unknown configuration keys and would not start. \
                     Variables derived from config/default.toml: {vars:?}"
                );
            }
        }
    }
}

#[test]
fn kstash_has_credentials_and_well_formed_signing_keys() {
    let c = compose();
    let env = environment(service(&c, KSTASH), KSTASH);
    let tokens = env_value(&env, KSTASH, "KSTASH_AUTH_TOKENS");
    assert!(
        tokens.split(',').any(|t| !t.trim().is_empty()),
        "KSTASH_AUTH_TOKENS resolves to no token without a .env file; give it an example default"
    );
    for key in ["KSTASH_SIGNING_CURRENT_KEY", "KSTASH_SIGNING_NEXT_KEY"] {
        let value = env_value(&env, KSTASH, key);
        let ok = value
            .strip_prefix("sig_")
            .is_some_and(|rest| rest.chars().count() >= 28);
        assert!(
            ok,
            "{key} resolves to {value:?} without a .env file; signing keys must be `sig_` followed \
             by at least 28 characters or kstash refuses to start"
        );
    }
}

// ---------------------------------------------------------------------------
// Dockerfile / .dockerignore
// ---------------------------------------------------------------------------

#[test]
fn dockerfile_is_multi_stage() {
    let stages = dockerfile();
    assert!(
        stages.len() >= 2,
        "Dockerfile must be multi-stage (a Rust build stage and a slim runtime stage); \
         found {} FROM instruction(s)",
        stages.len()
    );
}

#[test]
fn dockerfile_final_stage_runs_as_non_root() {
    let stages = dockerfile();
    let last = stages.last().expect("Dockerfile has no FROM");
    let user = last.last("USER").unwrap_or_else(|| {
        panic!(
            "Dockerfile final {} has no USER; the server would run as root",
            last.label()
        )
    });
    let uid = user.args.split(':').next().unwrap_or_default().trim();
    assert!(
        !uid.is_empty() && uid != "root" && uid != "0",
        "Dockerfile line {}: final stage `USER {}` is root; use a non-root user (e.g. 10001)",
        user.line,
        user.args
    );
}

#[test]
fn dockerfile_final_stage_exposes_8080() {
    let stages = dockerfile();
    let last = stages.last().expect("Dockerfile has no FROM");
    let exposed: Vec<String> = last
        .all("EXPOSE")
        .flat_map(|i| i.args.split_whitespace().map(str::to_string))
        .collect();
    assert!(
        exposed.iter().any(|p| p == "8080" || p == "8080/tcp"),
        "Dockerfile final {} must `EXPOSE 8080` (the HTTP API port); exposes {exposed:?}",
        last.label()
    );
}

#[test]
fn dockerfile_entrypoint_is_kstash() {
    let stages = dockerfile();
    let last = stages.last().expect("Dockerfile has no FROM");
    let entry = last.last("ENTRYPOINT").unwrap_or_else(|| {
        panic!(
            "Dockerfile final {} has no ENTRYPOINT; it must be [\"kstash\"]",
            last.label()
        )
    });
    let argv = exec_form(entry).unwrap_or_else(|| {
        panic!(
            "Dockerfile line {}: ENTRYPOINT {} must use the exec form [\"kstash\"]; the shell form \
             ignores CMD and compose's `command:` and hides signals from kstash",
            entry.line, entry.args
        )
    });
    let program = argv.first().cloned().unwrap_or_default();
    assert!(
        program == "kstash" || program.ends_with("/kstash"),
        "Dockerfile line {}: ENTRYPOINT runs {program:?}, expected kstash",
        entry.line
    );

    // The binary must be copied from a build stage to where ENTRYPOINT finds it.
    let copies: Vec<(String, String)> = last
        .all("COPY")
        .filter_map(|c| {
            let (flags, srcs, dest) = copy_parts(c);
            let stage = from_stage(&stages, &flags)?;
            srcs.iter()
                .any(|s| s.ends_with("/kstash") || s == "kstash")
                .then(|| (stage.label(), dest))
        })
        .collect();
    let installed = copies.iter().any(|(_, dest)| {
        let path = if dest.ends_with('/') {
            format!("{dest}kstash")
        } else {
            dest.clone()
        };
        if program.starts_with('/') {
            path == program
        } else {
            path.rsplit_once('/')
                .is_some_and(|(dir, file)| file == "kstash" && DEFAULT_PATH_DIRS.contains(&dir))
        }
    });
    assert!(
        installed,
        "Dockerfile final {} must `COPY --from=<build stage> .../kstash` to {}; found {copies:?}",
        last.label(),
        if program.starts_with('/') {
            program.clone()
        } else {
            "a directory on PATH (e.g. /usr/local/bin/)".into()
        }
    );
}

#[test]
fn dockerfile_cmd_defaults_to_serve() {
    let stages = dockerfile();
    let last = stages.last().expect("Dockerfile has no FROM");
    let cmd = last.last("CMD").unwrap_or_else(|| {
        panic!(
            "Dockerfile final {} has no CMD; it should default to [\"serve\"]",
            last.label()
        )
    });
    let argv = exec_form(cmd).unwrap_or_else(|| {
        panic!(
            "Dockerfile line {}: CMD {} must use the exec form; in shell form kstash receives \
             `/bin/sh -c ...` as its arguments",
            cmd.line, cmd.args
        )
    });
    assert_eq!(
        argv.first().map(String::as_str),
        Some("serve"),
        "Dockerfile line {}: CMD should default to [\"serve\"]",
        cmd.line
    );
}

#[test]
fn dockerfile_ships_the_real_release_binary() {
    let stages = dockerfile();
    let last = stages.last().expect("Dockerfile has no FROM");
    let builder = last
        .all("COPY")
        .find_map(|c| from_stage(&stages, &copy_parts(c).0))
        .unwrap_or_else(|| {
            panic!(
                "Dockerfile final {} copies nothing from a build stage",
                last.label()
            )
        });

    let builds: Vec<&Instr> = builder
        .all("RUN")
        .filter(|r| r.args.contains("cargo build"))
        .collect();
    let final_build = *builds
        .last()
        .unwrap_or_else(|| panic!("Dockerfile {} never runs `cargo build`", builder.label()));
    for flag in ["--release", "--locked"] {
        assert!(
            final_build.args.contains(flag),
            "Dockerfile line {}: the final `cargo build` must pass {flag}",
            final_build.line
        );
    }

    // Dependency caching with a stub src/ (two `cargo build`s): the real
    // sources are COPYed with their original, older mtimes, so unless they are
    // touched (or the kstash fingerprints removed) cargo keeps the stub binary.
    if builds.len() >= 2 {
        let pos = |i: &Instr| {
            builder
                .instrs
                .iter()
                .position(|x| std::ptr::eq(x, i))
                .unwrap()
        };
        let final_pos = pos(final_build);
        let last_copy = builder.instrs[..final_pos]
            .iter()
            .rposition(|i| i.cmd == "COPY" || i.cmd == "ADD")
            .unwrap_or_else(|| {
                panic!(
                    "Dockerfile {} never copies the real sources before the final `cargo build`",
                    builder.label()
                )
            });
        let refreshed = builder.instrs[last_copy..=final_pos].iter().any(|i| {
            i.cmd == "RUN"
                && (i.args.contains("touch ")
                    || i.args.contains(".fingerprint")
                    || i.args.contains("cargo clean"))
        });
        assert!(
            refreshed,
            "Dockerfile {}: after the stub-source dependency build, the real sources must be \
             `touch`ed (or the kstash fingerprints removed) before the final `cargo build` (line {}); \
             otherwise cargo sees them as older than the stub and the image ships the stub binary",
            builder.label(),
            final_build.line
        );
    }
}

#[test]
fn dockerignore_keeps_host_build_output_out_of_the_context() {
    let stages = dockerfile();
    let copies_everything = stages.iter().flat_map(|s| s.all("COPY")).any(|c| {
        let (flags, srcs, _) = copy_parts(c);
        !flags.iter().any(|f| f.starts_with("--from="))
            && srcs.iter().any(|s| s == "." || s == "./")
    });
    if !copies_everything {
        return;
    }
    let ignore = std::fs::read_to_string(repo_file(".dockerignore")).unwrap_or_default();
    let ignored = |dir: &str| {
        ignore.lines().map(str::trim).any(|l| {
            let l = l.trim_start_matches('/').trim_end_matches('/');
            l == dir || l == format!("**/{dir}")
        })
    };
    for dir in ["target", ".git"] {
        assert!(
            ignored(dir),
            "Dockerfile copies the whole context (`COPY . ...`) but .dockerignore does not exclude \
             `{dir}/`; the host's {dir}/ would be sent to the daemon and baked into the build"
        );
    }
}

// ---------------------------------------------------------------------------
// Self-checks of the parsing helpers
// ---------------------------------------------------------------------------

#[test]
fn helpers_understand_compose_syntax_variants() {
    assert_eq!(interpolate("${A:-kafka:9092}"), "kafka:9092");
    assert_eq!(interpolate("${A-x}${B}"), "x");
    assert_eq!(interpolate("${A:-${B:-nested}}"), "nested");
    assert_eq!(interpolate("$$HOME $HOME"), "$HOME ");

    let list: Value = serde_yaml::from_str(
        "environment:\n  - KSTASH_KAFKA_BROKERS=kafka:9092\n  - KSTASH_CONFIG\n  - RUST_LOG=a=b",
    )
    .unwrap();
    let env = environment(&list, "t");
    assert_eq!(env["KSTASH_KAFKA_BROKERS"].as_deref(), Some("kafka:9092"));
    assert_eq!(env["KSTASH_CONFIG"], None);
    assert_eq!(env["RUST_LOG"].as_deref(), Some("a=b"));

    let map: Value =
        serde_yaml::from_str("environment:\n  KSTASH_KAFKA_REPLICATION_FACTOR: 1\n  X:\n").unwrap();
    let env = environment(&map, "t");
    assert_eq!(env["KSTASH_KAFKA_REPLICATION_FACTOR"].as_deref(), Some("1"));
    assert_eq!(env["X"], None);

    let ports: Value = serde_yaml::from_str(
        "ports:\n  - \"127.0.0.1:80:8080/tcp\"\n  - 9000\n  - \"7000-7001:7000-7001\"\n  - target: 6000\n    published: 1",
    )
    .unwrap();
    assert_eq!(
        published_container_ports(&ports),
        vec![(8080, 8080), (9000, 9000), (7000, 7001), (6000, 6000)]
    );
}
